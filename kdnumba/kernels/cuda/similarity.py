"""Gram-matrix losses (``sp_loss``, ``pkt_loss``) on the GPU: one thread per item.

The CUDA twin of ``kernels.cpu.similarity`` (see its docstring for the math),
with the same launch functions :func:`sp` and :func:`pkt` and the same
arguments, writing into the caller's ``row_loss`` (float64 ``(B,)``, unscaled
row sums) and ``grad``. Everything is float64 on the device whatever the
input dtype (only the gradient is written in the input's dtype), and the
whole ``B x B`` matrices are held: memory O(B^2 + B D) (``tile_rows`` is
accepted for the shared interface and ignored).

Thread mapping:

* ``_gram_kernel``: one thread per ``(i, j)`` -- ``G_ij = a_i . a_j`` summed
  over ``k`` in order (``G_ij`` and ``G_ji`` are the same products: exactly
  symmetric);
* ``_sp_rows_kernel`` / ``_pkt_rows_kernel``: one thread per row -- its
  statistics, loss and row of ``Q`` in the CPU kernels' order;
* ``_product_kernel``: one thread per ``(i, d)`` -- ``sum_j (Q_ij + Q_ji) a_jd``;
* PKT's row normalisation and the chain rule back through it: one thread per row.

Deterministic: no atomics, no cross-thread sums; the per-row partials are
added by :mod:`kdnumba.kernels.cuda.reduce` in a fixed order. Kernels
grid-stride over their items. No ``min``/``max`` builtins (numba 0.68's CUDA
target fails to compile them).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from kdnumba.kernels.cuda import compile_kernel, item_launch

_GRAM_SIG = "void({F}[:, ::1], float64[:, ::1])"
_ROWS_SIG = ("void(float64[:, ::1], float64[:, ::1], float64, float64, float64[::1], "
             "float64[:, ::1])")
_PRODUCT_SIG = "void(float64[:, ::1], {F}[:, ::1], {F}[:, ::1])"
_NORMALIZE_SIG = "void({F}[:, ::1], float64, float64[:, ::1], float64[::1])"
_UNNORMALIZE_SIG = ("void(float64[:, ::1], float64[::1], float64, float64[:, ::1], "
                    "{F}[:, ::1])")

_F64_MAX = 1.7976931348623157e308


def _gram_kernel(a, g):
    n, dim = a.shape
    for p in range(cuda.grid(1), n * n, cuda.gridsize(1)):
        i = p // n
        j = p - i * n
        acc = 0.0
        for k in range(dim):
            acc += np.float64(a[i, k]) * np.float64(a[j, k])
        g[i, j] = acc


def _sp_rows_kernel(gs, gt, eps, scale, row_loss, q):
    n = gs.shape[0]
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        ss = 0.0
        st = 0.0
        for j in range(n):
            ss += gs[i, j] * gs[i, j]
            st += gt[i, j] * gt[i, j]
        norm_s = math.sqrt(ss)
        norm_t = math.sqrt(st)
        inv_s = 1.0 / (norm_s if norm_s > eps else eps)
        inv_t = 1.0 / (norm_t if norm_t > eps else eps)
        loss = 0.0
        nd = 0.0
        for j in range(n):
            ns = gs[i, j] * inv_s
            d = ns - gt[i, j] * inv_t
            loss += d * d
            nd += ns * d
        row_loss[i] = loss
        if not norm_s >= eps:
            nd = 0.0  # the clamp is active: its derivative is 0
        f = 2.0 * scale * inv_s
        for j in range(n):
            ns = gs[i, j] * inv_s
            d = ns - gt[i, j] * inv_t
            q[i, j] = f * (d - ns * nd)


def _pkt_rows_kernel(cs, ct, eps, scale, row_loss, q):
    n = cs.shape[0]
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        sum_s = 0.0
        sum_t = 0.0
        for j in range(n):
            sum_s += 0.5 * (cs[i, j] + 1.0)
            sum_t += 0.5 * (ct[i, j] + 1.0)
        inv_s = 1.0 / sum_s
        inv_t = 1.0 / sum_t
        loss = 0.0
        gp = 0.0
        for j in range(n):
            ps = 0.5 * (cs[i, j] + 1.0) * inv_s
            pt = 0.5 * (ct[i, j] + 1.0) * inv_t
            inv_den = 1.0 / (ps + eps)
            loss += pt * math.log((pt + eps) * inv_den)
            gp -= pt * inv_den * ps
        if not (abs(sum_s) <= _F64_MAX and abs(sum_t) <= _F64_MAX):
            loss = math.nan  # NaN/inf input
        row_loss[i] = loss
        f = 0.5 * scale * inv_s
        for j in range(n):
            ps = 0.5 * (cs[i, j] + 1.0) * inv_s
            pt = 0.5 * (ct[i, j] + 1.0) * inv_t
            q[i, j] = f * (-pt / (ps + eps) - gp)


def _product_kernel(q, a, h):
    n, dim = a.shape
    for p in range(cuda.grid(1), n * dim, cuda.gridsize(1)):
        i = p // dim
        d = p - i * dim
        acc = 0.0
        for j in range(n):
            acc += (q[i, j] + q[j, i]) * np.float64(a[j, d])
        h[i, d] = acc


def _normalize_kernel(x, eps, xh, norms):
    n, dim = x.shape
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        ss = 0.0
        for k in range(dim):
            v = np.float64(x[i, k])
            ss += v * v
        norm = math.sqrt(ss)
        norms[i] = norm
        inv = 1.0 / (norm + eps)
        for k in range(dim):
            xh[i, k] = np.float64(x[i, k]) * inv


def _unnormalize_kernel(xh, norms, eps, h, grad):
    n, dim = xh.shape
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        norm = norms[i]
        c = 0.0
        for k in range(dim):
            c += xh[i, k] * h[i, k]
        coef = c / norm if norm > 0.0 else 0.0
        inv = 1.0 / (norm + eps)
        for k in range(dim):
            grad[i, k] = h[i, k] * inv - xh[i, k] * coef


KERNELS = [
    (_gram_kernel, _GRAM_SIG),
    (_sp_rows_kernel, _ROWS_SIG),
    (_pkt_rows_kernel, _ROWS_SIG),
    (_product_kernel, _PRODUCT_SIG),
    (_normalize_kernel, _NORMALIZE_SIG),
    (_unnormalize_kernel, _UNNORMALIZE_SIG),
]


def _launch(pyfunc, signature, n_items, dtype=None):
    """The kernel configured for ``n_items`` independent items (grid-strided)."""
    return compile_kernel(pyfunc, signature, dtype)[item_launch(n_items)]


def _gram(a):
    n = a.shape[0]
    g = cuda.device_array((n, n), dtype=np.float64)
    _launch(_gram_kernel, _GRAM_SIG, n * n, a.dtype)(a, g)
    return g


# --- the launch functions: the interface of ``kernels.cpu.similarity`` ----------------

def sp(s, t, eps, tile_rows, row_loss, grad):
    """SP row sums into ``row_loss`` and the gradient of their sum over ``B^2``
    into ``grad`` (CPU twin; ``tile_rows`` is ignored)."""
    n = s.shape[0]
    gs, gt = _gram(s), _gram(t)
    q = cuda.device_array((n, n), dtype=np.float64)
    _launch(_sp_rows_kernel, _ROWS_SIG, n)(gs, gt, eps, 1.0 / (n * n), row_loss, q)
    _launch(_product_kernel, _PRODUCT_SIG, grad.size, s.dtype)(q, s, grad)


def pkt(s, t, eps, tile_rows, row_loss, grad):
    """PKT row sums into ``row_loss`` and the gradient of their sum over ``B^2``
    into ``grad`` (CPU twin; ``tile_rows`` is ignored)."""
    n = s.shape[0]
    xs = cuda.device_array(s.shape, dtype=np.float64)
    xt = cuda.device_array(t.shape, dtype=np.float64)
    ns = cuda.device_array(n, dtype=np.float64)
    nt = cuda.device_array(n, dtype=np.float64)
    _launch(_normalize_kernel, _NORMALIZE_SIG, n, s.dtype)(s, eps, xs, ns)
    _launch(_normalize_kernel, _NORMALIZE_SIG, n, t.dtype)(t, eps, xt, nt)
    cs, ct = _gram(xs), _gram(xt)
    q = cuda.device_array((n, n), dtype=np.float64)
    _launch(_pkt_rows_kernel, _ROWS_SIG, n)(cs, ct, eps, 1.0 / (n * n), row_loss, q)
    h = cuda.device_array(s.shape, dtype=np.float64)
    _launch(_product_kernel, _PRODUCT_SIG, h.size, np.float64)(q, xs, h)
    _launch(_unnormalize_kernel, _UNNORMALIZE_SIG, n, s.dtype)(xs, ns, eps, h, grad)
