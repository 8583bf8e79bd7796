"""Response-based KD as a pure function: :func:`kd_loss`."""

from __future__ import annotations

import numpy as np

from kdnumba import _dispatch
from kdnumba import _validation as v
from kdnumba._constants import LABEL_CODES
from kdnumba.registry import BadInput, LossSpec, Variant, Workload, register


def kd_loss(student_logits, teacher_logits, labels=None, *, temperature=3.0, alpha=0.3,
            device="auto", out=None):
    r"""Knowledge-distillation loss (Hinton et al. 2015) and its exact gradient.

    With ``p^T(z) = softmax(z / T)`` row-wise and ``B`` rows::

        soft = T^2 / B * sum_i KL(p^T(t_i) || p^T(s_i))
        hard = 1 / B  * sum_i CE(softmax(s_i), y_i)      CE = -sum_j y_ij log softmax(s_i)_j
        loss = alpha * hard + (1 - alpha) * soft         (labels given)
        loss = soft                                      (labels is None)

    and the gradient with respect to the student logits::

        d loss / d s_i = alpha/B * (sum(y_i) softmax(s_i) - y_i)
                         + (1 - alpha) * T / B * (p^T(s_i) - p^T(t_i))

    (``sum(y_i) = 1`` for valid labels; with ``labels=None`` read ``alpha = 0``).

    Computed in one fused pass over each row (stable log-sum-exp, sums in
    float64), in the student's dtype (float32 or float64). Known limit: in
    float32 the *loss value* loses accuracy for ``T >= 1e3`` (the T^2-scaled
    KL cancels; the gradient stays accurate); use float64 there.

    Args:
        student_logits: ``(B, C)`` float array.
        teacher_logits: ``(B, C)`` float array; cast to the student's dtype.
        labels: ``None``, integer class indices ``(B,)`` in ``[0, C)``, or
            float one-hot/soft targets ``(B, C)`` whose rows sum to 1.
        temperature: ``T > 0``.
        alpha: weight of the hard term, in ``[0, 1]``.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        out: optional C-contiguous ``(B, C)`` array of the student's dtype to
            receive the gradient (saves an allocation in training loops).

    Returns:
        ``(loss, grad)``: a Python float and a ``(B, C)`` array.

    Raises:
        TypeError: non-float logits (int, bool, float16, complex), bad label dtype.
        ValueError: shape/batch mismatch, empty batch, NaN/inf, labels out of
            range, ``temperature <= 0``, ``alpha`` outside ``[0, 1]``.
    """
    temperature = v.check_positive(temperature, "temperature")
    alpha = v.check_unit_interval(alpha, "alpha")
    be = _dispatch.backend(device, student_logits, teacher_logits, labels)
    s = be.float_array(student_logits, "student_logits", ndim=2)
    t = be.float_array(teacher_logits, "teacher_logits", ndim=2, dtype=s.dtype)
    v.check_same_shape(s, t, "student_logits", "teacher_logits")
    n_rows, n_cols = s.shape
    dtype = np.dtype(s.dtype)
    kind, y = be.labels(labels, "labels", n_rows, n_cols, dtype)
    grad = be.gradient_buffer(out, s, (student_logits, teacher_logits, labels, t, y))
    row_loss = be.empty(n_rows, np.float64)
    with be.launch(n_rows * n_cols):
        be.kernels("softmax_kl").kd_rows(
            s, t,
            y if kind == "index" else be.placeholder(1, np.int64),
            y if kind == "dense" else be.placeholder(2, dtype),
            LABEL_CODES[kind],
            dtype.type(1.0 / temperature),
            *kernel_weights(kind, temperature, alpha, n_rows),
            grad, row_loss)
    loss = be.total(row_loss)
    if not np.isfinite(loss):
        if kind != "none":  # GPU labels are range-checked by the kernel only
            v.as_labels(be.to_host(y), "labels", n_rows, n_cols, dtype)
        be.check_finite(loss, [("student_logits", s), ("teacher_logits", t),
                               ("labels", y if kind == "dense" else None)])
    return loss, be.deliver(grad, out)


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
    ),
))
