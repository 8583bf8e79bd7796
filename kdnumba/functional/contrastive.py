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
"""

from __future__ import annotations

import numpy as np

from kdnumba import _dispatch
from kdnumba import _validation as v

__all__ = ["info_nce", "nt_xent", "supervised_contrastive", "triplet_loss"]

_FAMILY = "contrastive"


# --- validation helpers --------------------------------------------------------

def _as_embeddings(x, name: str, dtype=None) -> np.ndarray:
    return v.as_float_array(x, name, ndim=2, dtype=dtype)


def _check_width(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"embedding width mismatch: {name_a} has width {a.shape[1]}, {name_b} has width "
            f"{b.shape[1]}; project them to a common width first (e.g. a linear layer on "
            "the student)")


def _check_pair(s: np.ndarray, t: np.ndarray) -> None:
    v.check_same_batch(s, t, "student_emb", "teacher_emb")
    _check_width(s, t, "student_emb", "teacher_emb")


def _finite_norms(kernels, x: np.ndarray, name: str) -> np.ndarray:
    """Row norms (float64); a NaN/inf anywhere gives a non-finite norm."""
    norms = kernels.norms(x)
    if not np.isfinite(norms).all():
        raise ValueError(f"{name} contains NaN or inf values")
    return norms


def _as_negatives(negatives, s: np.ndarray) -> np.ndarray | None:
    """``None`` or a ``(K, D)`` array of the student's dtype (``K = 0`` -> ``None``)."""
    if negatives is None:
        return None
    shape = tuple(getattr(negatives, "shape", ()))
    if len(shape) == 2 and shape[0] == 0:  # an empty queue: in-batch loss
        if shape[1] != s.shape[1]:
            raise ValueError(
                f"embedding width mismatch: student_emb has width {s.shape[1]}, negatives have "
                f"width {shape[1]}; project them to a common width first")
        v.as_float_array(np.zeros((1, shape[1]), dtype=np.asarray(negatives).dtype),
                         "negatives")  # the same dtype rules as a non-empty queue
        return None
    neg = v.as_float_array(negatives, "negatives", ndim=2, dtype=s.dtype)
    _check_width(s, neg, "student_emb", "negatives")
    return neg


def _tile_rows(tile_rows) -> int | None:
    if tile_rows is None:
        return None
    return v.check_int(tile_rows, "tile_rows", minimum=1)


def _prepare(student_emb, teacher_emb, negatives, temperature, target, tile_rows):
    temperature = v.check_positive(temperature, "temperature")
    kernels = _dispatch.kernels(_FAMILY, target)
    s = _as_embeddings(student_emb, "student_emb")
    t = _as_embeddings(teacher_emb, "teacher_emb", dtype=s.dtype)
    _check_pair(s, t)
    neg = _as_negatives(negatives, s)
    s_norms = _finite_norms(kernels, s, "student_emb")
    t_norms = _finite_norms(kernels, t, "teacher_emb")
    n_norms = None if neg is None else _finite_norms(kernels, neg, "negatives")
    return kernels, s, t, neg, s_norms, t_norms, n_norms, temperature, _tile_rows(tile_rows)


def _candidates(t, neg, t_norms, n_norms):
    if neg is None:
        return t, t_norms
    return np.concatenate([t, neg]), np.concatenate([t_norms, n_norms])


# --- public functions ------------------------------------------------------------------

def nt_xent(student_emb, teacher_emb, negatives=None, *, temperature=0.07, device="auto",
            tile_rows=None):
    r"""NT-Xent (student-anchored InfoNCE) between student and teacher embeddings.

    With ``s_hat``/``c_hat`` the clamped-normalised rows, candidates
    ``C = {t_1..t_B} u {negatives}`` and ``p_ic = softmax_c(s_hat_i . c_hat / tau)``::

        loss = 1/B sum_i [ -s_hat_i . t_hat_i / tau + log sum_c exp(s_hat_i . c_hat / tau) ]
        d loss / d s_hat_i = 1/(B tau) (sum_c p_ic c_hat - t_hat_i)
        d loss / d s_i = J_i^T d loss / d s_hat_i,
        J_i = (I - s_hat_i s_hat_i^T)/||s_i||  (||s_i|| > 1e-12),  I/1e-12 otherwise

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
        tile_rows: anchor rows per tile (default: about 16 MiB of
            similarities); changes rounding only.

    Returns:
        ``(loss, grad)``: a float and ``(B, D)`` in the student's dtype.
    """
    target = _dispatch.resolve_device(device, student_emb, teacher_emb, negatives)
    if target == "cuda":
        from kdnumba import _cuda_paths  # imports numba.cuda: CUDA path only
        return _cuda_paths.nt_xent(student_emb, teacher_emb, temperature=temperature,
                                negatives=negatives, tile_rows=tile_rows)
    kernels, s, t, neg, s_norms, t_norms, n_norms, tau, rows = _prepare(
        student_emb, teacher_emb, negatives, temperature, target, tile_rows)
    cand, cand_norms = _candidates(t, neg, t_norms, n_norms)
    pos_index = np.arange(s.shape[0], dtype=np.int64)
    loss, grad = kernels.student_anchored(s, s_norms, cand, cand_norms, None, pos_index, tau,
                                          rows)
    return float(loss), grad


def info_nce(student_emb, teacher_emb, negatives=None, *, temperature=0.07, device="auto",
             tile_rows=None):
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

    Other arguments and returns as :func:`nt_xent`.
    """
    target = _dispatch.resolve_device(device, student_emb, teacher_emb, negatives)
    if target == "cuda":
        from kdnumba import _cuda_paths  # imports numba.cuda: CUDA path only
        return _cuda_paths.info_nce(student_emb, teacher_emb, temperature=temperature,
                                negatives=negatives, tile_rows=tile_rows)
    kernels, s, t, neg, s_norms, t_norms, n_norms, tau, rows = _prepare(
        student_emb, teacher_emb, negatives, temperature, target, tile_rows)
    loss, grad = kernels.teacher_anchored(s, s_norms, t, t_norms, neg, n_norms, tau, rows)
    return float(loss), grad


def supervised_contrastive(student_emb, teacher_emb, labels, negatives=None, *,
                           temperature=0.07, device="auto", tile_rows=None):
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

    Other arguments and returns as :func:`nt_xent`.
    """
    target = _dispatch.resolve_device(device, student_emb, teacher_emb, negatives)
    if target == "cuda":
        from kdnumba import _cuda_paths  # imports numba.cuda: CUDA path only
        return _cuda_paths.supervised_contrastive(student_emb, teacher_emb, labels,
                                                  temperature=temperature,
                                                  negatives=negatives, tile_rows=tile_rows)
    kernels, s, t, neg, s_norms, t_norms, n_norms, tau, rows = _prepare(
        student_emb, teacher_emb, negatives, temperature, target, tile_rows)
    y = v.as_class_labels(labels, "labels", s.shape[0])
    classes, inverse = np.unique(y, return_inverse=True)
    inverse = np.ascontiguousarray(inverse, dtype=np.int64)
    means = kernels.class_means(t, t_norms, inverse, classes.shape[0])
    cand, cand_norms = _candidates(t, neg, t_norms, n_norms)
    loss, grad = kernels.student_anchored(s, s_norms, cand, cand_norms,
                                          means, inverse, tau, rows)
    return float(loss), grad


def triplet_loss(student_emb, labels, *, margin=0.1, device="auto", tile_rows=None):
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

    Returns:
        ``(loss, grad)``.
    """
    margin = v.check_non_negative(margin, "margin")
    target = _dispatch.resolve_device(device, student_emb)
    if target == "cuda":
        from kdnumba import _cuda_paths  # imports numba.cuda: CUDA path only
        return _cuda_paths.triplet_loss(student_emb, labels, margin=margin,
                                        tile_rows=tile_rows)
    kernels = _dispatch.kernels(_FAMILY, target)
    s = _as_embeddings(student_emb, "student_emb")
    s_norms = _finite_norms(kernels, s, "student_emb")
    y = v.as_class_labels(labels, "labels", s.shape[0])
    rows = _tile_rows(tile_rows)
    classes, qualifies, n_qualifying = triplet_anchors(y)
    if n_qualifying == 0:
        return 0.0, np.zeros_like(s)
    loss, grad = kernels.triplet(s, s_norms, classes, qualifies, n_qualifying, margin, rows)
    return float(loss), grad


def triplet_anchors(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """``(classes, qualifies, n_qualifying)`` for the batch-hard triplet loss:
    ``classes`` int64 ``(B,)`` dense class ids, ``qualifies`` bool ``(B,)``
    (the anchor has a positive ``j != i`` and a negative in the batch), and
    how many anchors do (the loss is their mean). Shared by the CPU and CUDA paths."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    per_row = counts[inverse]
    qualifies = (per_row >= 2) & (per_row < labels.shape[0])
    return (np.ascontiguousarray(inverse, dtype=np.int64), np.ascontiguousarray(qualifies),
            int(qualifies.sum()))
