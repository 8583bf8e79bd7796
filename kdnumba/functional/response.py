"""Response-based KD as pure functions: :func:`kd_loss` (dense teacher, four
divergences, optional logit standardisation) and :func:`sparse_kd_loss` (a
teacher stored as its top-K logits)."""

from __future__ import annotations

import enum
import math

import numpy as np

from kdnumba import _dispatch
from kdnumba import _validation as v
from kdnumba._constants import (
    DIV_JSD,
    DIV_REVERSE_KL,
    DIV_TVD,
    LABEL_CODES,
    LABELS_NONE,
    SPARSE_DUPLICATE,
    SPARSE_OUT_OF_RANGE,
)
from kdnumba.functional.standardize import standardize_backward_into, standardize_into
from kdnumba.registry import BadInput, LossSpec, Variant, Workload, register


class Divergence(enum.StrEnum):
    """The soft term's divergence ``D(p_t, p_s)`` in :func:`kd_loss`."""

    KL = "kl"                   #: KL(p_t || p_s), Hinton KD (the default)
    REVERSE_KL = "reverse_kl"   #: KL(p_s || p_t), MiniLLM
    JSD = "jsd"                 #: generalised Jensen-Shannon, TRL's GKD convention
    TVD = "tvd"                 #: total variation distance


#: Divergence -> code of ``kernels.*.softmax_kl.divergence_rows`` (KL runs ``kd_rows``).
_DIVERGENCE_CODES = {Divergence.REVERSE_KL: DIV_REVERSE_KL, Divergence.JSD: DIV_JSD,
                     Divergence.TVD: DIV_TVD}


def kd_loss(student_logits, teacher_logits, labels=None, *, temperature=3.0, alpha=0.3,
            divergence="kl", jsd_beta=0.5, standardize=False, device="auto", out=None):
    r"""Knowledge-distillation loss (Hinton et al. 2015) and its exact gradient.

    With ``p^T(z) = softmax(z / T)`` row-wise, ``p = p^T(s_i)`` (student),
    ``q = p^T(t_i)`` (teacher) and ``B`` rows::

        soft = T^2 / B * sum_i D(q, p)
        hard = 1 / B  * sum_i CE(softmax(s_i), y_i)      CE = -sum_j y_ij log softmax(s_i)_j
        loss = alpha * hard + (1 - alpha) * soft         (labels given)
        loss = soft                                      (labels is None)

    with the divergence ``D`` (``divergence=``) and its gradient in the
    tempered student logits ``u = s/T`` (``d soft / d s_i = T/B * dD/du``)::

        "kl"          KL(q || p) = sum q log(q/p)            dD/du = p - q
        "reverse_kl"  KL(p || q) = sum p log(p/q)            dD/du = p (log(p/q) - D)
        "jsd"         b KL(q || m) + (1-b) KL(p || m),       dD/du = (1-b) p (log(p/m) - KL(p || m))
                      m = b q + (1-b) p,  b = jsd_beta
        "tvd"         1/2 sum |p - q|                        dD/du = p (sg - sum p sg),
                                                             sg = sign(p - q)/2 (0 where equal)

    ``"jsd"`` is TRL's ``GKDTrainer.generalized_jsd_loss`` convention (beta
    weights the teacher: ``m = beta p_t + (1 - beta) p_s``); TRL has no
    ``T^2`` factor and its ``beta = 0 / 1`` special cases are the forward /
    reverse KL, which here are ``"kl"`` / ``"reverse_kl"`` (``jsd_beta`` is
    open at both ends). ``"tvd"`` is Liger-Kernel's ``LigerTVDLoss`` on
    ``p^T`` with the sign subgradient (0 where ``p_j = q_j``). The hard-term
    gradient is ``alpha/B * (sum(y_i) softmax(s_i) - y_i)`` (``sum(y_i) = 1``
    for valid labels; with ``labels=None`` read ``alpha = 0``).

    ``standardize=True`` (logit standardisation, Sun et al. CVPR 2024) first
    replaces every row of both logits by ``(z - mean(z)) / (std(z) + 1e-7)``
    (unbiased std, as their code and torchdistill's ``LogitStdKDLoss``) in the
    soft term only; the gradient flows back through the student's
    standardisation (:mod:`kdnumba.functional.standardize`), and the hard
    term stays on the raw logits.

    Computed in one fused pass over each row (stable log-sum-exp; every log
    is of a sum or of a quantity bounded away from 0, never of a probability
    that may underflow; sums in float64), in the student's dtype (float32 or
    float64). Known limit: in float32 huge temperatures lose accuracy: the
    *loss value* from ``T >= 1e3`` (the T^2-scaled divergence cancels; ~2e-3
    relative at 1e3), and the gradient too as ``T`` grows further (~5e-2
    relative at ``T = 1e6``, as in PyTorch float32, since ``p^T(s) - p^T(t)``
    becomes a difference of nearly equal numbers); use float64 there.

    Args:
        student_logits: ``(B, C)`` float array.
        teacher_logits: ``(B, C)`` float array; cast to the student's dtype.
        labels: ``None``, integer class indices ``(B,)`` in ``[0, C)``, or
            float one-hot/soft targets ``(B, C)`` whose rows sum to 1.
        temperature: ``T > 0``.
        alpha: weight of the hard term, in ``[0, 1]``.
        divergence: ``"kl"`` (default), ``"reverse_kl"``, ``"jsd"`` or
            ``"tvd"`` (or a :class:`Divergence`).
        jsd_beta: the teacher's weight in the JSD mixture, in ``(0, 1)``.
        standardize: standardise the logits of the soft term (``C >= 2``).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        out: optional C-contiguous ``(B, C)`` array of the student's dtype to
            receive the gradient (saves an allocation in training loops).

    Returns:
        ``(loss, grad)``: a Python float and a ``(B, C)`` array.

    Raises:
        TypeError: non-float logits (int, bool, float16, complex), bad label
            dtype, non-string ``divergence``, non-bool ``standardize``.
        ValueError: shape/batch mismatch, empty batch, NaN/inf, labels out of
            range, ``temperature <= 0``, ``alpha`` outside ``[0, 1]``, unknown
            ``divergence``, ``jsd_beta`` outside ``(0, 1)``, ``C < 2`` with
            ``standardize``.
    """
    temperature = v.check_positive(temperature, "temperature")
    alpha = v.check_unit_interval(alpha, "alpha")
    div = v.parse_choice(divergence, Divergence, "divergence")
    jsd_beta = v.check_real(jsd_beta, "jsd_beta")
    if not 0.0 < jsd_beta < 1.0:
        raise ValueError(f"jsd_beta must be in (0, 1) (the open interval), got {jsd_beta!r}")
    if not isinstance(standardize, (bool, np.bool_)):
        raise TypeError(f"standardize must be True or False, got {standardize!r}")
    be = _dispatch.backend(device, student_logits, teacher_logits, labels)
    s = be.float_array(student_logits, "student_logits", ndim=2)
    t = be.float_array(teacher_logits, "teacher_logits", ndim=2, dtype=s.dtype)
    v.check_same_shape(s, t, "student_logits", "teacher_logits")
    n_rows, n_cols = s.shape
    dtype = np.dtype(s.dtype)
    kind, y = be.labels(labels, "labels", n_rows, n_cols, dtype)
    grad = be.gradient_buffer(out, s, (student_logits, teacher_logits, labels, t, y))
    index = y if kind == "index" else be.placeholder(1, np.int64)
    dense = y if kind == "dense" else be.placeholder(2, dtype)
    w_soft, w_hard, c_soft, c_hard = kernel_weights(kind, temperature, alpha, n_rows)
    kernels = be.kernels("softmax_kl")

    def soft_and_hard(s_soft, t_soft, code, w_h, c_h, g, rows):
        with be.launch(n_rows * n_cols):
            if div is Divergence.KL:
                kernels.kd_rows(s_soft, t_soft, index, dense, code,
                                dtype.type(1.0 / temperature), w_soft, w_h, c_soft, c_h,
                                g, rows)
            else:
                kernels.divergence_rows(s_soft, t_soft, index, dense, code,
                                        _DIVERGENCE_CODES[div], jsd_beta,
                                        dtype.type(1.0 / temperature), w_soft, w_h, c_soft,
                                        c_h, g, rows)

    row_loss = be.empty(n_rows, np.float64)
    if not standardize:
        soft_and_hard(s, t, LABEL_CODES[kind], w_hard, c_hard, grad, row_loss)
        loss = be.total(row_loss)
    else:
        s_std, sigma = standardize_into(be, s, "student_logits")
        t_std, _ = standardize_into(be, t, "teacher_logits")
        if kind == "none":
            soft_and_hard(s_std, t_std, LABELS_NONE, 0.0, 0.0, grad, row_loss)
            standardize_backward_into(be, grad, s_std, sigma, grad)
            loss = be.total(row_loss)
        else:
            # The hard term on the raw logits: kd_rows with a zero soft weight and
            # T = 1 (its soft exponentials are then the hard ones) ...
            hard_rows = be.empty(n_rows, np.float64)
            with be.launch(n_rows * n_cols):
                kernels.kd_rows(s, s, index, dense, LABEL_CODES[kind], dtype.type(1.0),
                                0.0, w_hard, 0.0, c_hard, grad, hard_rows)
            # ... plus the soft term's gradient through the standardisation.
            g_soft = be.empty((n_rows, n_cols), dtype)
            soft_and_hard(s_std, t_std, LABELS_NONE, 0.0, 0.0, g_soft, row_loss)
            standardize_backward_into(be, g_soft, s_std, sigma, grad, accumulate=True)
            loss = be.total(row_loss) + be.total(hard_rows)
    if not math.isfinite(loss):
        if kind != "none":  # GPU labels are range-checked by the kernel only
            v.as_labels(be.to_host(y), "labels", n_rows, n_cols, dtype)
        be.check_finite(loss, [("student_logits", s), ("teacher_logits", t),
                               ("labels", y if kind == "dense" else None)])
    return loss, be.deliver(grad, out)


def sparse_kd_loss(student_logits, teacher_topk_logits, teacher_topk_indices, labels=None, *,
                   temperature=1.0, alpha=0.0, device="auto", out=None):
    r"""KD against a teacher stored as its top-K logits per row, and the exact gradient.

    The teacher of row ``i`` is ``K`` logits ``v_i`` at the distinct columns
    ``idx_i`` (LLM distillation caches them instead of a dense ``B x V``
    teacher); ``q_i = softmax(v_i / T)`` over those ``K`` entries, zero
    elsewhere. The student's softmax spans all ``C`` columns::

        soft = T^2 / B * sum_i sum_k q_ik (log q_ik - log p^T(s_i)[idx_ik])
        loss = alpha * hard + (1 - alpha) * soft   (hard as in :func:`kd_loss`)

        d soft / d s_i = T / B * (p^T(s_i) - q_i scattered to idx_i)

    This is exactly :func:`kd_loss` (``divergence="kl"``) with a dense teacher
    whose logits are ``-inf`` off the top K. Cost: one pass of exponentials
    over the student row plus O(K) for the teacher; no dense teacher row is
    built. Indices are checked in the kernel in O(K) per row (range, and
    duplicates by marking the columns in the not-yet-written gradient row).

    Args:
        student_logits: ``(B, C)`` float array.
        teacher_topk_logits: ``(B, K)`` float array, ``1 <= K <= C``; cast to
            the student's dtype.
        teacher_topk_indices: ``(B, K)`` integer array of column indices,
            unique within each row, in ``[0, C)``.
        labels: ``None``, integer class indices ``(B,)`` or float targets
            ``(B, C)``, as in :func:`kd_loss`.
        temperature: ``T > 0``.
        alpha: weight of the hard term, in ``[0, 1]``.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        out: optional C-contiguous ``(B, C)`` array of the student's dtype.

    Returns:
        ``(loss, grad)``: a Python float and a ``(B, C)`` array.

    Raises:
        TypeError: non-float logits, non-integer indices, bad label dtype.
        ValueError: shape/batch mismatch (values and indices must have the same
            ``(B, K)`` shape), ``K > C``, empty batch, NaN/inf, an index out of
            ``[0, C)`` or repeated within a row (naming ``teacher_topk_indices``
            and the row), labels out of range, ``temperature <= 0``, ``alpha``
            outside ``[0, 1]``.
    """
    temperature = v.check_positive(temperature, "temperature")
    alpha = v.check_unit_interval(alpha, "alpha")
    be = _dispatch.backend(device, student_logits, teacher_topk_logits, teacher_topk_indices,
                           labels)
    s = be.float_array(student_logits, "student_logits", ndim=2)
    top_v = be.float_array(teacher_topk_logits, "teacher_topk_logits", ndim=2, dtype=s.dtype)
    v.check_same_batch(s, top_v, "student_logits", "teacher_topk_logits")
    n_rows, n_cols = s.shape
    n_top = top_v.shape[1]
    if not 1 <= n_top <= n_cols:
        raise ValueError(
            f"teacher_topk_logits must have between 1 and C = {n_cols} columns (K unique "
            f"indices per row), got shape {tuple(top_v.shape)}")
    top_i = be.to_device(_topk_indices(be.host_object(teacher_topk_indices), (n_rows, n_top)))
    dtype = np.dtype(s.dtype)
    kind, y = be.labels(labels, "labels", n_rows, n_cols, dtype)
    grad = be.gradient_buffer(out, s, (student_logits, teacher_topk_logits, labels, top_v, y))
    row_loss = be.empty(n_rows, np.float64)
    row_status = be.empty(n_rows, np.int64)
    with be.launch(n_rows * n_cols):
        be.kernels("softmax_kl").sparse_kd_rows(
            s, top_v, top_i,
            y if kind == "index" else be.placeholder(1, np.int64),
            y if kind == "dense" else be.placeholder(2, dtype),
            LABEL_CODES[kind],
            dtype.type(1.0 / temperature),
            *kernel_weights(kind, temperature, alpha, n_rows),
            grad, row_loss, row_status)
    loss = be.total(row_loss)
    if not math.isfinite(loss):
        status = np.asarray(be.to_host(row_status))
        for code, what in ((SPARSE_OUT_OF_RANGE, f"column indices in [0, {n_cols})"),
                           (SPARSE_DUPLICATE, "unique within each row")):
            bad = np.flatnonzero(status == code)
            if bad.size:
                raise ValueError(f"teacher_topk_indices must be {what}; row {int(bad[0])} "
                                 f"is not")
        if kind != "none":
            v.as_labels(be.to_host(y), "labels", n_rows, n_cols, dtype)
        be.check_finite(loss, [("student_logits", s), ("teacher_topk_logits", top_v),
                               ("labels", y if kind == "dense" else None)])
    return loss, be.deliver(grad, out)


def _topk_indices(indices, shape) -> np.ndarray:
    """The top-K column indices as a C-contiguous int64 host array of ``shape``
    (dtype and shape checked here; range and uniqueness by the kernel)."""
    v.reject_masked(indices, "teacher_topk_indices")
    try:
        arr = np.asarray(indices)
    except Exception as exc:
        raise TypeError(f"teacher_topk_indices could not be converted to a NumPy array: "
                        f"{exc}") from exc
    if arr.dtype.kind not in "iu":
        raise TypeError(f"teacher_topk_indices must be an integer array, got dtype "
                        f"{arr.dtype.name}")
    if arr.shape != tuple(shape):
        raise ValueError(f"teacher_topk_indices must have the shape of teacher_topk_logits "
                         f"{tuple(shape)}, got {arr.shape}")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError("teacher_topk_indices must be column indices, found one beyond int64")
    return v.kernel_ready(arr, np.int64)


def kernel_weights(kind: str, temperature: float, alpha: float, n_rows: int) -> tuple:
    """``(w_soft, w_hard, c_soft, c_hard)`` of the ``kd_rows`` kernels (CPU and
    CUDA): the loss weights ``(1-alpha) T^2 / B`` and ``alpha / B`` of the KL
    and CE terms, and their gradient weights ``(1-alpha) T / B`` and
    ``alpha / B``; without labels (``kind == "none"``) ``alpha`` is 0."""
    if kind == "none":
        alpha = 0.0
    return ((1.0 - alpha) * temperature * temperature / n_rows, alpha / n_rows,
            (1.0 - alpha) * temperature / n_rows, alpha / n_rows)


# --- registry entry ------------------------------------------------------------------

def _kd_inputs(rng, dtype, *, rows=6, classes=5, labels="index") -> dict:
    """Related student and teacher logits (teacher = student + noise, as in
    training) and labels of kind ``"none"``, ``"index"`` or ``"dense"``."""
    student = (2.0 * rng.standard_normal((rows, classes))).astype(dtype)
    teacher = (student + rng.standard_normal((rows, classes))).astype(dtype)
    if labels == "index":
        y = rng.integers(0, classes, rows, dtype=np.int64)
    elif labels == "dense":
        y = (rng.random((rows, classes)) + 0.1).astype(dtype)
        y /= y.sum(axis=1, keepdims=True)
    else:
        y = None
    return {"student_logits": student, "teacher_logits": teacher, "labels": y}


def _with(arguments: dict, **changes) -> dict:
    return {**arguments, **changes}


def _llm_workloads() -> tuple:
    """Every divergence at LLM vocabularies (B = 512, float32, T = 1, no hard
    term: the TRL / Liger setting)."""
    return tuple(
        Workload(f"B512_C{classes}_{div}", {"rows": 512, "classes": classes, "labels": "none"},
                 options={"temperature": 1.0, "divergence": div},
                 notes=f"LLM vocabulary, {div}")
        for classes in (32_000, 128_000) for div in ("kl", "reverse_kl", "jsd", "tvd"))


register(LossSpec(
    name="kd_loss",
    function=kd_loss,
    family="response",
    make_inputs=_kd_inputs,
    reference="response:kd_loss",
    torch="response:kd_loss_torch",
    variants=(
        Variant("no labels, T=2", {"temperature": 2.0}, {"labels": "none"}),
        Variant("index labels, T=3, alpha=0.3", {"temperature": 3.0, "alpha": 0.3}),
        Variant("dense labels, T=1, alpha=0.5", {"temperature": 1.0, "alpha": 0.5},
                {"labels": "dense"}),
        Variant("reverse_kl, no labels, T=2", {"temperature": 2.0, "divergence": "reverse_kl"},
                {"labels": "none"}),
        Variant("reverse_kl, index labels, T=1, alpha=0.3",
                {"temperature": 1.0, "alpha": 0.3, "divergence": "reverse_kl"}),
        Variant("jsd beta=0.3, no labels, T=1",
                {"temperature": 1.0, "divergence": "jsd", "jsd_beta": 0.3}, {"labels": "none"}),
        Variant("jsd beta=0.5, dense labels, T=2, alpha=0.5",
                {"temperature": 2.0, "alpha": 0.5, "divergence": "jsd"}, {"labels": "dense"}),
        Variant("tvd, no labels, T=2", {"temperature": 2.0, "divergence": "tvd"},
                {"labels": "none"}),
        Variant("tvd, index labels, T=1, alpha=0.3",
                {"temperature": 1.0, "alpha": 0.3, "divergence": "tvd"}),
        Variant("standardize, no labels, T=2", {"temperature": 2.0, "standardize": True},
                {"labels": "none"}),
        Variant("standardize, jsd, index labels, T=3, alpha=0.3",
                {"temperature": 3.0, "alpha": 0.3, "standardize": True, "divergence": "jsd",
                 "jsd_beta": 0.7}),
    ),
    medium={"rows": 64, "classes": 1000},
    zero_when_equal=False,  # the hard term stays
    bad_inputs=(
        BadInput("temperature 0", lambda a: _with(a, temperature=0.0), ValueError,
                 "temperature"),
        BadInput("alpha > 1", lambda a: _with(a, alpha=1.5), ValueError, "alpha"),
        BadInput("label out of range",
                 lambda a: _with(a, labels=np.full(a["student_logits"].shape[0], 99)),
                 ValueError, "labels"),
        BadInput("labels of the wrong length",
                 lambda a: _with(a, labels=np.zeros(a["student_logits"].shape[0] + 1, int)),
                 ValueError, "labels"),
        BadInput("soft labels not summing to 1",
                 lambda a: _with(a, labels=np.full(a["student_logits"].shape, 0.5)),
                 ValueError, "labels"),
        BadInput("string labels", lambda a: _with(a, labels=np.array(["a"] * 6)), TypeError,
                 "labels"),
        BadInput("unknown divergence", lambda a: _with(a, divergence="hellinger"), ValueError,
                 "divergence"),
        BadInput("divergence not a string", lambda a: _with(a, divergence=1), TypeError,
                 "divergence"),
        BadInput("jsd_beta 0", lambda a: _with(a, divergence="jsd", jsd_beta=0.0), ValueError,
                 "jsd_beta"),
        BadInput("jsd_beta 1", lambda a: _with(a, divergence="jsd", jsd_beta=1.0), ValueError,
                 "jsd_beta"),
        BadInput("jsd_beta not a number", lambda a: _with(a, jsd_beta="half"), TypeError,
                 "jsd_beta"),
        BadInput("standardize not a bool", lambda a: _with(a, standardize="yes"), TypeError,
                 "standardize"),
        BadInput("standardize with one class",
                 lambda a: _with(a, standardize=True, labels=None,
                                 student_logits=a["student_logits"][:, :1],
                                 teacher_logits=a["teacher_logits"][:, :1]),
                 ValueError, "student_logits"),
    ),
    workloads=(
        Workload("B4096_C1000", {"rows": 4096, "classes": 1000},
                 options={"temperature": 3.0, "alpha": 0.3}, quick=True,
                 notes="headline: loss+grad, int labels, T=3, alpha=0.3"),
        Workload("B4096_C1000", {"rows": 4096, "classes": 1000}, dtype="float64",
                 options={"temperature": 3.0, "alpha": 0.3}, notes="float64"),
        Workload("B256_C10", {"rows": 256, "classes": 10},
                 options={"temperature": 3.0, "alpha": 0.3}, quick=True,
                 notes="small call: per-call overhead"),
        Workload("B64_C32000", {"rows": 64, "classes": 32_000},
                 options={"temperature": 3.0, "alpha": 0.3}, notes="LLM-sized vocabulary"),
        *_llm_workloads(),
    ),
))


def _sparse_inputs(rng, dtype, *, rows=6, classes=7, k=3, labels="none") -> dict:
    """A student and a top-``k`` teacher: the ``k`` largest logits (and their
    columns, unique by construction) of teacher = student + noise."""
    student = (2.0 * rng.standard_normal((rows, classes))).astype(dtype)
    teacher = (student + rng.standard_normal((rows, classes))).astype(dtype)
    idx = np.argpartition(-teacher, k - 1, axis=1)[:, :k] if k < classes else \
        np.tile(np.arange(classes), (rows, 1))
    idx = rng.permuted(idx, axis=1).astype(np.int64)  # order carries no meaning
    if labels == "index":
        y = rng.integers(0, classes, rows, dtype=np.int64)
    elif labels == "dense":
        y = (rng.random((rows, classes)) + 0.1).astype(dtype)
        y /= y.sum(axis=1, keepdims=True)
    else:
        y = None
    return {"student_logits": student,
            "teacher_topk_logits": np.ascontiguousarray(np.take_along_axis(teacher, idx, 1)),
            "teacher_topk_indices": idx, "labels": y}


def _indices_changed(arguments: dict, row: int, col: int, value) -> dict:
    idx = arguments["teacher_topk_indices"].copy()
    idx[row, col] = value if not callable(value) else value(idx)
    return _with(arguments, teacher_topk_indices=idx)


register(LossSpec(
    name="sparse_kd_loss",
    function=sparse_kd_loss,
    family="response",
    make_inputs=_sparse_inputs,
    reference="response:sparse_kd_loss",
    torch="response:sparse_kd_loss_torch",
    variants=(
        Variant("no labels, T=1"),
        Variant("no labels, T=2", {"temperature": 2.0}),
        Variant("index labels, T=3, alpha=0.3", {"temperature": 3.0, "alpha": 0.3},
                {"labels": "index"}),
        Variant("dense labels, T=1, alpha=0.5", {"alpha": 0.5}, {"labels": "dense"}),
    ),
    medium={"rows": 64, "classes": 1000, "k": 64},
    zero_when_equal=False,  # the teacher is (B, K): no "student equals teacher"
    bad_inputs=(
        BadInput("repeated index in a row",
                 lambda a: _indices_changed(a, 2, 1, lambda idx: idx[2, 0]), ValueError,
                 "teacher_topk_indices.*unique.*row 2"),
        BadInput("index == C", lambda a: _indices_changed(a, 3, 0, 7), ValueError,
                 r"teacher_topk_indices.*\[0, 7\).*row 3"),
        BadInput("negative index", lambda a: _indices_changed(a, 0, 2, -1), ValueError,
                 "teacher_topk_indices"),
        BadInput("float indices",
                 lambda a: _with(a, teacher_topk_indices=a["teacher_topk_indices"] * 1.0),
                 TypeError, "teacher_topk_indices"),
        BadInput("indices of another shape",
                 lambda a: _with(a, teacher_topk_indices=a["teacher_topk_indices"][:, :2]),
                 ValueError, "teacher_topk_indices"),
        BadInput("more columns than the student",
                 lambda a: _with(a, teacher_topk_logits=np.zeros((6, 8)),
                                 teacher_topk_indices=np.zeros((6, 8), np.int64)),
                 ValueError, "teacher_topk_logits"),
        BadInput("temperature 0", lambda a: _with(a, temperature=0.0), ValueError,
                 "temperature"),
        BadInput("alpha > 1", lambda a: _with(a, alpha=1.5), ValueError, "alpha"),
        BadInput("label out of range", lambda a: _with(a, labels=np.full(6, 99)), ValueError,
                 "labels"),
    ),
    workloads=(
        Workload("B512_C128000_K64", {"rows": 512, "classes": 128_000, "k": 64},
                 options={"temperature": 1.0},
                 notes="LLM top-K teacher; compare kd_loss/B512_C128000_kl"),
        Workload("B512_C128000_K256", {"rows": 512, "classes": 128_000, "k": 256},
                 options={"temperature": 1.0}, notes="LLM top-K teacher"),
    ),
))
