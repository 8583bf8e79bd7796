"""Logit standardisation on the GPU: the CUDA twin of ``kernels.cpu.standardize``.

Same launch functions, arguments and results (up to rounding). One thread
block owns one row; its threads stride over the columns (coalesced) and
combine float64 partials with the fixed-shape shared-memory tree, so results
do not depend on the run:

* forward: block sum -> ``mean``; block sum of ``(z - mean)^2`` -> ``sigma``;
  then ``y = (z - mean) / (sigma + eps)``;
* backward: block sums of ``g`` and ``g * y``, then
  ``out = (g - mean(g)) / (sigma + eps) - (g . y) y / ((C - 1) sigma)``
  (second term 0 when ``sigma = 0``).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, types

from kdnumba.kernels.cuda import block_reductions, block_size, compile_kernel, grid_size

tree_sum, _ = block_reductions(globals())

_FORWARD = "void({F}[:, ::1], float64, {F}[:, ::1], float64[::1])"
_BACKWARD = "void({F}[:, ::1], {F}[:, ::1], float64[::1], float64, {F}[:, ::1], int64)"


def _standardize_kernel(z, eps, y, std):
    sh = cuda.shared.array(0, dtype=types.float64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    n_cols = z.shape[1]
    for i in range(cuda.blockIdx.x, z.shape[0], cuda.gridDim.x):
        acc = 0.0
        for j in range(tid, n_cols, nt):
            acc += z[i, j]
        sh[tid] = acc
        cuda.syncthreads()
        tree_sum(sh, 1, tid, nt)
        mu = z.dtype.type(sh[0] / n_cols)
        cuda.syncthreads()
        acc = 0.0
        for j in range(tid, n_cols, nt):
            x = np.float64(z[i, j] - mu)
            acc += x * x
        sh[tid] = acc
        cuda.syncthreads()
        tree_sum(sh, 1, tid, nt)
        sigma = math.sqrt(sh[0] / (n_cols - 1))
        if tid == 0:
            std[i] = sigma
        r = z.dtype.type(1.0 / (sigma + eps))
        for j in range(tid, n_cols, nt):
            y[i, j] = (z[i, j] - mu) * r
        cuda.syncthreads()


def _backward_kernel(g, y, std, eps, out, accumulate):
    sh = cuda.shared.array(0, dtype=types.float64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    n_cols = g.shape[1]
    for i in range(cuda.blockIdx.x, g.shape[0], cuda.gridDim.x):
        acc_g = 0.0
        acc_gy = 0.0
        for j in range(tid, n_cols, nt):
            gj = g[i, j]
            acc_g += gj
            acc_gy += np.float64(gj) * np.float64(y[i, j])
        sh[tid] = acc_g
        sh[nt + tid] = acc_gy
        cuda.syncthreads()
        tree_sum(sh, 2, tid, nt)
        sigma = std[i]
        inv = 1.0 / (sigma + eps)
        coef = sh[nt] / ((n_cols - 1) * sigma) if sigma > 0.0 else 0.0
        a = g.dtype.type(inv)
        b = g.dtype.type(coef)
        c = g.dtype.type(inv * sh[0] / n_cols)
        cuda.syncthreads()  # every thread has read sh (and g) before rows are written
        for j in range(tid, n_cols, nt):
            v = (a * g[i, j] - c) - b * y[i, j]
            if accumulate != 0:
                out[i, j] += v
            else:
                out[i, j] = v
        cuda.syncthreads()


KERNELS = [(_standardize_kernel, _FORWARD), (_backward_kernel, _BACKWARD)]


def standardize_rows(z, eps, y, std):
    """See ``kdnumba.kernels.cpu.standardize.standardize_rows`` (device arrays)."""
    dtype = np.dtype(z.dtype)
    threads = block_size(z.shape[1])
    compile_kernel(_standardize_kernel, _FORWARD, dtype)[
        grid_size(z.shape[0]), threads, 0, threads * 8](z, float(eps), y, std)


def standardize_backward_rows(g, y, std, eps, out, accumulate):
    """See ``kdnumba.kernels.cpu.standardize.standardize_backward_rows`` (device arrays)."""
    dtype = np.dtype(g.dtype)
    threads = block_size(g.shape[1])
    compile_kernel(_backward_kernel, _BACKWARD, dtype)[
        grid_size(g.shape[0]), threads, 0, threads * 16](
        g, y, std, float(eps), out, int(bool(accumulate)))
