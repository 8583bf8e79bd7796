"""Decoupled KD on the GPU: the CUDA twin of ``kernels.cpu.decoupled``.

:func:`dkd_rows` has the CPU kernel's signature (device arrays) and the same
per-row results up to rounding. One thread block owns one row and reads it
three times (coalesced strides):

1. the non-target maxima ``M_s``, ``M_t`` (tree max over the threads);
2. float64 partial sums ``Z_s = sum_{j != g} e^{(s_j - M_s)/T}``, ``Z_t``
   and ``W = sum_{j != g} e_t,j (d_t,j - d_s,j)`` (tree sum, fixed order);
3. every thread computes the row scalars (the same numbers: same inputs,
   same operations) and writes its columns of the gradient, recomputing the
   exponentials.

The row scalars are those of the CPU module's docstring. A label outside
``[0, C)`` (GPU labels are not checked on the host) gives a NaN row loss and
is never used as an index.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, types

from kdnumba._constants import DKD_MASK
from kdnumba.kernels.cuda import block_reductions, block_size, compile_kernel, grid_size

tree_sum, tree_max = block_reductions(globals())

_SIGNATURE = ("void({F}[:, ::1], {F}[:, ::1], int64[::1], {F}, float64, float64, "
              "float64, float64, {F}[:, ::1], float64[::1])")


@cuda.jit(device=True)
def _logaddexp(a, b):
    m = a if a > b else b  # not max(a, b): this numba-cuda types it as max(iterable)
    return m + math.log(math.exp(a - m) + math.exp(b - m))


def _dkd_kernel(s, t, labels, inv_t, alpha, beta, w, c, grad, row_loss):
    sh = cuda.shared.array(0, dtype=types.float64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    n_cols = s.shape[1]
    inv = np.float64(inv_t)
    for i in range(cuda.blockIdx.x, s.shape[0], cuda.gridDim.x):
        g = labels[i]
        bad = g < 0 or g >= n_cols
        if bad:
            g = 0
        # -- non-target maxima --------------------------------------------------
        m_s = -math.inf
        m_t = -math.inf
        for j in range(tid, n_cols, nt):
            if j != g:
                x = np.float64(s[i, j])
                u = np.float64(t[i, j])
                if x > m_s or x != x:
                    m_s = x
                if u > m_t or u != u:
                    m_t = u
        sh[tid] = m_s
        sh[nt + tid] = m_t
        cuda.syncthreads()
        tree_max(sh, 2, tid, nt)
        big_s = sh[0]
        big_t = sh[nt]
        cuda.syncthreads()
        # -- sums -----------------------------------------------------------------
        z_s = 0.0
        z_t = 0.0
        v = 0.0
        for j in range(tid, n_cols, nt):
            if j != g:
                d_s = (np.float64(s[i, j]) - big_s) * inv
                d_t = (np.float64(t[i, j]) - big_t) * inv
                e_t = math.exp(d_t)
                z_s += math.exp(d_s)
                z_t += e_t
                v += e_t * (d_t - d_s)
        sh[tid] = z_s
        sh[nt + tid] = z_t
        sh[2 * nt + tid] = v
        cuda.syncthreads()
        tree_sum(sh, 3, tid, nt)
        z_s = sh[0]
        z_t = sh[nt]
        v = sh[2 * nt]
        cuda.syncthreads()  # sh is reused by the next row
        # -- row scalars (as kernels.cpu.decoupled.row_terms) ------------------------
        a_s = (np.float64(s[i, g]) - big_s) * inv
        a_t = (np.float64(t[i, g]) - big_t) * inv
        lz_s = math.log(z_s)
        lz_t = math.log(z_t)
        l_s = _logaddexp(a_s, lz_s)
        l_t = _logaddexp(a_t, lz_t)
        lb_s_g = a_s - l_s
        lb_s_r = lz_s - l_s
        lb_t_g = a_t - l_t
        lb_t_r = lz_t - l_t
        b_t_g = math.exp(lb_t_g)
        b_t_r = math.exp(lb_t_r)
        b_s_g = math.exp(lb_s_g)
        b_s_r = math.exp(lb_s_r)
        tckd = b_t_g * (lb_t_g - lb_s_g) + b_t_r * (lb_t_r - lb_s_r)
        delta = b_s_g - b_t_g if b_s_g + b_t_g < 1.0 else b_t_r - b_s_r
        lp_s = _logaddexp(a_s - DKD_MASK, lz_s)
        lp_t = _logaddexp(a_t - DKD_MASK, lz_t)
        e_ls = math.exp(-lp_s)
        e_lt = math.exp(-lp_t)
        pg_s = math.exp(a_s - DKD_MASK - lp_s)
        pg_t = math.exp(a_t - DKD_MASK - lp_t)
        nckd = (e_lt * v + math.exp(lz_t - lp_t) * (lp_s - lp_t)
                + pg_t * (a_t - a_s + lp_s - lp_t))
        if tid == 0:
            # KL >= 0 exactly; clamp rounding, but let a NaN through (bad input is
            # detected from the total; no max(a, b): see _logaddexp)
            loss = w * (alpha * (0.0 if tckd < 0.0 else tckd)
                        + beta * (0.0 if nckd < 0.0 else nckd))
            row_loss[i] = math.nan if bad else loss
        # -- gradient row ------------------------------------------------------------
        c_s = c * (beta * e_ls - alpha * delta / z_s)
        c_t = c * beta * e_lt
        mx_s = s.dtype.type(big_s)
        mx_t = s.dtype.type(big_t)
        for j in range(tid, n_cols, nt):
            if j == g:
                grad[i, j] = c * (alpha * delta + beta * (pg_s - pg_t))
            else:
                grad[i, j] = (c_s * math.exp((s[i, j] - mx_s) * inv_t)
                              - c_t * math.exp((t[i, j] - mx_t) * inv_t))
        cuda.syncthreads()


#: Every kernel of this module with its signature template (``{F}``: float type).
KERNELS = [(_dkd_kernel, _SIGNATURE)]


def dkd_rows(s, t, labels, inv_t, alpha, beta, w, c, grad, row_loss):
    """Fused DKD loss and gradient on the GPU, one thread block per row; the
    parameters of ``kdnumba.kernels.cpu.decoupled.dkd_rows`` as C-contiguous
    device arrays. Launches asynchronously on the default stream."""
    dtype = np.dtype(s.dtype)
    threads = block_size(s.shape[1])
    compile_kernel(_dkd_kernel, _SIGNATURE, dtype)[
        grid_size(s.shape[0]), threads, 0, 3 * threads * 8](
        s, t, labels, dtype.type(inv_t), float(alpha), float(beta), float(w), float(c),
        grad, row_loss)
