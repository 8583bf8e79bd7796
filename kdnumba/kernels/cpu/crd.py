"""CRD (contrastive representation distillation): NCE scores against a memory bank.

For one side (anchors ``v``, ``B x D`` unit rows; a bank ``M``, ``N x D``; the
sampled rows ``idx``, ``B x (K+1)``, column 0 the positive) every score is one
dot product read straight from the bank, never a ``B x (K+1) x D`` gather::

    s_bk = (M[idx_bk] . v_b) / T - log Z         (log of P_bk = exp(M.v / T) / Z)
    loss term:   k = 0: softplus(log c - s)       = -log(P / (P + c))
                 k > 0: d0 + softplus(s - log c)  = -log(K Pn / (P + c))
    d term / d s:   k = 0: -sigmoid(log c - s);   k > 0: sigmoid(s - log c)

(``c = K Pn + eps``, ``d0 = log(c / (K Pn))``). The work is split in fixed
chunks of :data:`CHUNK` columns per anchor; task ``(b, chunk)`` writes one
float64 loss partial and one float64 ``D``-vector ``sum_k (d term / d s_bk)
M[idx_bk]``. :func:`finish_grad` adds a row's chunk vectors in chunk order and
applies the chain rule through ``v = x / ||x||``. Chunks depend only on
``K``, so results are bit-identical for any thread count. Extra memory:
``B x n_chunks x D`` float64 (4 MiB at B=64, K=16384, D=128), i.e. O(B K).

The launch functions below are the interface ``kernels/cuda/crd.py`` shares.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from kdnumba._policy import jit, parallel_jit
from kdnumba.kernels.cpu.reductions import lane_dot

#: Bank rows per parallel task (per anchor): 4096 tasks at B=64, K=16384;
#: the task's float64 accumulator (D values) stays in L1.
CHUNK = 256


def n_chunks(n_columns: int) -> int:
    """Chunks (partials per anchor) of ``n_columns = K + 1`` sampled rows."""
    return (n_columns + CHUNK - 1) // CHUNK


@jit
def normalize_rows(x, norms, v):
    """``norms_b = ||x_b||`` (float64) and ``v_b = x_b / ||x_b||`` (float64, as
    RepDistiller's ``Normalize``: no epsilon; a zero row gives a zero norm,
    which the caller rejects before any score is computed)."""
    n, dim = x.shape
    for b in range(n):
        nb = math.sqrt(lane_dot(x[b], x[b]))
        norms[b] = nb
        for d in range(dim):
            v[b, d] = np.float64(x[b, d]) / nb


@parallel_jit
def nce_chunks(v, bank, idx, inv_t, log_z, log_c, d0, loss_part, grad_part):
    """One side's NCE terms.

    Parameters:
        v: ``(B, D)`` float64 unit anchors (:func:`normalize_rows`).
        bank: ``(N, D)`` float32/float64 memory bank (C-contiguous).
        idx: ``(B, K+1)`` int64 bank rows, column 0 the positive (validated).
        inv_t, log_z, log_c, d0: float64 ``1/T``, ``log Z``, ``log(K Pn + eps)``,
            ``log((K Pn + eps) / (K Pn))`` (unused when K = 0).
        loss_part: ``(B, n_chunks)`` float64 output, summed loss terms.
        grad_part: ``(B, n_chunks, D)`` float64 output,
            ``sum_k (d term / d s_bk) M[idx_bk]`` over the chunk.
    """
    n, n_cols = idx.shape
    dim = v.shape[1]
    nch = loss_part.shape[1]
    for task in prange(n * nch):
        b = task // nch
        ch = task - b * nch
        start = ch * CHUNK
        stop = min(n_cols, start + CHUNK)
        acc = grad_part[b, ch]
        for d in range(dim):
            acc[d] = 0.0
        vb = v[b]
        total = 0.0
        for k in range(start, stop):
            row = bank[idx[b, k]]
            # x = s - log c; softplus(+-x) and sigmoid(+-x) from one exp(-|x|)
            x = lane_dot(row, vb) * inv_t - log_z - log_c
            e = math.exp(-abs(x))
            lp = math.log1p(e)
            r = 1.0 / (1.0 + e)
            if k == 0:  # softplus(-x), -sigmoid(-x)
                total += (lp - x if x < 0.0 else lp)
                g = -(r if x < 0.0 else e * r)
            else:  # d0 + softplus(x), sigmoid(x)
                total += d0 + (lp + x if x > 0.0 else lp)
                g = r if x >= 0.0 else e * r
            for d in range(dim):
                acc[d] += g * np.float64(row[d])
        loss_part[b, ch] = total


@jit
def finish_grad(v, norms, grad_part, scale, grad):
    """``grad_b = (I - v_b v_b^T) g_b / ||x_b||`` with ``g_b = scale * sum_c
    grad_part[b, c]`` (chunks in order); ``grad`` in the input's dtype."""
    n, nch, dim = grad_part.shape
    g = np.empty(dim, dtype=np.float64)
    for b in range(n):
        for d in range(dim):
            g[d] = 0.0
        for ch in range(nch):
            for d in range(dim):
                g[d] += grad_part[b, ch, d]
        for d in range(dim):
            g[d] *= scale
        proj = lane_dot(v[b], g)
        inv = 1.0 / norms[b]
        for d in range(dim):
            grad[b, d] = (g[d] - v[b, d] * proj) * inv


@parallel_jit
def z_chunks(v, bank, idx, inv_t, z_max, z_sum):
    """For the normalising constant: per task ``(b, chunk)`` the largest
    ``e = M[idx_bk] . v_b / T`` (``z_max``) and ``sum exp(e - z_max)``
    (``z_sum``), float64 ``(B, n_chunks)`` outputs."""
    n, n_cols = idx.shape
    nch = z_max.shape[1]
    for task in prange(n * nch):
        b = task // nch
        ch = task - b * nch
        start = ch * CHUNK
        stop = min(n_cols, start + CHUNK)
        vb = v[b]
        best = -np.inf
        for k in range(start, stop):
            e = lane_dot(bank[idx[b, k]], vb) * inv_t
            if e > best:
                best = e
        total = 0.0
        for k in range(start, stop):
            e = lane_dot(bank[idx[b, k]], vb) * inv_t
            total += math.exp(e - best)
        z_max[b, ch] = best
        z_sum[b, ch] = total


@jit
def update_rows(bank, idx, v, momentum):
    """RepDistiller's memory update: ``r = momentum * M[i_b] + (1 - momentum) * v_b``,
    ``M[i_b] = r / ||r||``. Every new row is computed from the bank as it was
    before the call, then written in batch order (a repeated index keeps the
    last row's value, like ``index_copy_`` on the CPU)."""
    n, dim = v.shape
    new = np.empty((n, dim), dtype=np.float64)
    keep = 1.0 - momentum
    for b in range(n):
        r = idx[b]
        for d in range(dim):
            new[b, d] = np.float64(bank[r, d]) * momentum + v[b, d] * keep
        nb = math.sqrt(lane_dot(new[b], new[b]))
        for d in range(dim):
            new[b, d] = new[b, d] / nb
    for b in range(n):
        r = idx[b]
        for d in range(dim):
            bank[r, d] = new[b, d]
