"""Feature-map losses over ``(B, C, H, W)`` maps: NST and ReviewKD's HCL.

**NST** (:func:`nst_rows`). Per sample, ``S`` (``Cs x P``) and ``T``
(``Ct x P``) are the maps flattened over space (``P = H W``) with each row
L2-normalised (``x / max(||x||, EPS)``). With the squared polynomial kernel
``k(x, y) = (x . y)^2`` the per-sample loss is::

    l = 1/Cs^2 sum_{a,k} (s_a.s_k)^2 + 1/Ct^2 sum_{a,k} (t_a.t_k)^2 - 2/(Cs Ct) sum_{a,k} (s_a.t_k)^2

and it never needs a ``C x C x P`` product tensor (the peer's broadcast).
Two orders of operations give it exactly, and the kernel takes the cheaper:

* *spatial* (``P x P`` Grams): ``sum (x_a . y_k)^2 = <X^T X, Y^T Y>_F``, so
  ``l = || S^T S / Cs - T^T T / Ct ||_F^2``; with ``D`` that difference,
  ``d l / d S = 4/Cs S D``. Work ``(Cs + Ct) P^2 / 2`` (symmetric Grams) +
  ``Cs P^2``; scratch ``2 P^2 + (2 Cs + Ct) P`` float64 per thread.
* *channel* (``C x C`` Grams): ``M_ss = S S^T``, ``M_st = S T^T`` and the
  sum of squares of ``T T^T`` (never stored); ``d l / d S = 4 (M_ss S / Cs^2 -
  M_st T / (Cs Ct))``. Work ``(1.5 Cs^2 + 0.5 Ct^2 + 2 Cs Ct) P``; scratch
  ``Cs^2 + Cs Ct + (2 Cs + Ct) P`` float64 per thread.

:func:`nst_spatial` compares the two work counts. Either way the scratch is
per thread (one sample at a time), never ``B x C x C``. Then the chain rule
through the clamped normalisation, per row ``c``::

    d s_hat / d s = (I - s_hat s_hat^T) / ||s||     if ||s|| > EPS
                  = I / EPS                           otherwise

Everything after the input read is float64. One sample per ``prange``
iteration writes its own loss partial: bit-identical for any thread count.

**HCL** (:func:`hcl_rows`). Per ``(b, c)`` map ``d = s - t`` (``H x W``),
the loss partial ``c0 sum d^2 + sum_l c_l sum_bins mean_bin(d)^2`` with
PyTorch's adaptive-pooling bins at level ``l``: rows
``[floor(i H / l), ceil((i + 1) H / l))`` and likewise columns (bins may
overlap when ``l`` does not divide the size); the gradient
``2 c0 d + sum_l sum_{bins containing the element} 2 c_l mean_bin(d) / |bin|``.
Pooling the difference equals the peer's difference of pooled maps
(pooling is linear) up to rounding. Rows go in fixed chunks, one partial
per row: deterministic.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from kdnumba._policy import callee, jit, parallel_jit
from kdnumba.kernels.cpu.reductions import lane_dot


def nst_spatial(cs: int, ct: int, p: int) -> bool:
    """Whether the ``P x P`` (spatial) order does less work than the ``C x C`` one."""
    spatial = p * (1.5 * cs + 0.5 * ct)
    channel = 1.5 * cs * cs + 0.5 * ct * ct + 2.0 * cs * ct
    return spatial <= channel


@parallel_jit
def nst_rows(s, t, spatial, eps, scale, grad, row_loss):
    """NST per sample.

    Parameters (``F`` the dtype of ``s``):
        s: ``(B, Cs, P)`` F; t: ``(B, Ct, P)`` F (C-contiguous).
        spatial: bool, the order of operations (see :func:`nst_spatial`).
        eps: float, the norm clamp.
        scale: float, factor of loss and gradient (``1 / B`` for the batch mean).
        grad: ``(B, Cs, P)`` F output, ``scale * d l_b / d s_b``.
        row_loss: ``(B,)`` float64 output, ``scale * l_b``.
    """
    n_b, cs, p = s.shape
    ct = t.shape[1]
    for b in prange(n_b):
        sh = np.empty((cs, p), dtype=np.float64)
        th = np.empty((ct, p), dtype=np.float64)
        s_norm = np.empty(cs, dtype=np.float64)
        _normalise(s[b], eps, sh, s_norm)
        _normalise(t[b], eps, th, np.empty(ct, dtype=np.float64))
        gh = np.zeros((cs, p), dtype=np.float64)  # d l / d s_hat
        if spatial:
            loss = _nst_spatial_sample(sh, th, gh)
        else:
            loss = _nst_channel_sample(sh, th, gh)
        row_loss[b] = scale * loss
        g_b = grad[b]
        for c in range(cs):
            g = gh[c]
            x = sh[c]
            n = s_norm[c]
            if n > eps:
                dot = 0.0
                for j in range(p):
                    dot += x[j] * g[j]
                inv = scale / n
                for j in range(p):
                    g_b[c, j] = inv * (g[j] - x[j] * dot)
            else:
                inv = scale / eps
                for j in range(p):
                    g_b[c, j] = inv * g[j]


@jit
def _normalise(x, eps, xh, norms):
    """Rows of ``x`` (``C x P``) normalised into float64 ``xh``; raw norms into ``norms``."""
    c_n, p = x.shape
    for c in range(c_n):
        row = xh[c]
        for j in range(p):
            row[j] = x[c, j]
        n = np.sqrt(lane_dot(row, row))
        norms[c] = n
        inv = 1.0 / max(n, eps)
        for j in range(p):
            row[j] *= inv


@callee
def _upper_gram(x, out):
    """``out[i, j] += sum_c x[c, i] x[c, j]`` for ``j >= i`` (``x``: ``C x P``)."""
    c_n, p = x.shape
    for c in range(c_n):
        row = x[c]
        for i in range(p):
            xi = row[i]
            o = out[i]
            for j in range(i, p):
                o[j] += xi * row[j]


@callee
def _nst_spatial_sample(sh, th, gh):
    """``l = ||S^T S / Cs - T^T T / Ct||^2``; ``gh += 4/Cs S D``; returns ``l``."""
    cs, p = sh.shape
    ct = th.shape[0]
    a = np.zeros((p, p), dtype=np.float64)
    d = np.zeros((p, p), dtype=np.float64)
    _upper_gram(sh, a)
    _upper_gram(th, d)
    inv_s = 1.0 / cs
    inv_t = 1.0 / ct
    for i in range(p):
        for j in range(i, p):
            v = a[i, j] * inv_s - d[i, j] * inv_t
            d[i, j] = v
            d[j, i] = v
    loss = 0.0
    for i in range(p):
        loss += lane_dot(d[i], d[i])
    k = 4.0 * inv_s
    for c in range(cs):
        x = sh[c]
        g = gh[c]
        for i in range(p):
            xi = k * x[i]
            di = d[i]
            for j in range(p):
                g[j] += xi * di[j]
    return loss


@callee
def _nst_channel_sample(sh, th, gh):
    """The ``C x C`` order: ``l`` from ``M_ss``, ``M_st`` and ``||T T^T||^2``;
    ``gh = 4 (M_ss S / Cs^2 - M_st T / (Cs Ct))``; returns ``l``."""
    cs, p = sh.shape
    ct = th.shape[0]
    m_ss = np.empty((cs, cs), dtype=np.float64)
    m_st = np.empty((cs, ct), dtype=np.float64)
    ss = 0.0
    for a in range(cs):
        v = lane_dot(sh[a], sh[a])
        m_ss[a, a] = v
        off = 0.0
        for k in range(a + 1, cs):
            v2 = lane_dot(sh[a], sh[k])
            m_ss[a, k] = v2
            m_ss[k, a] = v2
            off += v2 * v2
        ss += v * v + 2.0 * off
    tt = 0.0
    for a in range(ct):
        v = lane_dot(th[a], th[a])
        off = 0.0
        for k in range(a + 1, ct):
            v2 = lane_dot(th[a], th[k])
            off += v2 * v2
        tt += v * v + 2.0 * off
    st = 0.0
    for a in range(cs):
        for k in range(ct):
            v = lane_dot(sh[a], th[k])
            m_st[a, k] = v
            st += v * v
    inv_s = 1.0 / cs
    inv_t = 1.0 / ct
    loss = (ss * inv_s * inv_s + tt * inv_t * inv_t) - 2.0 * st * inv_s * inv_t
    k_ss = 4.0 * inv_s * inv_s
    k_st = 4.0 * inv_s * inv_t
    g2 = np.empty(p, dtype=np.float64)
    for c in range(cs):
        g = gh[c]
        for k in range(cs):
            w = k_ss * m_ss[c, k]
            x = sh[k]
            for j in range(p):
                g[j] += w * x[j]
        g2[:] = 0.0
        for k in range(ct):
            w = k_st * m_st[c, k]
            y = th[k]
            for j in range(p):
                g2[j] += w * y[j]
        for j in range(p):
            g[j] -= g2[j]
    return loss


# --- HCL -------------------------------------------------------------------------------

#: Maps per parallel task (scratch reused across a chunk).
_HCL_CHUNK = 64


@parallel_jit
def hcl_rows(s, t, levels, coefs, grad, row_loss):
    """HCL per ``(b, c)`` map.

    Parameters (``F`` the dtype of ``s``):
        s, t: ``(R, H, W)`` F, C-contiguous (``R = B C``).
        levels: int64, the pooled sizes in use (the first ``L``; padded to
            at least one entry so that no array is empty).
        coefs: ``(L + 1,)`` float64: ``c0`` for the full-resolution MSE, then
            ``c_l`` per level (weight / element count / total weight).
        grad: ``(R, H, W)`` F output.
        row_loss: ``(R,)`` float64 output, each map's loss partial.
    """
    n_r, h, w = s.shape
    n_lv = coefs.shape[0] - 1
    c0 = coefs[0]
    for ch in prange((n_r + _HCL_CHUNK - 1) // _HCL_CHUNK):
        d = np.empty((h, w), dtype=np.float64)
        g = np.empty((h, w), dtype=np.float64)
        r1 = min(n_r, (ch + 1) * _HCL_CHUNK)
        for r in range(ch * _HCL_CHUNK, r1):
            acc = 0.0
            for y in range(h):
                for x in range(w):
                    v = np.float64(s[r, y, x]) - np.float64(t[r, y, x])
                    d[y, x] = v
                    g[y, x] = 2.0 * c0 * v
            for y in range(h):
                acc += lane_dot(d[y], d[y])
            acc *= c0
            for lv in range(n_lv):
                lsz = levels[lv]
                cl = coefs[lv + 1]
                for i in range(lsz):
                    y0 = (i * h) // lsz
                    y1 = ((i + 1) * h + lsz - 1) // lsz
                    for j in range(lsz):
                        x0 = (j * w) // lsz
                        x1 = ((j + 1) * w + lsz - 1) // lsz
                        bsum = 0.0
                        for y in range(y0, y1):
                            for x in range(x0, x1):
                                bsum += d[y, x]
                        area = (y1 - y0) * (x1 - x0)
                        pd = bsum / area
                        acc += cl * pd * pd
                        gv = 2.0 * cl * pd / area
                        for y in range(y0, y1):
                            for x in range(x0, x1):
                                g[y, x] += gv
            row_loss[r] = acc
            for y in range(h):
                for x in range(w):
                    grad[r, y, x] = g[y, x]
