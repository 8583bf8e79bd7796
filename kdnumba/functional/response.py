"""Response-based KD as a pure function: :func:`kd_loss`."""

from __future__ import annotations

import numpy as np

from kdnumba import _dispatch, _policy
from kdnumba import _validation as v
from kdnumba.kernels.cpu.reductions import ordered_sum

_LABEL_KINDS = {"none": 0, "index": 1, "dense": 2}
_NO_INDEX = np.zeros(0, dtype=np.int64)


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
    target = _dispatch.resolve_device(device, student_logits, teacher_logits, labels)
    if target == "cuda":
        from kdnumba import _cuda_paths  # imports numba.cuda: CUDA path only
        return _cuda_paths.kd_loss(student_logits, teacher_logits, labels,
                                   temperature=temperature, alpha=alpha, out=out)
    s = v.as_float_array(student_logits, "student_logits", ndim=2)
    t = v.as_float_array(teacher_logits, "teacher_logits", ndim=2, dtype=s.dtype)
    v.check_same_shape(s, t, "student_logits", "teacher_logits")
    n_rows, n_cols = s.shape
    kind, y = v.as_labels(labels, "labels", n_rows, n_cols, s.dtype)
    grad = v.gradient_buffer(out, s, (student_logits, teacher_logits, labels))

    kernels = _dispatch.kernels("softmax_kl", target)
    row_loss = np.empty(n_rows, dtype=np.float64)
    scalar = s.dtype.type
    with _policy.kernel_launch(s.size):
        kernels.kd_rows(
            s, t,
            y if kind == "index" else _NO_INDEX,
            y if kind == "dense" else np.zeros((0, 0), dtype=s.dtype),
            _LABEL_KINDS[kind],
            scalar(1.0 / temperature),
            *kernel_weights(kind, temperature, alpha, n_rows),
            grad, row_loss)
    loss = ordered_sum(row_loss)
    if not np.isfinite(loss):
        v.raise_non_finite([("student_logits", s), ("teacher_logits", t),
                            ("labels", y if kind == "dense" else None)])
    return float(loss), grad


def kernel_weights(kind: str, temperature: float, alpha: float, n_rows: int) -> tuple:
    """``(w_soft, w_hard, c_soft, c_hard)`` of the ``kd_rows`` kernels (CPU and
    CUDA): the loss weights ``(1-alpha) T^2 / B`` and ``alpha / B`` of the KL
    and CE terms, and their gradient weights ``(1-alpha) T / B`` and
    ``alpha / B``; without labels (``kind == "none"``) ``alpha`` is 0."""
    if kind == "none":
        alpha = 0.0
    return ((1.0 - alpha) * temperature * temperature / n_rows, alpha / n_rows,
            (1.0 - alpha) * temperature / n_rows, alpha / n_rows)
