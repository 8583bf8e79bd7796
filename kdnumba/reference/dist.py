"""NumPy reference for DIST (``kdnumba.functional.dist_loss``), and the peer's
PyTorch expression."""

from __future__ import annotations

import numpy as np

from kdnumba.reference.response import log_softmax

_EPS = 1e-8


def _pearson_and_grad(a_raw: np.ndarray, b_raw: np.ndarray):
    """Row-wise Pearson correlation of ``a_raw`` and ``b_raw`` (2-D, along axis 1)
    and its gradient with respect to ``a_raw`` (through the centring)."""
    a = a_raw - a_raw.mean(axis=1, keepdims=True)
    b = b_raw - b_raw.mean(axis=1, keepdims=True)
    na = np.sqrt((a * a).sum(axis=1, keepdims=True))
    nb = np.sqrt((b * b).sum(axis=1, keepdims=True))
    d = na * nb + _EPS
    ab = (a * b).sum(axis=1, keepdims=True)
    rho = ab / d
    k = np.where(na > 0, ab * nb / (np.where(na > 0, na, 1.0) * d * d), 0.0)
    g = b / d - k * a
    return rho[:, 0], g - g.mean(axis=1, keepdims=True)


def dist_loss(student_logits, teacher_logits, *, beta=1.0, gamma=1.0, temperature=1.0):
    """``(loss, grad)`` of DIST written from the formulas (``docs/logits.md``)."""
    s = np.asarray(student_logits)
    t = np.asarray(teacher_logits).astype(s.dtype, copy=False)
    n, c = s.shape
    T = temperature
    ys = np.exp(log_softmax(s / T))
    yt = np.exp(log_softmax(t / T))
    rho_rows, g_rows = _pearson_and_grad(ys, yt)
    rho_cols, g_cols = _pearson_and_grad(ys.T, yt.T)
    loss = T * T * (beta * (1 - rho_rows.mean()) + gamma * (1 - rho_cols.mean()))
    g_y = -T * T * (beta / n * g_rows + gamma / c * g_cols.T)
    grad = ys * (g_y - (g_y * ys).sum(axis=1, keepdims=True)) / T
    return float(loss), grad.astype(s.dtype, copy=False)


def dist_loss_torch(student_logits, teacher_logits, *, beta=1.0, gamma=1.0, temperature=1.0):
    """hunto's DIST as a PyTorch expression (tensors in, 0-d tensor out),
    restated from reading ``lib/models/losses/dist_kd.py``."""
    T = temperature
    ys = (student_logits / T).softmax(dim=1)
    yt = (teacher_logits / T).softmax(dim=1)

    def pearson(a, b):
        a = a - a.mean(1, keepdim=True)
        b = b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + _EPS)

    inter = 1 - pearson(ys, yt).mean()
    intra = 1 - pearson(ys.t(), yt.t()).mean()
    return T * T * (beta * inter + gamma * intra)
