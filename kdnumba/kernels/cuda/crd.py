"""CRD's NCE scores against a memory bank on the GPU: the CPU algorithm, simply.

The CUDA twin of ``kernels.cpu.crd`` (see its docstring for the math), with
the same launch functions and arguments. Everything is float64 except the
bank (float32 or float64, read in place) and the input/gradient arrays.
Deterministic: no atomics; every reduction is in a fixed order.

* :func:`nce_chunks`: one block per ``(anchor, chunk of CHUNK sampled rows)``;
  thread ``j`` scores row ``j`` of the chunk (its dot product, loss term and
  weight ``w``) into shared memory, a halving tree sums the loss terms, then
  thread ``d`` forms ``sum_j w_j M[idx_j, d]`` in ``j`` order (reads of one
  bank row are coalesced across threads);
* :func:`normalize_rows`, :func:`finish_grad`: one thread per row;
* :func:`z_chunks`: one thread per ``(anchor, chunk)``;
* :func:`update_rows`: one thread per batch row; a row whose index occurs
  again later in the batch does nothing (the last occurrence wins, computed
  from the bank before the update, as on the CPU), so every bank row has
  one writer.

No ``min``/``max`` builtins (numba 0.68's CUDA target fails to compile them).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, types

from kdnumba.kernels.cuda import (block_reductions, compile_kernel, grid_size, is_simulator,
                                  item_launch)

tree_sum, _ = block_reductions(globals())

#: Sampled rows per block (= threads per block; a power of two).
CHUNK = 8 if is_simulator() else 128

_NORM_SIG = "void({F}[:, ::1], float64[::1], float64[:, ::1])"
_NCE_SIG = ("void(float64[:, ::1], {F}[:, ::1], int64[:, ::1], float64, float64, float64, "
            "float64, float64[:, ::1], float64[:, :, ::1])")
_FINISH_SIG = "void(float64[:, ::1], float64[::1], float64[:, :, ::1], float64, {F}[:, ::1])"
_Z_SIG = ("void(float64[:, ::1], {F}[:, ::1], int64[:, ::1], float64, float64[:, ::1], "
          "float64[:, ::1])")
_UPDATE_SIG = "void({F}[:, ::1], int64[::1], float64[:, ::1], float64)"


def n_chunks(n_columns: int) -> int:
    """Chunks (partials per anchor) of ``n_columns = K + 1`` sampled rows."""
    return -(-n_columns // CHUNK)


@cuda.jit(device=True)
def _softplus(x):
    if x > 0.0:
        return x + math.log1p(math.exp(-x))
    return math.log1p(math.exp(x))


@cuda.jit(device=True)
def _sigmoid(x):
    if x >= 0.0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _normalize_kernel(x, norms, v):
    n, dim = x.shape
    for b in range(cuda.grid(1), n, cuda.gridsize(1)):
        acc = 0.0
        for d in range(dim):
            xd = np.float64(x[b, d])
            acc += xd * xd
        nb = math.sqrt(acc)
        norms[b] = nb
        for d in range(dim):
            v[b, d] = np.float64(x[b, d]) / nb


def _nce_kernel(v, bank, idx, inv_t, log_z, log_c, d0, loss_part, grad_part):
    sh = cuda.shared.array(0, dtype=types.float64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    n, n_cols = idx.shape
    dim = v.shape[1]
    nch = loss_part.shape[1]
    for task in range(cuda.blockIdx.x, n * nch, cuda.gridDim.x):
        b = task // nch
        ch = task - b * nch
        start = ch * nt
        k = start + tid
        term = 0.0
        w = 0.0
        if k < n_cols:
            r = idx[b, k]
            dot = 0.0
            for d in range(dim):
                dot += np.float64(bank[r, d]) * v[b, d]
            s = dot * inv_t - log_z
            if k == 0:
                term = _softplus(log_c - s)
                w = -_sigmoid(log_c - s)
            else:
                term = d0 + _softplus(s - log_c)
                w = _sigmoid(s - log_c)
        sh[tid] = term
        sh[nt + tid] = w
        cuda.syncthreads()
        tree_sum(sh, 1, tid, nt)
        if tid == 0:
            loss_part[b, ch] = sh[0]
        stop = n_cols - start
        if stop > nt:
            stop = nt
        for d in range(tid, dim, nt):
            acc = 0.0
            for j in range(stop):
                acc += sh[nt + j] * np.float64(bank[idx[b, start + j], d])
            grad_part[b, ch, d] = acc
        cuda.syncthreads()


def _finish_kernel(v, norms, grad_part, scale, grad):
    n, nch, dim = grad_part.shape
    for b in range(cuda.grid(1), n, cuda.gridsize(1)):
        proj = 0.0
        for d in range(dim):
            g = 0.0
            for ch in range(nch):
                g += grad_part[b, ch, d]
            proj += v[b, d] * (g * scale)
        inv = 1.0 / norms[b]
        for d in range(dim):
            g = 0.0
            for ch in range(nch):
                g += grad_part[b, ch, d]
            grad[b, d] = (g * scale - v[b, d] * proj) * inv


def _z_kernel(v, bank, idx, inv_t, z_max, z_sum):
    n, n_cols = idx.shape
    dim = v.shape[1]
    nch = z_max.shape[1]
    for task in range(cuda.grid(1), n * nch, cuda.gridsize(1)):
        b = task // nch
        ch = task - b * nch
        start = ch * CHUNK
        stop = start + CHUNK
        if stop > n_cols:
            stop = n_cols
        best = -math.inf
        for k in range(start, stop):
            dot = 0.0
            for d in range(dim):
                dot += np.float64(bank[idx[b, k], d]) * v[b, d]
            e = dot * inv_t
            if e > best:
                best = e
        total = 0.0
        for k in range(start, stop):
            dot = 0.0
            for d in range(dim):
                dot += np.float64(bank[idx[b, k], d]) * v[b, d]
            total += math.exp(dot * inv_t - best)
        z_max[b, ch] = best
        z_sum[b, ch] = total


def _update_kernel(bank, idx, v, momentum):
    n, dim = v.shape
    keep = 1.0 - momentum
    for b in range(cuda.grid(1), n, cuda.gridsize(1)):
        r = idx[b]
        later = False
        for b2 in range(b + 1, n):
            if idx[b2] == r:
                later = True
        if later:
            continue
        acc = 0.0
        for d in range(dim):
            x = np.float64(bank[r, d]) * momentum + v[b, d] * keep
            acc += x * x
        nb = math.sqrt(acc)
        for d in range(dim):
            bank[r, d] = (np.float64(bank[r, d]) * momentum + v[b, d] * keep) / nb


KERNELS = [(_normalize_kernel, _NORM_SIG), (_nce_kernel, _NCE_SIG),
           (_finish_kernel, _FINISH_SIG), (_z_kernel, _Z_SIG), (_update_kernel, _UPDATE_SIG)]


def normalize_rows(x, norms, v):
    """``norms_b = ||x_b||``, ``v_b = x_b / ||x_b||`` (float64)."""
    blocks, threads = item_launch(x.shape[0])
    compile_kernel(_normalize_kernel, _NORM_SIG, x.dtype)[blocks, threads](x, norms, v)


def nce_chunks(v, bank, idx, inv_t, log_z, log_c, d0, loss_part, grad_part):
    """One side's NCE loss partials and weighted bank-row sums (see the CPU twin)."""
    tasks = loss_part.shape[0] * loss_part.shape[1]
    compile_kernel(_nce_kernel, _NCE_SIG, bank.dtype)[
        grid_size(tasks), CHUNK, 0, 2 * CHUNK * 8](
        v, bank, idx, float(inv_t), float(log_z), float(log_c), float(d0), loss_part, grad_part)


def finish_grad(v, norms, grad_part, scale, grad):
    """``grad_b = (I - v_b v_b^T) (scale sum_c grad_part[b, c]) / ||x_b||``."""
    blocks, threads = item_launch(v.shape[0])
    compile_kernel(_finish_kernel, _FINISH_SIG, grad.dtype)[blocks, threads](
        v, norms, grad_part, float(scale), grad)


def z_chunks(v, bank, idx, inv_t, z_max, z_sum):
    """Per ``(anchor, chunk)`` max and shifted sum of ``exp(M[idx] . v / T)``."""
    blocks, threads = item_launch(z_max.shape[0] * z_max.shape[1])
    compile_kernel(_z_kernel, _Z_SIG, bank.dtype)[blocks, threads](
        v, bank, idx, float(inv_t), z_max, z_sum)


def update_rows(bank, idx, v, momentum):
    """RepDistiller's momentum update of rows ``idx`` (then renormalised), in place."""
    blocks, threads = item_launch(v.shape[0])
    compile_kernel(_update_kernel, _UPDATE_SIG, bank.dtype)[blocks, threads](
        bank, idx, v, float(momentum))
