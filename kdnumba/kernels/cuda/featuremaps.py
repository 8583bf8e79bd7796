"""NST and HCL on the GPU: one thread per item, float64 inside.

The CUDA twin of ``kernels.cpu.featuremaps`` (see its docstring for the
math), with the same launch functions :func:`nst_rows`, :func:`hcl_rows`
(and :func:`nst_spatial`) and the same arguments.

**NST** always takes the ``C x C`` order (``spatial`` is accepted for the
shared interface and ignored: on a GPU the per-item kernels below are
simple either way, and the ``C x C`` scratch does not grow with ``P``).
Samples go in chunks of at most :data:`NST_CHUNK_DOUBLES` float64 of
scratch (``Cs^2 + Cs Ct + Ct^2 + 2 (Cs + Ct) P`` per sample), never a
``B x C x C`` tensor for a large batch. Per chunk, one thread per item:

* ``_normalize_kernel``: per ``(b, c)`` row, its norm and ``x / max(||x||, eps)``;
* ``_gram_kernel``: per ``(b, i, j)``, ``x_bi . y_bj`` summed over ``P`` in order
  (``M_ss``, ``M_st``, ``M_tt``);
* ``_nst_loss_kernel``: per sample, the three sums of squares in order;
* ``_nst_hat_kernel``: per ``(b, c, p)``, ``4 (M_ss S / Cs^2 - M_st T / (Cs Ct))``;
* ``_nst_chain_kernel``: per ``(b, c)`` row, the chain rule through the normalisation.

**HCL**: ``_hcl_rows_kernel``, one thread per map, its loss partial and the
pooled differences of its bins (in a ``(R, bins)`` float64 scratch);
``_hcl_grad_kernel``, one thread per element.

Deterministic: no atomics, no cross-thread sums; per-row partials are added
by :mod:`kdnumba.kernels.cuda.reduce`. No ``min``/``max`` builtins (numba
0.68's CUDA target fails to compile them).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from kdnumba.kernels.cuda import compile_kernel, is_simulator, item_launch

#: Float64 scratch per NST chunk (64 MiB on a GPU; tiny under the simulator so
#: that the tests run several chunks).
NST_CHUNK_DOUBLES = 64 if is_simulator() else 8 << 20

_NORMALIZE_SIG = "void({F}[:, :, ::1], int64, float64, float64[:, :, ::1], float64[:, ::1])"
_GRAM_SIG = "void(float64[:, :, ::1], float64[:, :, ::1], int64, float64[:, :, ::1])"
_NST_LOSS_SIG = ("void(float64[:, :, ::1], float64[:, :, ::1], float64[:, :, ::1], int64, "
                 "int64, float64, float64[::1])")
_NST_HAT_SIG = ("void(float64[:, :, ::1], float64[:, :, ::1], float64[:, :, ::1], "
                "float64[:, :, ::1], int64, float64[:, :, ::1])")
_NST_CHAIN_SIG = ("void(float64[:, :, ::1], float64[:, :, ::1], float64[:, ::1], int64, "
                  "int64, float64, float64, {F}[:, :, ::1])")
_HCL_ROWS_SIG = ("void({F}[:, :, ::1], {F}[:, :, ::1], int64[::1], float64[::1], "
                 "float64[::1], float64[:, ::1])")
_HCL_GRAD_SIG = ("void({F}[:, :, ::1], {F}[:, :, ::1], int64[::1], float64[::1], "
                 "float64[:, ::1], {F}[:, :, ::1])")


def nst_spatial(cs: int, ct: int, p: int) -> bool:
    """The CPU module's choice (accepted and ignored here: always ``C x C``)."""
    return False


# --- NST ---------------------------------------------------------------------------

def _normalize_kernel(x, b0, eps, xh, norms):
    n_g, n_c, p = xh.shape
    for item in range(cuda.grid(1), n_g * n_c, cuda.gridsize(1)):
        g = item // n_c
        c = item - g * n_c
        ss = 0.0
        for j in range(p):
            v = np.float64(x[b0 + g, c, j])
            ss += v * v
        n = math.sqrt(ss)
        norms[g, c] = n
        inv = 1.0 / (n if n > eps else eps)
        for j in range(p):
            xh[g, c, j] = np.float64(x[b0 + g, c, j]) * inv


def _gram_kernel(a, b, n_g, m):
    ni = a.shape[1]
    nj = b.shape[1]
    p = a.shape[2]
    for item in range(cuda.grid(1), n_g * ni * nj, cuda.gridsize(1)):
        g = item // (ni * nj)
        r = item - g * ni * nj
        i = r // nj
        j = r - i * nj
        acc = 0.0
        for k in range(p):
            acc += a[g, i, k] * b[g, j, k]
        m[g, i, j] = acc


def _nst_loss_kernel(m_ss, m_st, m_tt, n_g, b0, scale, row_loss):
    cs = m_ss.shape[1]
    ct = m_tt.shape[1]
    for g in range(cuda.grid(1), n_g, cuda.gridsize(1)):
        ss = 0.0
        for i in range(cs):
            for j in range(cs):
                ss += m_ss[g, i, j] * m_ss[g, i, j]
        tt = 0.0
        for i in range(ct):
            for j in range(ct):
                tt += m_tt[g, i, j] * m_tt[g, i, j]
        st = 0.0
        for i in range(cs):
            for j in range(ct):
                st += m_st[g, i, j] * m_st[g, i, j]
        inv_s = 1.0 / cs
        inv_t = 1.0 / ct
        row_loss[b0 + g] = scale * ((ss * inv_s * inv_s + tt * inv_t * inv_t)
                                    - 2.0 * st * inv_s * inv_t)


def _nst_hat_kernel(m_ss, m_st, sh, th, n_g, gh):
    cs, p = sh.shape[1], sh.shape[2]
    ct = th.shape[1]
    k_ss = 4.0 / (cs * cs)
    k_st = 4.0 / (cs * ct)
    for item in range(cuda.grid(1), n_g * cs * p, cuda.gridsize(1)):
        g = item // (cs * p)
        r = item - g * cs * p
        c = r // p
        j = r - c * p
        a1 = 0.0
        for k in range(cs):
            a1 += k_ss * m_ss[g, c, k] * sh[g, k, j]
        a2 = 0.0
        for k in range(ct):
            a2 += k_st * m_st[g, c, k] * th[g, k, j]
        gh[g, c, j] = a1 - a2


def _nst_chain_kernel(sh, gh, norms, n_g, b0, eps, scale, grad):
    cs, p = sh.shape[1], sh.shape[2]
    for item in range(cuda.grid(1), n_g * cs, cuda.gridsize(1)):
        g = item // cs
        c = item - g * cs
        n = norms[g, c]
        if n > eps:
            dot = 0.0
            for j in range(p):
                dot += sh[g, c, j] * gh[g, c, j]
            inv = scale / n
            for j in range(p):
                grad[b0 + g, c, j] = inv * (gh[g, c, j] - sh[g, c, j] * dot)
        else:
            inv = scale / eps
            for j in range(p):
                grad[b0 + g, c, j] = inv * gh[g, c, j]


# --- HCL ---------------------------------------------------------------------------

def _hcl_rows_kernel(s, t, levels, coefs, row_loss, pd):
    n_r, h, w = s.shape
    n_lv = coefs.shape[0] - 1
    c0 = coefs[0]
    for r in range(cuda.grid(1), n_r, cuda.gridsize(1)):
        acc = 0.0
        for y in range(h):
            for x in range(w):
                v = np.float64(s[r, y, x]) - np.float64(t[r, y, x])
                acc += v * v
        acc *= c0
        k = 0
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
                            bsum += np.float64(s[r, y, x]) - np.float64(t[r, y, x])
                    area = (y1 - y0) * (x1 - x0)
                    v = bsum / area
                    pd[r, k] = v
                    acc += cl * v * v
                    k += 1
        row_loss[r] = acc


def _hcl_grad_kernel(s, t, levels, coefs, pd, grad):
    n_r, h, w = s.shape
    n_lv = coefs.shape[0] - 1
    c0 = coefs[0]
    for item in range(cuda.grid(1), n_r * h * w, cuda.gridsize(1)):
        r = item // (h * w)
        e = item - r * h * w
        y = e // w
        x = e - y * w
        v = np.float64(s[r, y, x]) - np.float64(t[r, y, x])
        acc = 2.0 * c0 * v
        k = 0
        for lv in range(n_lv):
            lsz = levels[lv]
            cl = coefs[lv + 1]
            for i in range(lsz):
                y0 = (i * h) // lsz
                y1 = ((i + 1) * h + lsz - 1) // lsz
                for j in range(lsz):
                    x0 = (j * w) // lsz
                    x1 = ((j + 1) * w + lsz - 1) // lsz
                    if y0 <= y and y < y1 and x0 <= x and x < x1:
                        area = (y1 - y0) * (x1 - x0)
                        acc += 2.0 * cl * pd[r, k] / area
                    k += 1
        grad[r, y, x] = acc


KERNELS = [
    (_normalize_kernel, _NORMALIZE_SIG),
    (_gram_kernel, _GRAM_SIG),
    (_nst_loss_kernel, _NST_LOSS_SIG),
    (_nst_hat_kernel, _NST_HAT_SIG),
    (_nst_chain_kernel, _NST_CHAIN_SIG),
    (_hcl_rows_kernel, _HCL_ROWS_SIG),
    (_hcl_grad_kernel, _HCL_GRAD_SIG),
]


def _launch(pyfunc, signature, n_items, dtype=None):
    """The kernel configured for ``n_items`` independent items (grid-strided)."""
    return compile_kernel(pyfunc, signature, dtype)[item_launch(n_items)]


# --- the launch functions: the interface of ``kernels.cpu.featuremaps`` --------------

def nst_rows(s, t, spatial, eps, scale, grad, row_loss):
    """NST per sample into ``row_loss`` (``scale * l_b``) and ``grad`` (CPU twin)."""
    n_b, cs, p = s.shape
    ct = t.shape[1]
    per_sample = cs * cs + cs * ct + ct * ct + 2 * (cs + ct) * p
    chunk = int(max(1, min(n_b, NST_CHUNK_DOUBLES // per_sample)))
    f64 = np.float64
    sh = cuda.device_array((chunk, cs, p), dtype=f64)
    th = cuda.device_array((chunk, ct, p), dtype=f64)
    gh = cuda.device_array((chunk, cs, p), dtype=f64)
    ns = cuda.device_array((chunk, cs), dtype=f64)
    nt = cuda.device_array((chunk, ct), dtype=f64)
    m_ss = cuda.device_array((chunk, cs, cs), dtype=f64)
    m_st = cuda.device_array((chunk, cs, ct), dtype=f64)
    m_tt = cuda.device_array((chunk, ct, ct), dtype=f64)
    for b0 in range(0, n_b, chunk):
        n_g = min(chunk, n_b - b0)
        _launch(_normalize_kernel, _NORMALIZE_SIG, n_g * cs, s.dtype)(s, b0, eps, sh, ns)
        _launch(_normalize_kernel, _NORMALIZE_SIG, n_g * ct, t.dtype)(t, b0, eps, th, nt)
        _launch(_gram_kernel, _GRAM_SIG, n_g * cs * cs)(sh, sh, n_g, m_ss)
        _launch(_gram_kernel, _GRAM_SIG, n_g * cs * ct)(sh, th, n_g, m_st)
        _launch(_gram_kernel, _GRAM_SIG, n_g * ct * ct)(th, th, n_g, m_tt)
        _launch(_nst_loss_kernel, _NST_LOSS_SIG, n_g)(m_ss, m_st, m_tt, n_g, b0, scale,
                                                      row_loss)
        _launch(_nst_hat_kernel, _NST_HAT_SIG, n_g * cs * p)(m_ss, m_st, sh, th, n_g, gh)
        _launch(_nst_chain_kernel, _NST_CHAIN_SIG, n_g * cs, grad.dtype)(
            sh, gh, ns, n_g, b0, eps, scale, grad)


def hcl_rows(s, t, levels, coefs, grad, row_loss):
    """HCL per map into ``row_loss`` and ``grad`` (CPU twin)."""
    n_r = s.shape[0]
    n_bins = int(sum(int(lv) ** 2 for lv in levels.copy_to_host()[:coefs.shape[0] - 1]))
    pd = cuda.device_array((n_r, max(1, n_bins)), dtype=np.float64)
    _launch(_hcl_rows_kernel, _HCL_ROWS_SIG, n_r, s.dtype)(s, t, levels, coefs, row_loss, pd)
    _launch(_hcl_grad_kernel, _HCL_GRAD_SIG, grad.size, s.dtype)(s, t, levels, coefs, pd,
                                                                  grad)
