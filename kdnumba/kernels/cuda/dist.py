"""DIST on the GPU: the CUDA twin of ``kernels.cpu.dist`` (same three launch
functions, arguments and results up to rounding).

* :func:`dist_rows`: one block per row; block max / sums (fixed-shape trees)
  for the two softmaxes, then the centred sums of the row correlation;
* :func:`dist_columns`: one thread per column, summing over the rows in index
  order (coalesced across the threads of a block): deterministic;
* :func:`dist_gradient`: one block per row; ``G`` into the gradient row, a
  block sum of ``<G, y_s>``, then the softmax backward in place.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, types

from kdnumba.kernels.cuda import (block_reductions, block_size, compile_kernel, grid_size,
                                  item_launch)

tree_sum, tree_max = block_reductions(globals())

_ROWS = ("void({F}[:, ::1], {F}[:, ::1], {F}, float64, float64, {F}[:, ::1], {F}[:, ::1], "
         "float64[::1], float64[:, ::1])")
_COLUMNS = "void({F}[:, ::1], {F}[:, ::1], float64, float64, float64[::1], {F}[:, ::1])"
_GRADIENT = ("void({F}[:, ::1], {F}[:, ::1], float64[:, ::1], {F}[:, ::1], {F}, "
             "{F}[:, ::1])")


@cuda.jit(device=True)
def _coefficients(s_ab, s_aa, s_bb, sum_a, sum_b, mean_a, mean_b, n, eps, weight):
    """As ``kernels.cpu.dist.pearson_coefficients``."""
    norm_a = math.sqrt(s_aa)
    norm_b = math.sqrt(s_bb)
    d = norm_a * norm_b + eps
    rho = s_ab / d
    inv_d = 1.0 / d
    k = s_ab * norm_b / (norm_a * d * d) if norm_a > 0.0 else 0.0
    center = (inv_d * sum_b - k * sum_a) / n
    return rho, weight * inv_d, weight * k, -weight * (inv_d * mean_b - k * mean_a + center)


def _rows_kernel(s, t, inv_t, eps, w_row, ys, yt, row_rho, row_coef):
    sh = cuda.shared.array(0, dtype=types.float64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    n_cols = s.shape[1]
    for i in range(cuda.blockIdx.x, s.shape[0], cuda.gridDim.x):
        m_s = -math.inf
        m_t = -math.inf
        for j in range(tid, n_cols, nt):
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
        mx_s = s.dtype.type(sh[0])
        mx_t = s.dtype.type(sh[nt])
        cuda.syncthreads()
        z_s = 0.0
        z_t = 0.0
        for j in range(tid, n_cols, nt):
            z_s += math.exp((s[i, j] - mx_s) * inv_t)
            z_t += math.exp((t[i, j] - mx_t) * inv_t)
        sh[tid] = z_s
        sh[nt + tid] = z_t
        cuda.syncthreads()
        tree_sum(sh, 2, tid, nt)
        r_s = s.dtype.type(1.0 / sh[0])
        r_t = s.dtype.type(1.0 / sh[nt])
        cuda.syncthreads()
        acc_s = 0.0
        acc_t = 0.0
        for j in range(tid, n_cols, nt):
            a = math.exp((s[i, j] - mx_s) * inv_t) * r_s
            b = math.exp((t[i, j] - mx_t) * inv_t) * r_t
            ys[i, j] = a
            yt[i, j] = b
            acc_s += a
            acc_t += b
        sh[tid] = acc_s
        sh[nt + tid] = acc_t
        cuda.syncthreads()
        tree_sum(sh, 2, tid, nt)
        m_a = sh[0] / n_cols
        m_b = sh[nt] / n_cols
        ma = s.dtype.type(m_a)
        mb = s.dtype.type(m_b)
        cuda.syncthreads()
        s_ab = 0.0
        s_aa = 0.0
        s_bb = 0.0
        s_a = 0.0
        s_b = 0.0
        for j in range(tid, n_cols, nt):
            a = np.float64(ys[i, j] - ma)
            b = np.float64(yt[i, j] - mb)
            s_ab += a * b
            s_aa += a * a
            s_bb += b * b
            s_a += a
            s_b += b
        sh[tid] = s_ab
        sh[nt + tid] = s_aa
        sh[2 * nt + tid] = s_bb
        sh[3 * nt + tid] = s_a
        sh[4 * nt + tid] = s_b
        cuda.syncthreads()
        tree_sum(sh, 5, tid, nt)
        if tid == 0:
            rho, p, q, r = _coefficients(sh[0], sh[nt], sh[2 * nt], sh[3 * nt], sh[4 * nt],
                                         m_a, m_b, n_cols, eps, w_row)
            row_rho[i] = rho
            row_coef[i, 0] = p
            row_coef[i, 1] = q
            row_coef[i, 2] = r
        cuda.syncthreads()


def _columns_kernel(ys, yt, eps, w_col, col_rho, col_coef):
    n_rows, n_cols = ys.shape
    start = cuda.grid(1)
    for j in range(start, n_cols, cuda.gridsize(1)):
        m_s = 0.0
        m_t = 0.0
        for i in range(n_rows):
            m_s += ys[i, j]
            m_t += yt[i, j]
        m_s /= n_rows
        m_t /= n_rows
        s_ab = 0.0
        s_aa = 0.0
        s_bb = 0.0
        s_a = 0.0
        s_b = 0.0
        for i in range(n_rows):
            a = ys[i, j] - m_s
            b = yt[i, j] - m_t
            s_ab += a * b
            s_aa += a * a
            s_bb += b * b
            s_a += a
            s_b += b
        rho, p, q, r = _coefficients(s_ab, s_aa, s_bb, s_a, s_b, m_s, m_t, n_rows, eps, w_col)
        col_rho[j] = rho
        col_coef[0, j] = p
        col_coef[1, j] = q
        col_coef[2, j] = r


def _gradient_kernel(ys, yt, row_coef, col_coef, inv_t, grad):
    sh = cuda.shared.array(0, dtype=types.float64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    n_cols = ys.shape[1]
    for i in range(cuda.blockIdx.x, ys.shape[0], cuda.gridDim.x):
        p = ys.dtype.type(row_coef[i, 0])
        q = ys.dtype.type(row_coef[i, 1])
        r = ys.dtype.type(row_coef[i, 2])
        acc = 0.0
        for j in range(tid, n_cols, nt):
            y = ys[i, j]
            g = (q + col_coef[1, j]) * y - (p + col_coef[0, j]) * yt[i, j] - (r + col_coef[2, j])
            grad[i, j] = g
            acc += np.float64(g) * np.float64(y)
        sh[tid] = acc
        cuda.syncthreads()
        tree_sum(sh, 1, tid, nt)
        dot = ys.dtype.type(sh[0])
        cuda.syncthreads()
        for j in range(tid, n_cols, nt):
            grad[i, j] = inv_t * ys[i, j] * (grad[i, j] - dot)


KERNELS = [(_rows_kernel, _ROWS), (_columns_kernel, _COLUMNS), (_gradient_kernel, _GRADIENT)]


def dist_rows(s, t, inv_t, eps, w_row, ys, yt, row_rho, row_coef):
    """See ``kdnumba.kernels.cpu.dist.dist_rows`` (device arrays)."""
    dtype = np.dtype(s.dtype)
    threads = block_size(s.shape[1])
    compile_kernel(_rows_kernel, _ROWS, dtype)[grid_size(s.shape[0]), threads, 0,
                                               5 * threads * 8](
        s, t, dtype.type(inv_t), float(eps), float(w_row), ys, yt, row_rho, row_coef)


def dist_columns(ys, yt, eps, w_col, col_rho, col_coef):
    """See ``kdnumba.kernels.cpu.dist.dist_columns`` (device arrays)."""
    blocks, threads = item_launch(ys.shape[1])
    compile_kernel(_columns_kernel, _COLUMNS, np.dtype(ys.dtype))[blocks, threads](
        ys, yt, float(eps), float(w_col), col_rho, col_coef)


def dist_gradient(ys, yt, row_coef, col_coef, inv_t, grad):
    """See ``kdnumba.kernels.cpu.dist.dist_gradient`` (device arrays)."""
    dtype = np.dtype(ys.dtype)
    threads = block_size(ys.shape[1])
    compile_kernel(_gradient_kernel, _GRADIENT, dtype)[grid_size(ys.shape[0]), threads, 0,
                                                       threads * 8](
        ys, yt, row_coef, col_coef, dtype.type(inv_t), grad)
