"""DIST (Huang et al., NeurIPS 2022): Pearson correlations of softmax outputs,
per row (inter-class) and per column (intra-class, across the batch).

With ``y = softmax(z / T)`` row-wise for student (``ys``) and teacher
(``yt``), the Pearson correlation of two vectors is ``rho = <a, b> / D``,
``a``, ``b`` the mean-centred vectors, ``D = |a| |b| + eps`` (``eps = 1e-8``,
added to the product of norms as hunto's ``dist_kd.py``). Its derivative with
respect to the uncentred student vector is the centred (``Pc``) version of
``b / D - k a``, ``k = <a, b> |b| / (|a| D^2)`` (``k = 0`` when ``|a| = 0``).

The loss ``T^2 (beta (1 - mean_i rho_i) + gamma (1 - mean_j rho'_j))`` couples the
batch through the column term, so three launches:

1. :func:`dist_rows` (parallel over rows): softmax rows into ``ys``, ``yt``;
   the row correlation ``rho_i`` and the coefficients ``(p_i, q_i, r_i)`` of
   its gradient ``-w_row Pc(b/D - k a) = -p_i yt + q_i ys - r_i``
   (``w_row = T^2 beta / B``);
2. :func:`dist_columns` (parallel over blocks of columns; each column's sums
   run over the rows in index order, so the blocking never changes bits):
   column means, then ``rho'_j`` and the coefficients ``(P_j, Q_j, R_j)``
   of the column term's gradient (``w_col = T^2 gamma / C``);
3. :func:`dist_gradient` (parallel over rows): ``G = -(p_i + P_j) yt +
   (q_i + Q_j) ys - (r_i + R_j)`` is d loss / d y; through the softmax,
   ``grad_i = ys_i (G_i - <G_i, ys_i>) / T``.

All sums are float64 (fixed-order lane sums along rows, sequential over rows
along columns).
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from kdnumba._policy import callee, jit, parallel_jit
from kdnumba.kernels.cpu.dtypes import cast_like
from kdnumba.kernels.cpu.fastexp import exp_nonpos
from kdnumba.kernels.cpu.reductions import lane_dot, lane_max, lane_sum

#: Columns per block of :func:`dist_columns` (float64 accumulators stay in L1).
COLUMN_BLOCK = 256


@callee
def _exp_row(z_row, m, inv_t, e_row):
    for j in range(z_row.shape[0]):
        e_row[j] = exp_nonpos((z_row[j] - m) * inv_t)


@callee
def _scale_row(e_row, r):
    for j in range(e_row.shape[0]):
        e_row[j] = e_row[j] * r


@callee
def _center_row(y_row, m, out_row):
    for j in range(y_row.shape[0]):
        out_row[j] = y_row[j] - m


@jit
def _probe(z_row):
    """``sum (z - z)``: 0 for a finite row, NaN if it holds NaN or inf (the policy
    grants LLVM no ``nnan``/``ninf``, so ``z - z`` is not folded). The softmax
    alone would drop a NaN: ``exp_nonpos`` maps it to 0."""
    acc = z_row[0] - z_row[0]
    for j in range(z_row.shape[0]):
        acc += z_row[j] - z_row[j]
    return acc


@callee
def _softmax_row(z_row, inv_t, y_row):
    _exp_row(z_row, lane_max(z_row), inv_t, y_row)
    _scale_row(y_row, cast_like(1.0 / lane_sum(y_row), z_row))


@callee
def pearson_coefficients(s_ab, s_aa, s_bb, sum_a, sum_b, mean_a, mean_b, n, eps, weight):
    """``(rho, p, q, r)`` of one vector pair (float64): the correlation and the
    gradient ``-weight Pc(b/D - k a) = -p y_t + q y_s - r`` in the uncentred
    vectors (``Pc`` subtracts the mean over the ``n`` entries; ``sum_a``,
    ``sum_b`` are the rounding residues of the centred sums)."""
    norm_a = math.sqrt(s_aa)
    norm_b = math.sqrt(s_bb)
    d = norm_a * norm_b + eps
    rho = s_ab / d
    inv_d = 1.0 / d
    k = s_ab * norm_b / (norm_a * d * d) if norm_a > 0.0 else 0.0
    center = (inv_d * sum_b - k * sum_a) / n
    p = weight * inv_d
    q = weight * k
    r = -weight * (inv_d * mean_b - k * mean_a + center)
    return rho, p, q, r


@parallel_jit
def dist_rows(s, t, inv_t, eps, w_row, ys, yt, row_rho, row_coef):
    """Pass 1: ``ys``/``yt`` softmax rows, ``row_rho[i]`` and ``row_coef[i] =
    (p_i, q_i, r_i)`` (float64, ``(B, 3)``). ``s``, ``t``, ``ys``, ``yt``:
    ``(B, C)`` of one float dtype ``F``; ``inv_t`` F; ``eps``, ``w_row`` float64."""
    n_rows, n_cols = s.shape
    for i in prange(n_rows):
        ys_row = ys[i]
        yt_row = yt[i]
        _softmax_row(s[i], inv_t, ys_row)
        _softmax_row(t[i], inv_t, yt_row)
        a = np.empty(n_cols, dtype=s.dtype)
        b = np.empty(n_cols, dtype=s.dtype)
        m_a = lane_sum(ys_row) / n_cols
        m_b = lane_sum(yt_row) / n_cols
        _center_row(ys_row, cast_like(m_a, s), a)
        _center_row(yt_row, cast_like(m_b, s), b)
        rho, p, q, r = pearson_coefficients(
            lane_dot(a, b), lane_dot(a, a), lane_dot(b, b), lane_sum(a), lane_sum(b),
            m_a, m_b, n_cols, eps, w_row)
        row_rho[i] = rho + (_probe(s[i]) + _probe(t[i]))
        row_coef[i, 0] = p
        row_coef[i, 1] = q
        row_coef[i, 2] = r


@parallel_jit
def dist_columns(ys, yt, eps, w_col, col_rho, col_coef):
    """Pass 2: ``col_rho[j]`` (float64 ``(C,)``) and ``col_coef[:, j] = (P_j, Q_j,
    R_j)`` (``(3, C)`` of ``ys``'s dtype)."""
    n_rows, n_cols = ys.shape
    n_blocks = (n_cols + COLUMN_BLOCK - 1) // COLUMN_BLOCK
    for blk in prange(n_blocks):
        lo = blk * COLUMN_BLOCK
        hi = min(n_cols, lo + COLUMN_BLOCK)
        w = hi - lo
        m_s = np.zeros(w)
        m_t = np.zeros(w)
        for i in range(n_rows):
            for j in range(w):
                m_s[j] += ys[i, lo + j]
                m_t[j] += yt[i, lo + j]
        for j in range(w):
            m_s[j] /= n_rows
            m_t[j] /= n_rows
        s_ab = np.zeros(w)
        s_aa = np.zeros(w)
        s_bb = np.zeros(w)
        s_a = np.zeros(w)
        s_b = np.zeros(w)
        for i in range(n_rows):
            for j in range(w):
                a = ys[i, lo + j] - m_s[j]
                b = yt[i, lo + j] - m_t[j]
                s_ab[j] += a * b
                s_aa[j] += a * a
                s_bb[j] += b * b
                s_a[j] += a
                s_b[j] += b
        for j in range(w):
            rho, p, q, r = pearson_coefficients(s_ab[j], s_aa[j], s_bb[j], s_a[j], s_b[j],
                                                m_s[j], m_t[j], n_rows, eps, w_col)
            col_rho[lo + j] = rho
            col_coef[0, lo + j] = p
            col_coef[1, lo + j] = q
            col_coef[2, lo + j] = r


@callee
def _dy_row(ys_row, yt_row, p, q, r, cp, cq, cr, g_row):
    for j in range(ys_row.shape[0]):
        g_row[j] = (q + cq[j]) * ys_row[j] - (p + cp[j]) * yt_row[j] - (r + cr[j])


@callee
def _softmax_back_row(ys_row, dot, inv_t, g_row):
    for j in range(ys_row.shape[0]):
        g_row[j] = inv_t * ys_row[j] * (g_row[j] - dot)


@parallel_jit
def dist_gradient(ys, yt, row_coef, col_coef, inv_t, grad):
    """Pass 3: ``grad`` (``(B, C)``, ``ys``'s dtype) from the coefficients."""
    n_rows = ys.shape[0]
    cp = col_coef[0]
    cq = col_coef[1]
    cr = col_coef[2]
    for i in prange(n_rows):
        g_row = grad[i]
        ys_row = ys[i]
        _dy_row(ys_row, yt[i], cast_like(row_coef[i, 0], ys), cast_like(row_coef[i, 1], ys),
                cast_like(row_coef[i, 2], ys), cp, cq, cr, g_row)
        dot = lane_dot(g_row, ys_row)
        _softmax_back_row(ys_row, cast_like(dot, ys), inv_t, g_row)
