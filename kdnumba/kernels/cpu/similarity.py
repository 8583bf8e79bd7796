"""Gram-matrix losses (SP, PKT): ``B x B`` similarities of the batch's rows, in row tiles.

Both losses compare two ``B x B`` matrices built from the rows of the student
(``a_s``, ``B x D_s``) and of the teacher (``a_t``, ``B x D_t``), row by row::

    SP  (RepDistiller SP.py):  a = f (the flattened features), G = a a^T,
                               N = G / max(||G_i||, eps) per row, D = N_s - N_t,
                               row loss_i = sum_j D_ij^2
    PKT (RepDistiller PKT.py): a = x / (||x|| + eps) per row, C = a a^T,
                               K = (C + 1) / 2, p_ij = K_ij / sum_k K_ik,
                               row loss_i = sum_j p^t_ij log((p^t_ij + eps) / (p^s_ij + eps))

Each row of the loss needs only row ``i`` of both Gram matrices, and its
derivative ``Q_i = d loss / d G_i`` only that row too (the chain rule through
the row normalisation is per row, see the kernels). With ``G = a a^T`` the
gradient is ``dL/da = (Q + Q^T) a``. So the drivers stream over tiles of
``R`` rows (memory ``O(B D + R B)``)::

    G_tile = a_s[tile] a_s^T, same for the teacher      BLAS (SYRK when R = B)
    row kernel: row losses and Q_tile                    Numba, one row per task
    h[tile] += Q_tile a_s;  h += Q_tile^T a_s[tile]      BLAS, float64 accumulation

With one tile (``R = B``, the default up to ``TILE_BYTES``) ``Q`` is
symmetrised in place and ``h = (Q + Q^T) a_s`` is one GEMM written straight
into the output. The Gram products and ``h`` are computed in the inputs'
dtype by BLAS (as PyTorch does); every row statistic (norms, sums, logs,
the loss) is float64. Row ``i`` is owned by one task and tiles are added in
tile order, so results are bit-identical for any Numba thread count.

The launch functions :func:`sp` and :func:`pkt` (plain Python around BLAS and
the kernels) have the same names and arguments as ``kernels.cuda.similarity``:
the caller allocates ``row_loss`` (float64 ``(B,)``, unscaled row sums: the
loss is their total divided by ``B^2``) and ``grad`` (the student's dtype and
``(B, D_s)`` shape).
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from kdnumba._policy import parallel_jit
from kdnumba.kernels.cpu.dtypes import MAX_FLOAT64
from kdnumba.kernels.cpu.fastexp import log_pos_f64
from kdnumba.kernels.cpu.reductions import lane_dot, lane_sum

#: Bytes of the three ``R x B`` tiles (two Gram tiles and ``Q``) that
#: :func:`default_tile_rows` aims at: one tile (no tiling) up to B = 1672
#: in float32 (1182 in float64).
TILE_BYTES = 32 << 20


#: Fewest rows per tile when tiling (unless B is smaller).
MIN_TILE_ROWS = 64


def default_tile_rows(n: int, itemsize: int) -> int:
    """Rows per tile: all ``n`` when three ``n x n`` tiles fit in :data:`TILE_BYTES`."""
    rows = TILE_BYTES // (3 * n * itemsize)
    return n if rows >= n else max(MIN_TILE_ROWS, int(rows))


# --- row kernels -----------------------------------------------------------------------

@parallel_jit
def sp_rows(gs, gt, r0, eps, scale, row_loss, q):
    """SP rows ``r0 .. r0 + R`` from their Gram rows ``gs``, ``gt`` (``R x B``).

    With ``r = max(||G_i||, eps)`` (``F.normalize``), ``N_i = G_i / r``,
    ``D_i = N^s_i - N^t_i``: ``row_loss[r0 + i] = sum_j D_ij^2`` and
    ``q[i] = scale * d(row loss) / d G^s_i = 2 scale (D_i - N^s_i (N^s_i . D_i)) / r_s``,
    or ``2 scale D_i / eps`` where the clamp is active (``||G^s_i|| < eps``: the clamp's
    derivative is 0, as PyTorch's ``clamp_min``).

    Element-wise passes into float64 row buffers, sums by ``lane_dot`` (fixed-order
    SIMD): a scalar float64 accumulation in the loop would keep it from vectorising.
    """
    rows, n = gs.shape
    for i in prange(rows):
        a = gs[i]
        b = gt[i]
        norm_s = math.sqrt(lane_dot(a, a))
        inv_s = 1.0 / max(norm_s, eps)
        inv_t = 1.0 / max(math.sqrt(lane_dot(b, b)), eps)
        ns = np.empty(n, dtype=np.float64)
        d = np.empty(n, dtype=np.float64)
        for j in range(n):
            x = np.float64(a[j]) * inv_s
            ns[j] = x
            d[j] = x - np.float64(b[j]) * inv_t
        row_loss[r0 + i] = lane_dot(d, d)
        nd = lane_dot(ns, d) if norm_s >= eps else 0.0
        f = 2.0 * scale * inv_s
        q_row = q[i]
        for j in range(n):
            q_row[j] = f * (d[j] - ns[j] * nd)


@parallel_jit
def pkt_rows(cs, ct, r0, eps, scale, row_loss, q):
    """PKT rows ``r0 .. r0 + R`` from their cosine rows ``cs``, ``ct`` (``R x B``).

    ``K = (C + 1)/2``, ``S_i = sum_k K_ik``, ``p_ij = K_ij / S_i``::

        row_loss[r0 + i] = sum_j p^t_ij log((p^t_ij + eps) / (p^s_ij + eps))
        g_ij = -p^t_ij / (p^s_ij + eps)                     (d row loss / d p^s_ij)
        q[i, j] = scale (g_ij - sum_k g_ik p^s_ik) / (2 S^s_i)   (scale * d row loss / d C^s_ij)

    Element-wise passes (the branch-free ``log_pos_f64`` vectorises) into float64
    row buffers, sums by ``lane_sum``/``lane_dot`` (fixed-order SIMD).
    """
    rows, n = cs.shape
    for i in prange(rows):
        a = cs[i]
        b = ct[i]
        sum_s = 0.5 * (lane_sum(a) + n)
        sum_t = 0.5 * (lane_sum(b) + n)
        inv_s = 0.5 / sum_s
        inv_t = 0.5 / sum_t
        ps = np.empty(n, dtype=np.float64)
        w = np.empty(n, dtype=np.float64)
        term = np.empty(n, dtype=np.float64)
        for j in range(n):
            p = (np.float64(a[j]) + 1.0) * inv_s
            pt = (np.float64(b[j]) + 1.0) * inv_t
            inv_den = 1.0 / (p + eps)
            ps[j] = p
            w[j] = pt * inv_den
            term[j] = pt * log_pos_f64((pt + eps) * inv_den)
        loss = lane_sum(term)
        if not (abs(sum_s) <= MAX_FLOAT64 and abs(sum_t) <= MAX_FLOAT64):
            loss = math.nan  # NaN/inf input (the clamped log would hide it)
        row_loss[r0 + i] = loss
        wp = lane_dot(w, ps)  # -sum_k g_ik p^s_ik
        f = scale * inv_s
        q_row = q[i]
        for j in range(n):
            q_row[j] = f * (wp - w[j])


# --- helpers ---------------------------------------------------------------------------

#: Side of the square blocks :func:`symmetrize` swaps (both blocks stay in L1).
SYM_BLOCK = 32


@parallel_jit
def symmetrize(q):
    """``q = q + q^T`` in place (square ``q``), by ``SYM_BLOCK`` blocks: block row
    ``bi`` owns the blocks ``(bi, bj)``, ``bj >= bi``, and their mirrors."""
    n = q.shape[0]
    nb = (n + SYM_BLOCK - 1) // SYM_BLOCK
    for bi in prange(nb):
        i0 = bi * SYM_BLOCK
        i1 = min(n, i0 + SYM_BLOCK)
        for bj in range(bi, nb):
            j0 = bj * SYM_BLOCK
            j1 = min(n, j0 + SYM_BLOCK)
            for i in range(i0, i1):
                for j in range(max(j0, i), j1):
                    x = q[i, j] + q[j, i]
                    q[i, j] = x
                    q[j, i] = x


@parallel_jit
def add_rows(acc, part, r0):
    """``acc[r0 + i] += part[i]`` (float64 ``acc``)."""
    rows, dim = part.shape
    for i in prange(rows):
        a = acc[r0 + i]
        p = part[i]
        for k in range(dim):
            a[k] += p[k]


@parallel_jit
def copy_rows(acc, out):
    """``out = acc`` in ``out``'s dtype."""
    rows, dim = acc.shape
    for i in prange(rows):
        for k in range(dim):
            out[i, k] = acc[i, k]


@parallel_jit
def normalize_rows(x, eps, xh, norms):
    """PKT's ``xh_i = x_i / (||x_i|| + eps)`` and ``norms[i] = ||x_i||`` (float64 norms)."""
    n, dim = x.shape
    for i in prange(n):
        ss = 0.0
        for k in range(dim):
            v = np.float64(x[i, k])
            ss += v * v
        norm = math.sqrt(ss)
        norms[i] = norm
        inv = 1.0 / (norm + eps)
        for k in range(dim):
            xh[i, k] = np.float64(x[i, k]) * inv


@parallel_jit
def unnormalize_grad(xh, norms, eps, h, grad):
    """Chain rule through ``xh = x / (||x|| + eps)``: ``h = dL/dxh`` to ``dL/dx``::

        dL/dx_i = h_i / (n_i + eps) - xh_i (xh_i . h_i) / n_i      (n_i = ||x_i||)

    A zero row (``n_i = 0``) takes the first term only (the norm is not
    differentiable there; PyTorch's autograd gives NaN).
    """
    n, dim = xh.shape
    for i in prange(n):
        norm = norms[i]
        c = 0.0
        for k in range(dim):
            c += np.float64(xh[i, k]) * np.float64(h[i, k])
        coef = c / norm if norm > 0.0 else 0.0
        inv = 1.0 / (norm + eps)
        for k in range(dim):
            grad[i, k] = np.float64(h[i, k]) * inv - np.float64(xh[i, k]) * coef


# --- the driver --------------------------------------------------------------------------

def _gram_rows(a_s, a_t, row_kernel, eps, scale, tile_rows, row_loss, h):
    """Stream row tiles of ``a_s a_s^T`` and ``a_t a_t^T`` through ``row_kernel``
    and write ``h = (Q + Q^T) a_s`` (``a_s``'s dtype); ``scale`` (``1/B^2``, the
    mean) multiplies ``Q``."""
    n = a_s.shape[0]
    dtype = a_s.dtype
    rows = min(n, tile_rows or default_tile_rows(n, dtype.itemsize))
    gs = np.empty((rows, n), dtype=dtype)
    gt = np.empty((rows, n), dtype=dtype)
    q = np.empty((rows, n), dtype=dtype)
    if rows == n:
        np.matmul(a_s, a_s.T, out=gs)  # NumPy calls SYRK for a @ a.T
        np.matmul(a_t, a_t.T, out=gt)
        row_kernel(gs, gt, 0, eps, scale, row_loss, q)
        del gs, gt
        symmetrize(q)
        np.matmul(q, a_s, out=h)
        return
    acc = np.zeros(a_s.shape, dtype=np.float64)
    part = np.empty(a_s.shape, dtype=dtype)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        k = r1 - r0
        np.matmul(a_s[r0:r1], a_s.T, out=gs[:k])
        np.matmul(a_t[r0:r1], a_t.T, out=gt[:k])
        row_kernel(gs[:k], gt[:k], r0, eps, scale, row_loss, q[:k])
        np.matmul(q[:k], a_s, out=part[:k])
        add_rows(acc, part[:k], r0)
        np.matmul(q[:k].T, a_s[r0:r1], out=part)
        add_rows(acc, part, 0)
    copy_rows(acc, h)


# --- launch functions: the interface of ``kernels.cuda.similarity`` -------------------

def sp(s, t, eps, tile_rows, row_loss, grad):
    """SP: per-row ``sum_j (N^s_ij - N^t_ij)^2`` into ``row_loss`` and the gradient
    of their sum divided by ``B^2`` into ``grad``.

    Args:
        s: ``(B, D_s)`` student rows; t: ``(B, D_t)`` teacher rows, same dtype.
        eps: the normalisation clamp (1e-12).
        tile_rows: rows per tile, ``None`` for :func:`default_tile_rows`.
        row_loss: ``(B,)`` float64 output (unscaled row sums).
        grad: ``(B, D_s)`` output in ``s``'s dtype.
    """
    n = s.shape[0]
    _gram_rows(s, t, sp_rows, eps, 1.0 / (n * n), tile_rows, row_loss, grad)


def pkt(s, t, eps, tile_rows, row_loss, grad):
    """PKT: per-row KL sums into ``row_loss`` and the gradient of their sum
    divided by ``B^2`` into ``grad`` (arguments as :func:`sp`; ``eps`` is PKT's)."""
    n = s.shape[0]
    xs = np.empty_like(s)
    xt = np.empty_like(t)
    ns = np.empty(n, dtype=np.float64)
    nt = np.empty(n, dtype=np.float64)
    normalize_rows(s, eps, xs, ns)
    normalize_rows(t, eps, xt, nt)
    h = np.empty_like(s)
    _gram_rows(xs, xt, pkt_rows, eps, 1.0 / (n * n), tile_rows, row_loss, h)
    unnormalize_grad(xs, ns, eps, h, grad)
