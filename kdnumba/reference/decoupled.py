"""NumPy reference for decoupled KD (``kdnumba.functional.dkd_loss``), and the
peer's PyTorch expression."""

from __future__ import annotations

import numpy as np

from kdnumba.reference.response import log_softmax


def _logsumexp(u: np.ndarray) -> np.ndarray:
    m = u.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(u - m).sum(axis=1, keepdims=True)))[:, 0]


def _standardize(z: np.ndarray):
    """``((z - mean) / (std + 1e-7), std)`` per row, std unbiased."""
    x = z - z.mean(axis=1, keepdims=True)
    std = np.sqrt((x * x).sum(axis=1, keepdims=True) / (z.shape[1] - 1))
    return x / (std + 1e-7), std


def standardize_vjp(g: np.ndarray, y: np.ndarray, std: np.ndarray) -> np.ndarray:
    """d/dz of a loss with d/dy = ``g`` (through the mean and the std)."""
    c = g.shape[1]
    safe = np.where(std > 0, std, 1.0)
    coef = np.where(std > 0, (g * y).sum(axis=1, keepdims=True) / ((c - 1) * safe), 0.0)
    return (g - g.mean(axis=1, keepdims=True)) / (std + 1e-7) - coef * y


def dkd_loss(student_logits, teacher_logits, labels, *, alpha=1.0, beta=8.0,
             temperature=4.0, standardize=False):
    """``(loss, grad)`` of mdistiller's DKD written from the formulas (see
    ``docs/logits.md``): TCKD on the binary target/rest split, NCKD on
    ``softmax(z/T - 1000 e_g)``; optional logit standardisation first."""
    standardize_rows = standardize
    s_raw = np.asarray(student_logits)
    t = np.asarray(teacher_logits).astype(s_raw.dtype, copy=False)
    y = np.asarray(labels)
    n, c = s_raw.shape
    rows = np.arange(n)
    if standardize_rows:
        s, s_std = _standardize(s_raw)
        t, _ = _standardize(t)
    else:
        s = s_raw
    T = temperature
    u_s, u_t = s / T, t / T
    gt = np.zeros_like(s, dtype=bool)
    gt[rows, y] = True

    # TCKD: the binary split from logs of sums
    lse_s, lse_t = _logsumexp(u_s), _logsumexp(u_t)
    rest_s = _logsumexp(np.where(gt, -np.inf, u_s))
    rest_t = _logsumexp(np.where(gt, -np.inf, u_t))
    lb_s = np.stack([u_s[rows, y] - lse_s, rest_s - lse_s], axis=1)
    lb_t = np.stack([u_t[rows, y] - lse_t, rest_t - lse_t], axis=1)
    b_s, b_t = np.exp(lb_s), np.exp(lb_t)
    tckd = np.sum(b_t * (lb_t - lb_s))
    # NCKD: the peer's -1000 mask on the scaled target logit
    lp_s = log_softmax(u_s - 1000.0 * gt)
    lp_t = log_softmax(u_t - 1000.0 * gt)
    p_s2, p_t2 = np.exp(lp_s), np.exp(lp_t)
    nckd = np.sum(p_t2 * (lp_t - lp_s))
    loss = T * T / n * (alpha * tckd + beta * nckd)

    # gradient with respect to u_s, then s
    q_s = np.exp(np.where(gt, -np.inf, u_s) - rest_s[:, None])  # non-target softmax
    delta = (b_s[:, 0] - b_t[:, 0])[:, None]
    g_tckd = np.where(gt, delta, -delta * q_s)
    g_nckd = p_s2 - p_t2
    grad = T / n * (alpha * g_tckd + beta * g_nckd)
    if standardize_rows:
        grad = standardize_vjp(grad, s, s_std)
    return float(loss), grad.astype(s_raw.dtype, copy=False)


def dkd_loss_torch(student_logits, teacher_logits, labels, *, alpha=1.0, beta=8.0,
                   temperature=4.0, standardize=False):
    """mdistiller's ``dkd_loss`` as a PyTorch expression (tensors in, 0-d tensor
    out), with the logit-standardisation repo's ``normalize`` when
    ``standardize``. Restated from reading the peer (not vendored): masks from
    the labels, ``torch.log`` of the masked probability sums, ``-1000`` on the
    scaled target logit, ``kl_div(..., reduction="sum") * T^2 / B``. Like the
    peer it returns inf once a probability underflows."""
    import torch
    import torch.nn.functional as F

    s, t, T = student_logits, teacher_logits, temperature
    if standardize:
        s = (s - s.mean(dim=-1, keepdim=True)) / (1e-7 + s.std(dim=-1, keepdim=True))
        t = (t - t.mean(dim=-1, keepdim=True)) / (1e-7 + t.std(dim=-1, keepdim=True))
    gt = torch.zeros_like(s).scatter_(1, labels.reshape(-1, 1), 1.0)
    other = 1.0 - gt
    p_s = F.softmax(s / T, dim=1)
    p_t = F.softmax(t / T, dim=1)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * other).sum(1)], dim=1)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * other).sum(1)], dim=1)
    n = s.shape[0]
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * T ** 2 / n
    nckd = F.kl_div(F.log_softmax(s / T - 1000.0 * gt, dim=1),
                    F.softmax(t / T - 1000.0 * gt, dim=1), reduction="sum") * T ** 2 / n
    return alpha * tckd + beta * nckd
