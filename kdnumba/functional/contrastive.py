r"""Contrastive distillation losses as pure functions, without the ``B x B`` matrix.

Cosine similarity (SPEC)::

    cos(a, b) = a.b / (max(||a||, 1e-12) * max(||b||, 1e-12))

so a zero vector has cosine 0 with everything (no NaN). ``tau`` is the
temperature; ``s_i``/``t_i`` are student/teacher embeddings of sample ``i``;
every loss is a mean over the batch and every gradient is the exact
derivative of the returned loss with respect to the *student* embeddings.

* ``nt_xent``: student anchors, teacher candidates (plus queued ``negatives``)::

      loss = 1/B sum_i [ -cos(s_i, t_i)/tau + log sum_{c in C} exp(cos(s_i, c)/tau) ]

* ``info_nce``: teacher anchors, student candidates (plus constant ``negatives``)::

      loss = 1/B sum_i [ -cos(t_i, s_i)/tau + log sum_{c in C'} exp(cos(t_i, c)/tau) ]

* ``supervised_contrastive``: student anchors; the positives of anchor ``i``
  are the batch teacher rows of its class, ``P(i) = {j : y_j = y_i}`` (always
  contains ``i``; queued negatives carry no labels and are never positives)::

      loss = 1/B sum_i [ -1/|P(i)| sum_{j in P(i)} cos(s_i, t_j)/tau
                         + log sum_{c in C} exp(cos(s_i, c)/tau) ]

* ``triplet_loss``: batch-hard triplet on the student embeddings (Euclidean)::

      loss = 1/|Q| sum_{i in Q} max(0, max_{p in P(i)} d(s_i, s_p)
                                       - min_{n in N(i)} d(s_i, s_n) + margin)

  ``P(i) = {j != i : y_j = y_i}``, ``N(i) = {j : y_j != y_i}``, ``Q`` the
  anchors with both non-empty; ``loss = 0`` (zero gradient) when ``Q`` is empty.

The computation streams over tiles of anchors (see
:mod:`kdnumba.kernels.cpu.contrastive` and ``docs/contrastive.md``): memory
``O((B + K) D + R (B + K))`` for ``R`` anchor rows per tile, never ``B x B``.
Each loss is one body for both devices (``_dispatch.backend``): the kernels
of ``kernels/cpu/contrastive.py`` and ``kernels/cuda/contrastive.py`` share
their launch functions and write per-row float64 partials that the body adds
in a fixed order (``be.total``). The loss of an anchor is taken from the same
rounded logits as its log-sum-exp, so it is never negative, also in float32.
"""

from __future__ import annotations

import math

import numpy as np

from kdnumba import _dispatch
from kdnumba import _validation as v
from kdnumba.kernels.contrastive_lists import diagonal
from kdnumba.registry import BadInput, LossSpec, Variant, Workload, register

__all__ = ["info_nce", "nt_xent", "supervised_contrastive", "triplet_loss"]

_FAMILY = "contrastive"


# --- validation and bookkeeping (shared by the four bodies) --------------------------

def check_width(a, b, name_a: str, name_b: str) -> None:
    """``ValueError`` unless the ``(B, D)`` arrays ``a`` and ``b`` have the same width."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"embedding width mismatch: {name_a} has width {a.shape[1]}, {name_b} has width "
            f"{b.shape[1]}; project them to a common width first (e.g. a linear layer on "
            "the student)")


def check_tile_rows(tile_rows) -> int | None:
    """``None`` or a positive int (anchor rows per tile)."""
    if tile_rows is None:
        return None
    return v.check_int(tile_rows, "tile_rows", minimum=1)


def _dtype_of(x) -> np.dtype:
    cai = getattr(x, "__cuda_array_interface__", None)
    return np.dtype(cai["typestr"] if cai is not None else np.asarray(x).dtype)


def _negatives(be, negatives, s):
    """``None`` or the ``(K, D)`` kernel-side queue in the student's dtype; an empty
    queue (``K = 0``) is ``None`` after the same dtype and width checks."""
    if negatives is None:
        return None
    v.reject_masked(negatives, "negatives")
    shape = tuple(getattr(negatives, "shape", ()))
    if len(shape) == 2 and shape[0] == 0:  # an empty queue: in-batch loss
        v.check_float_meta(_dtype_of(negatives), (1, shape[1]), "negatives", ndim=2)
        if shape[1] != s.shape[1]:
            raise ValueError(
                f"embedding width mismatch: student_emb has width {s.shape[1]}, negatives have "
                f"width {shape[1]}; project them to a common width first")
        return None
    neg = be.float_array(negatives, "negatives", ndim=2, dtype=s.dtype)
    check_width(s, neg, "student_emb", "negatives")
    return neg


def _pair(be, student_emb, teacher_emb, negatives):
    s = be.float_array(student_emb, "student_emb", ndim=2)
    t = be.float_array(teacher_emb, "teacher_emb", ndim=2, dtype=s.dtype)
    v.check_same_batch(s, t, "student_emb", "teacher_emb")
    check_width(s, t, "student_emb", "teacher_emb")
    return s, t, _negatives(be, negatives, s)


def _row_norms(be, kernels, x, name: str):
    """Row norms (float64, kernel-side); ``ValueError`` naming ``x`` if a row holds
    NaN/inf or its norm overflows float64."""
    if x is None:
        return None
    norms = be.empty(x.shape[0], np.float64)
    kernels.row_norms(x, norms)
    if not math.isfinite(be.total(norms)):  # one number back; the rows only on this path
        _check_norms(be, x, norms, name)
    return norms


def _check_norms(be, x, norms, name: str) -> None:
    """``ValueError`` naming ``x`` if a row of it holds NaN/inf or its norm
    overflows float64 (called once a total of norms was not finite)."""
    if not np.isfinite(be.to_host(norms)).all():
        if not np.isfinite(be.to_host(x)).all():
            raise ValueError(f"{name} contains NaN or inf values")
        raise ValueError(f"{name} has rows whose norm overflows float64; rescale it")


def _norms(be, kernels, s, t, neg):
    """``(s_norms, t_norms, neg_norms or None)``, float64 and kernel-side, from one
    buffer with one finiteness test of their total (a small call pays ~2 us
    for every separate buffer and total, and Python work between two kernels
    costs it more than its own time: it evicts the embeddings from cache,
    issue #16); ``ValueError`` naming the first input with a NaN/inf row or a
    norm that overflows float64."""
    n_s, n_t = s.shape[0], t.shape[0]
    n_neg = 0 if neg is None else neg.shape[0]
    norms = be.empty(n_s + n_t + n_neg, np.float64)
    s_norms, t_norms = norms[:n_s], norms[n_s:n_s + n_t]
    kernels.row_norms(s, s_norms)
    kernels.row_norms(t, t_norms)
    neg_norms = None
    if neg is not None:
        neg_norms = norms[n_s + n_t:]
        kernels.row_norms(neg, neg_norms)
    if not math.isfinite(be.total(norms)):  # one number back; the rows only on this path
        for x, x_norms, name in ((s, s_norms, "student_emb"), (t, t_norms, "teacher_emb"),
                                 (neg, neg_norms, "negatives")):
            if x is not None:
                _check_norms(be, x, x_norms, name)
        # Finite norms whose float64 total overflows: nothing wrong with the inputs.
    return s_norms, t_norms, neg_norms


def class_lists(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(inverse, members, starts)`` of int64 class labels ``(B,)``: dense class
    ids ``(B,)``, the rows grouped by class (row order inside a class) and the
    CSR offsets of each class in ``members`` (``(n_classes + 1,)``)."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    inverse = np.ascontiguousarray(inverse.reshape(-1), dtype=np.int64)
    members = np.argsort(inverse, kind="stable").astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return inverse, members, starts


def triplet_anchors(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """``(classes, qualifies, n_qualifying)`` for the batch-hard triplet loss:
    ``classes`` int64 ``(B,)`` dense class ids, ``qualifies`` bool ``(B,)``
    (the anchor has a positive ``j != i`` and a negative in the batch), and
    how many anchors do (the loss is their mean)."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    per_row = counts[inverse]
    qualifies = (per_row >= 2) & (per_row < labels.shape[0])
    return (np.ascontiguousarray(inverse, dtype=np.int64), np.ascontiguousarray(qualifies),
            int(qualifies.sum()))


def _finish(be, row_loss, n_terms, named, grad, out):
    """The mean of the per-row partials (fixed order); a non-finite total raises
    ``ValueError`` naming the first non-finite input (or saying it overflowed)."""
    loss = be.total(row_loss) / n_terms
    be.check_finite(loss, named)
    return loss, be.deliver(grad, out)


def _softmax_loss(mode, student_emb, teacher_emb, negatives, labels, temperature, device,
                  tile_rows, out):
    """The body of :func:`nt_xent`, :func:`info_nce` and :func:`supervised_contrastive`."""
    tau = v.check_positive(temperature, "temperature")
    rows = check_tile_rows(tile_rows)
    be = _dispatch.backend(device, student_emb, teacher_emb, negatives)
    s, t, neg = _pair(be, student_emb, teacher_emb, negatives)
    n, dim = s.shape
    y = None
    if mode == "supervised":
        y = v.as_class_labels(be.host_object(labels), "labels", n)
    grad = be.gradient_buffer(out, s, (student_emb, teacher_emb, negatives, t, neg))
    kernels = be.kernels(_FAMILY)
    row_loss = be.empty(n, np.float64)
    if mode != "info_nce":  # (before the first kernel: see _norms)
        if y is None:  # NT-Xent: anchor i's positive is teacher row i
            lists = diagonal(n)
        else:  # supervised: the teacher rows of the anchor's class
            lists = class_lists(y)
        pos_class = be.to_device(lists[0])
        members = be.to_device(lists[1])
        starts = be.to_device(lists[2])
    # No launch context: these kernels are serial on the CPU (their threads are
    # BLAS's, see kernels/cpu/contrastive.py) and a context would cost a small
    # call 1 us, or start Numba's thread pool for nothing (issue #16).
    s_norms, t_norms, n_norms = _norms(be, kernels, s, t, neg)
    if mode == "info_nce":
        kernels.teacher_anchored(s, s_norms, t, t_norms, neg, n_norms, tau, rows, row_loss,
                                 grad)
    else:
        means = None
        if y is not None:
            means = be.empty((starts.shape[0] - 1, dim), s.dtype)
            kernels.class_means(t, t_norms, members, starts, means)
        kernels.student_anchored(s, s_norms, t, t_norms, neg, n_norms, means, pos_class,
                                 members, starts, tau, rows, row_loss, grad)
    loss = be.total(row_loss) / n
    if not math.isfinite(loss):  # (the inputs' list only on this path)
        be.check_finite(loss, [("student_emb", s), ("teacher_emb", t), ("negatives", neg)])
    return loss, be.deliver(grad, out)


# --- public functions ------------------------------------------------------------------

def nt_xent(student_emb, teacher_emb, negatives=None, *, temperature=0.07, device="auto",
            tile_rows=None, out=None):
    r"""NT-Xent (student-anchored InfoNCE) between student and teacher embeddings.

    With ``s_hat``/``c_hat`` the clamped-normalised rows, candidates
    ``C = {t_1..t_B} u {negatives}`` and ``p_ic = softmax_c(s_hat_i . c_hat / tau)``::

        loss = 1/B sum_i [ -s_hat_i . t_hat_i / tau + log sum_c exp(s_hat_i . c_hat / tau) ]
        d loss / d s_hat_i = 1/(B tau) (sum_c p_ic c_hat - t_hat_i)
        d loss / d s_i = J_i^T d loss / d s_hat_i,
        J_i = (I - s_hat_i s_hat_i^T)/||s_i||  (||s_i|| > 1e-12),  I/1e-12 otherwise

    Each anchor's loss is computed from the same rounded logits as its
    log-sum-exp: never negative, and accurate relative to its own size even
    in float32 with confident positives.

    Args:
        student_emb: ``(B, D)`` float32/float64.
        teacher_emb: ``(B, D)``; cast to the student's dtype. Widths must
            match (project first).
        negatives: optional ``(K, D)`` extra teacher candidates (e.g. a queue of
            past teacher embeddings); constants, they join every anchor's
            denominator. ``None`` or ``K = 0``: in-batch NT-Xent. An array
            argument (positional or keyword), so the framework bridges treat
            it as a constant input like the teacher.
        temperature: ``tau > 0``.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        tile_rows: anchor rows per tile on the CPU (default: about 16 MiB of
            similarities); changes rounding only. The GPU tiles are fixed.
        out: optional C-contiguous ``(B, D)`` array of the student's dtype to
            receive the gradient.

    Returns:
        ``(loss, grad)``: a float and ``(B, D)`` in the student's dtype.

    Raises:
        TypeError: non-float embeddings or negatives.
        ValueError: batch or width mismatch, empty batch, NaN/inf (naming the
            input), ``temperature <= 0``, bad ``tile_rows``, bad ``out``.
    """
    return _softmax_loss("nt_xent", student_emb, teacher_emb, negatives, None, temperature,
                         device, tile_rows, out)


def info_nce(student_emb, teacher_emb, negatives=None, *, temperature=0.07, device="auto",
             tile_rows=None, out=None):
    r"""Teacher-anchored InfoNCE (CRD's direction): which student row matches ``t_i``?

    Candidates are the student rows plus optional constant ``negatives``;
    ``p_ij = softmax_j(t_hat_i . c_hat_j / tau)``::

        loss = 1/B sum_i [ -t_hat_i . s_hat_i / tau + log sum_c exp(t_hat_i . c_hat / tau) ]
        d loss / d s_hat_j = 1/(B tau) (sum_i p_ij t_hat_i - t_hat_j)

    then the chain rule through ``s_j``'s clamped normalisation (see
    :func:`nt_xent`). The candidate-side sum over anchors ``i`` is
    accumulated tile by tile in float64 (no ``B x B`` matrix).

    Args:
        negatives: optional ``(K, D)`` extra *candidates*, i.e. rows in the
            student's role (for example a queue of detached past student
            embeddings); constants (no gradient). A queue of *teacher*
            embeddings does not belong here (teacher-vs-teacher similarities
            would only add constants to each anchor's denominator), which is
            why :class:`~kdnumba.ContrastiveDistillationStrategy` does not
            pass its queue to this mode.
        out: optional C-contiguous ``(B, D)`` array of the student's dtype to
            receive the gradient.

    Other arguments, returns and errors as :func:`nt_xent`.
    """
    return _softmax_loss("info_nce", student_emb, teacher_emb, negatives, None, temperature,
                         device, tile_rows, out)


def supervised_contrastive(student_emb, teacher_emb, labels, negatives=None, *,
                           temperature=0.07, device="auto", tile_rows=None, out=None):
    r"""Supervised contrastive loss (student anchors, teacher candidates, class positives).

    ``P(i) = {j : y_j = y_i}`` (includes ``i``, so never empty; a class with
    one member reduces to NT-Xent for that anchor), ``mu_c`` the mean of the
    normalised teacher rows of class ``c``::

        loss = 1/B sum_i [ -s_hat_i . mu_{y_i} / tau + log sum_c exp(s_hat_i . c_hat / tau) ]
        d loss / d s_hat_i = 1/(B tau) (sum_c p_ic c_hat - mu_{y_i})

    (``s_hat_i . mu_{y_i} = mean_{j in P(i)} cos(s_i, t_j)``), then the chain
    rule through the normalisation.

    Args:
        labels: integer class indices ``(B,)`` (non-negative) or one-hot float
            rows ``(B, C)``.
        negatives: optional ``(K, D)`` extra teacher candidates; they carry no
            labels and are negatives of every anchor.
        out: optional C-contiguous ``(B, D)`` array of the student's dtype to
            receive the gradient.

    Other arguments, returns and errors as :func:`nt_xent` (and ``ValueError``
    for labels that are not hard classes of the right length).
    """
    return _softmax_loss("supervised", student_emb, teacher_emb, negatives, labels,
                         temperature, device, tile_rows, out)


def triplet_loss(student_emb, labels, *, margin=0.1, device="auto", tile_rows=None, out=None):
    r"""Batch-hard triplet loss (Hermans et al. 2017) on student embeddings, Euclidean.

    For anchor ``i``: hardest positive ``p = argmax_{j != i, y_j = y_i} d_ij``,
    hardest negative ``n = argmin_{y_j != y_i} d_ij`` (ties: smallest index),
    ``d_ij = sqrt(max(||s_i - s_j||^2, 0))``::

        h_i  = max(0, d_ip - d_in + margin)
        loss = 1/|Q| sum_{i in Q} h_i
        d h_i / d s_i = u_ip - u_in,  d h_i / d s_p = -u_ip,  d h_i / d s_n = u_in

    with ``u_ij = (s_i - s_j)/d_ij``, taken as 0 when ``d_ij = 0`` (coincident
    points), and no gradient where ``h_i <= 0``. ``Q``: anchors with at least
    one positive ``j != i`` and one negative; anchors outside ``Q`` are
    excluded from the mean. If ``Q`` is empty (one class, or all classes
    singletons) the loss is 0 with a zero gradient.

    The hardest pair is chosen from a tiled Gram matrix (``||s_j||^2 -
    2 s_i.s_j``, on rows rescaled by a power of two); the chosen distances
    are then recomputed exactly from the differences in float64, so loss
    and gradient always describe the same pair.

    Args:
        student_emb: ``(B, D)`` float32/float64.
        labels: integer class indices ``(B,)`` or one-hot float rows ``(B, C)``.
        margin: ``>= 0``.
        device, tile_rows: as :func:`nt_xent`.
        out: optional C-contiguous ``(B, D)`` array of the student's dtype to
            receive the gradient.

    Returns:
        ``(loss, grad)``.
    """
    margin = v.check_non_negative(margin, "margin")
    rows = check_tile_rows(tile_rows)
    be = _dispatch.backend(device, student_emb)
    s = be.float_array(student_emb, "student_emb", ndim=2)
    y = v.as_class_labels(be.host_object(labels), "labels", s.shape[0])
    grad = be.gradient_buffer(out, s, (student_emb, s))
    classes, qualifies, n_qualifying = triplet_anchors(y)
    kernels = be.kernels(_FAMILY)
    row_loss = be.empty(s.shape[0], np.float64)
    with be.launch(s.shape[0] * s.size):
        s_norms = _row_norms(be, kernels, s, "student_emb")
        kernels.triplet(s, s_norms, classes, qualifies, n_qualifying, margin, rows, row_loss,
                        grad)
    return _finish(be, row_loss, 1, [("student_emb", s)], grad, out)


# --- registry entries ----------------------------------------------------------------

#: Benchmark settings (as in ``docs/contrastive.md``'s measurements).
_TAU = 0.07
_CLASSES = 100


def _embedding_inputs(rng, dtype, *, rows=6, dim=5, queue=0, classes=3, labels=True,
                      teacher=True) -> dict:
    """Student embeddings, a related teacher (student + noise), optional queued
    negatives (``queue`` rows; ``None`` when 0) and class labels."""
    student = rng.standard_normal((rows, dim)).astype(dtype)
    args = {"student_emb": student}
    if teacher:
        args["teacher_emb"] = (student + rng.standard_normal((rows, dim))).astype(dtype)
    if labels:
        args["labels"] = rng.integers(0, classes, rows, dtype=np.int64)
    if teacher:
        args["negatives"] = (rng.standard_normal((queue, dim)).astype(dtype) if queue
                             else None)
    return args


def _pair_inputs(rng, dtype, **shape) -> dict:
    return _embedding_inputs(rng, dtype, labels=False, **shape)


def _supervised_inputs(rng, dtype, **shape) -> dict:
    return _embedding_inputs(rng, dtype, **shape)


def _triplet_inputs(rng, dtype, **shape) -> dict:
    return _embedding_inputs(rng, dtype, teacher=False, **shape)


def _with(arguments: dict, **changes) -> dict:
    return {**arguments, **changes}


def _softmax_flops(inputs) -> int:
    """The two matrix products: logits and gradient, ``2 B N D`` each."""
    n, dim = inputs["student_emb"].shape
    neg = inputs.get("negatives")
    return 4 * n * (n + (0 if neg is None else neg.shape[0])) * dim


def _triplet_flops(inputs) -> int:
    """The Gram matrix of the hardest-pair selection."""
    n, dim = inputs["student_emb"].shape
    return 2 * n * n * dim


_SOFTMAX_VARIANTS = (
    Variant("in-batch, tau=0.2", {"temperature": 0.2}),
    Variant("queue of 4, tau=0.07", {"temperature": 0.07}, {"queue": 4}),
    # 2/tau > 60: the row-maximum shift in float32 (the bound in float64).
    Variant("queue of 2, tau=0.02", {"temperature": 0.02}, {"queue": 2}),
)

_SOFTMAX_BAD = (
    BadInput("temperature 0", lambda a: _with(a, temperature=0.0), ValueError, "temperature"),
    BadInput("tile_rows 0", lambda a: _with(a, tile_rows=0), ValueError, "tile_rows"),
    BadInput("teacher of another width",
             lambda a: _with(a, teacher_emb=np.hstack([a["teacher_emb"]] * 2)), ValueError,
             "project"),
    BadInput("negatives of another width",
             lambda a: _with(a, negatives=np.zeros((2, a["student_emb"].shape[1] + 1))),
             ValueError, "project"),
    BadInput("empty queue of another width",
             lambda a: _with(a, negatives=np.zeros((0, a["student_emb"].shape[1] + 1))),
             ValueError, "project"),
    BadInput("1-D embeddings",
             lambda a: _with(a, student_emb=a["student_emb"][0], teacher_emb=a["teacher_emb"][0]),
             ValueError, "2-D"),
)

_BAD_LABELS = (
    BadInput("labels missing", lambda a: _with(a, labels=None), ValueError, "labels"),
    BadInput("soft labels", lambda a: _with(a, labels=np.full((a["student_emb"].shape[0], 2),
                                                              0.5)), ValueError, "one-hot"),
    BadInput("negative labels",
             lambda a: _with(a, labels=-np.ones(a["student_emb"].shape[0], np.int64)),
             ValueError, "non-negative"),
    BadInput("string labels",
             lambda a: _with(a, labels=np.array(["a"] * a["student_emb"].shape[0])),
             TypeError, "labels"),
)


def _softmax_workloads(name: str, *, headline: bool) -> tuple[Workload, ...]:
    """The benchmark workloads of a softmax loss (``B = 4096, D = 128``)."""
    opts = {"temperature": _TAU}
    shape = {"rows": 4096, "dim": 128, "classes": _CLASSES}
    if not headline:
        return (Workload("B4096_D128", shape, options=opts,
                         notes={"info_nce": "teacher-anchored: candidate-side gradient "
                                            "accumulated over tiles",
                                "supervised_contrastive": f"{_CLASSES} classes"}[name]),)
    return (
        Workload("B4096_D128", shape, options=opts, quick=True,
                 notes="headline: student-anchored NT-Xent, tau=0.07, loss+grad, tiled"),
        Workload("B4096_D128_K1024", {**shape, "queue": 1024}, options=opts,
                 notes="with a queue of 1024 teacher negatives"),
        Workload("B4096_D128", shape, dtype="float64", options=opts, notes="float64"),
        Workload("B256_D128", {"rows": 256, "dim": 128}, options=opts, quick=True,
                 notes="small call: per-call overhead"),
    )


_MEDIUM = {"rows": 256, "dim": 128, "queue": 16}

register(LossSpec(
    name="nt_xent",
    function=nt_xent,
    family=_FAMILY,
    make_inputs=_pair_inputs,
    reference="contrastive:nt_xent",
    torch="contrastive:nt_xent_torch",
    variants=_SOFTMAX_VARIANTS,
    medium=_MEDIUM,
    zero_when_equal=False,  # the other candidates stay in the denominator
    bad_inputs=_SOFTMAX_BAD,
    workloads=_softmax_workloads("nt_xent", headline=True),
    flops=_softmax_flops,
))

register(LossSpec(
    name="info_nce",
    function=info_nce,
    family=_FAMILY,
    make_inputs=_pair_inputs,
    reference="contrastive:info_nce",
    torch="contrastive:info_nce_torch",
    variants=_SOFTMAX_VARIANTS,
    medium=_MEDIUM,
    zero_when_equal=False,
    bad_inputs=_SOFTMAX_BAD,
    workloads=_softmax_workloads("info_nce", headline=False),
    flops=_softmax_flops,
))

register(LossSpec(
    name="supervised_contrastive",
    function=supervised_contrastive,
    family=_FAMILY,
    make_inputs=_supervised_inputs,
    reference="contrastive:supervised_contrastive",
    torch="contrastive:supervised_contrastive_torch",
    variants=(*_SOFTMAX_VARIANTS,
              Variant("singleton classes, queue of 3", {"temperature": 0.1},
                      {"queue": 3, "classes": 1000})),
    medium={**_MEDIUM, "classes": 10},
    zero_when_equal=False,
    bad_inputs=(*_SOFTMAX_BAD, *_BAD_LABELS),
    workloads=_softmax_workloads("supervised_contrastive", headline=False),
    flops=_softmax_flops,
))

register(LossSpec(
    name="triplet_loss",
    function=triplet_loss,
    family=_FAMILY,
    make_inputs=_triplet_inputs,
    reference="contrastive:triplet_loss",
    torch="contrastive:triplet_loss_torch",
    variants=(Variant("margin 0.1"), Variant("margin 2", {"margin": 2.0}, {"classes": 2})),
    medium={"rows": 256, "dim": 128, "classes": 10},
    zero_when_equal=False,  # no teacher
    fd_rtol=1e-5,
    bad_inputs=(
        BadInput("negative margin", lambda a: _with(a, margin=-0.1), ValueError, "margin"),
        BadInput("tile_rows 2.5", lambda a: _with(a, tile_rows=2.5), TypeError, "tile_rows"),
        BadInput("2-D integer labels",
                 lambda a: _with(a, labels=np.zeros((a["student_emb"].shape[0], 2), np.int64)),
                 ValueError, "1-D"),
        *_BAD_LABELS,
    ),
    workloads=(
        Workload("B4096_D128", {"rows": 4096, "dim": 128, "classes": _CLASSES},
                 options={"margin": 0.1},
                 notes="batch-hard, 100 classes; selection from a tiled Gram matrix"),
    ),
    flops=_triplet_flops,
))
