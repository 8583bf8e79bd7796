"""NumPy references for NST and HCL (``kdnumba.functional.nst_loss`` / ``hcl_loss``),
and their PyTorch expressions (the peers' formulas, on tensors).

The NumPy versions follow the formulas literally: NST builds the three
``B x C x C`` kernel matrices, HCL pools with explicit loops over
PyTorch's adaptive-pooling bins; gradients by the chain rule written out.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-12


def _normalise(x):
    """``(x / max(||x||, eps), ||x||)`` over the last axis."""
    n = np.sqrt((x * x).sum(axis=-1, keepdims=True))
    return x / np.maximum(n, _EPS), n


def nst_loss(student_feats, teacher_feats):
    """``mean K(t,t) + mean K(s,s) - 2 mean K(s,t)``, ``K(x,y)_bjk = (x_bj . y_bk)^2``."""
    s = np.asarray(student_feats)
    dtype = s.dtype
    s = s.astype(np.float64)
    t = np.asarray(teacher_feats).astype(dtype).astype(np.float64)
    b, cs = s.shape[:2]
    ct = t.shape[1]
    sh, ns = _normalise(s.reshape(b, cs, -1))
    th, _ = _normalise(t.reshape(b, ct, -1))
    m_ss = np.einsum("bip,bjp->bij", sh, sh)
    m_tt = np.einsum("bip,bjp->bij", th, th)
    m_st = np.einsum("bip,bjp->bij", sh, th)
    loss = (m_tt ** 2).mean() + (m_ss ** 2).mean() - 2 * (m_st ** 2).mean()
    # d/d sh: mean over B Cs Cs of M_ss^2 -> 4 M_ss sh / (B Cs^2); the cross term likewise.
    g_hat = (4 * np.einsum("bij,bjp->bip", m_ss, sh) / (b * cs * cs)
             - 4 * np.einsum("bij,bjp->bip", m_st, th) / (b * cs * ct))
    dot = (g_hat * sh).sum(axis=-1, keepdims=True)
    grad = np.where(ns > _EPS, (g_hat - sh * dot) / np.maximum(ns, _EPS), g_hat / _EPS)
    return float(loss), grad.reshape(s.shape).astype(dtype)


def _bins(n: int, level: int):
    """PyTorch's adaptive-average-pooling bins of an axis of size ``n``."""
    return [((i * n) // level, -(-((i + 1) * n) // level)) for i in range(level)]


def _pool(x, level):
    """``adaptive_avg_pool2d(x, (level, level))`` for ``(B, C, H, W)``."""
    out = np.empty(x.shape[:2] + (level, level))
    for i, (y0, y1) in enumerate(_bins(x.shape[2], level)):
        for j, (x0, x1) in enumerate(_bins(x.shape[3], level)):
            out[:, :, i, j] = x[:, :, y0:y1, x0:x1].mean(axis=(2, 3))
    return out


def _unpool(g, shape):
    """Adjoint of :func:`_pool`: each bin's gradient spread evenly over its bin."""
    level = g.shape[2]
    out = np.zeros(shape)
    for i, (y0, y1) in enumerate(_bins(shape[2], level)):
        for j, (x0, x1) in enumerate(_bins(shape[3], level)):
            out[:, :, y0:y1, x0:x1] += (g[:, :, i, j] / ((y1 - y0) * (x1 - x0)))[:, :, None, None]
    return out


def hcl_loss(student_feats, teacher_feats):
    """ReviewKD's HCL: ``(mse + sum_l w_l mse(pool_l)) / (1 + sum_l w_l)``, ``w = 1/2, 1/4, 1/8``
    for the levels 4, 2, 1 that are smaller than ``H``."""
    s = np.asarray(student_feats)
    dtype = s.dtype
    s = s.astype(np.float64)
    t = np.asarray(teacher_feats).astype(dtype).astype(np.float64)
    loss = ((s - t) ** 2).mean()
    grad = 2 * (s - t) / s.size
    cnt, tot = 1.0, 1.0
    for level in (4, 2, 1):
        if level >= s.shape[2]:
            continue
        ps, pt = _pool(s, level), _pool(t, level)
        cnt /= 2.0
        loss += ((ps - pt) ** 2).mean() * cnt
        grad += _unpool(2 * (ps - pt) / ps.size * cnt, s.shape)
        tot += cnt
    return float(loss / tot), (grad / tot).astype(dtype)


def nst_loss_torch(student_feats, teacher_feats):
    """RepDistiller ``NSTLoss.nst_loss`` for equal spatial sizes, on tensors: the
    broadcast polynomial kernel, ``full_loss=True`` (teacher term detached)."""
    import torch.nn.functional as F

    def poly_kernel(a, b):
        return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)

    f_s = F.normalize(student_feats.view(student_feats.shape[0], student_feats.shape[1], -1),
                      dim=2)
    f_t = F.normalize(teacher_feats.view(teacher_feats.shape[0], teacher_feats.shape[1], -1),
                      dim=2)
    return (poly_kernel(f_t, f_t).mean().detach() + poly_kernel(f_s, f_s).mean()
            - 2 * poly_kernel(f_s, f_t).mean())


def hcl_loss_torch(student_feats, teacher_feats):
    """mdistiller ``hcl_loss`` for one pair, on tensors."""
    import torch.nn.functional as F

    h = student_feats.shape[2]
    loss = F.mse_loss(student_feats, teacher_feats, reduction="mean")
    cnt, tot = 1.0, 1.0
    for level in (4, 2, 1):
        if level >= h:
            continue
        cnt /= 2.0
        loss = loss + F.mse_loss(F.adaptive_avg_pool2d(student_feats, (level, level)),
                                 F.adaptive_avg_pool2d(teacher_feats, (level, level)),
                                 reduction="mean") * cnt
        tot += cnt
    return loss / tot
