"""NumPy reference for response-based KD (``kdnumba.functional.kd_loss``)."""

from __future__ import annotations

import numpy as np


def log_softmax(z: np.ndarray) -> np.ndarray:
    """``log softmax`` over the last axis (the rows of a matrix) via the
    max-shifted log-sum-exp."""
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kd_loss(student_logits, teacher_logits, labels=None, *, temperature=3.0, alpha=0.3):
    """``(loss, grad)`` of Hinton KD, written directly from the formulas."""
    s = np.asarray(student_logits)
    t = np.asarray(teacher_logits).astype(s.dtype, copy=False)
    n_rows, n_classes = s.shape
    T = s.dtype.type(temperature)

    log_p_s_T = log_softmax(s / T)
    log_p_t_T = log_softmax(t / T)
    p_s_T = np.exp(log_p_s_T)
    p_t_T = np.exp(log_p_t_T)
    soft = T * T * np.sum(p_t_T * (log_p_t_T - log_p_s_T)) / n_rows
    soft_grad = T * (p_s_T - p_t_T) / n_rows
    if labels is None:
        return float(soft), soft_grad

    y = np.asarray(labels)
    if y.ndim == 1:  # class indices -> one-hot
        one_hot = np.zeros_like(s)
        one_hot[np.arange(n_rows), y] = 1
        y = one_hot
    y = y.astype(s.dtype, copy=False)
    log_p_s = log_softmax(s)
    hard = -np.sum(y * log_p_s) / n_rows
    hard_grad = (np.exp(log_p_s) * y.sum(axis=1, keepdims=True) - y) / n_rows
    loss = alpha * hard + (1 - alpha) * soft
    grad = alpha * hard_grad + (1 - alpha) * soft_grad
    return float(loss), grad.astype(s.dtype, copy=False)


def kd_loss_torch(student_logits, teacher_logits, labels=None, *, temperature=3.0, alpha=0.3):
    """The same loss as a PyTorch expression (tensors in, 0-d tensor out), the way
    PyTorch users write it::

        T^2 KL(softmax(t/T) || softmax(s/T)) (batchmean), times (1 - alpha),
        plus alpha * F.cross_entropy(s, y)       (labels given)

    ``labels``: ``None``, int64 class indices or float target rows. Imports
    torch only when called (benchmarks and bridge tests).
    """
    import torch.nn.functional as F

    s, t = student_logits, teacher_logits
    T = temperature
    soft = F.kl_div(F.log_softmax(s / T, dim=1), F.log_softmax(t / T, dim=1),
                    log_target=True, reduction="batchmean") * (T * T)
    if labels is None:
        return soft
    return alpha * F.cross_entropy(s, labels) + (1.0 - alpha) * soft
