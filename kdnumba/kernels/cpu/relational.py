"""Relational KD (Park et al. 2019; RepDistiller ``RKD.py``): distance and angle terms.

Everything is expressed through the matrix of squared pairwise distances
``Q_ij = ||e_i - e_j||^2``, computed directly from differences (no Gram
expansion, so no cancellation for close rows), in float64 whatever the input
dtype.

Pairs (``i != j``; the diagonal is 0)::

    d_ij = sqrt(max(Q_ij, eps))                    (RepDistiller ``pdist``)
    u_ij = (e_j - e_i) * iota_ij,  iota_ij = 1/sqrt(Q_ij) if sqrt(Q_ij) > eps else 0

Angles at vertex ``a``, by the polarisation identity (no ``U_a`` is formed)::

    K^a_bc = u_ab . u_ac = (Q_ab + Q_ac - Q_bc) / 2 * iota_ab iota_ac

so the ``B^3`` angles cost O(1) each from ``Q``: the angle term is O(B^3)
work and O(B^2) memory instead of RepDistiller's O(B^3 D) / O(B^3).

Gradient: the loss is a function of ``Q`` only. With ``S = dL/dQ`` (entries
as written) and ``W = S + S^T``, ``dL/dE = 2 (diag(W 1) - W) E``: one B x B
by B x D product at the end. For the angle term, with
``h = smooth_l1'(K - T)`` per entry and, for each ``(a, b)``::

    A^a_bc = h^a_bc iota_ab iota_ac,   alpha^a_b = sum_c A^a_bc,
    beta^a_b = iota_ab^2 sum_c h^a_bc K^a_bc

    S_bc -= 1/2 sum_a A^a_bc                   (the O(B^3) part, row b per task)
    S_ab += alpha^a_b - beta^a_b               (stored transposed, in row b too)

(derivation in ``docs/relational.md``). Each task owns a fixed block of rows
``b`` and loops over ``a`` and ``c`` in a fixed order, so every sum has the
same order for any thread count: results are bit-identical.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from kdnumba._policy import jit, parallel_jit

#: Rows ``b`` per task of :func:`angle_rows`: the rows ``a`` it streams are
#: reused by all of a task's rows while in cache (16-32 measured best; the
#: grouping does not change any sum, so results do not depend on it).
ROWS_PER_TASK = 16

#: Largest finite float64 (``x <= MAX_FLOAT64`` is False for NaN and inf).
MAX_FLOAT64 = float(np.finfo(np.float64).max)


@jit
def center(e, ec):
    """``ec = e - mean_rows(e)`` in float64 (mean summed in row order)."""
    n, dim = e.shape
    mean = np.zeros(dim, dtype=np.float64)
    for i in range(n):
        for k in range(dim):
            mean[k] += e[i, k]
    for k in range(dim):
        mean[k] /= n
    for i in range(n):
        for k in range(dim):
            ec[i, k] = e[i, k] - mean[k]


@parallel_jit
def geometry(e, eps, q, inv_norm, dist_row_sum):
    """Per row ``i`` of ``e`` (B, D): ``q[i, j] = ||e_i - e_j||^2`` (float64, from
    differences), ``inv_norm[i, j] = iota_ij`` and ``dist_row_sum[i] = sum_j d_ij``.

    Entry ``(i, j)`` and ``(j, i)`` square the same differences in the same
    order, so ``q`` is exactly symmetric, with an exactly zero diagonal.
    ``dist_row_sum[i]`` is NaN when row ``i`` of ``q`` holds NaN or inf (a
    NaN/inf input, or squared distances beyond the float64 range): the
    ``max(Q, eps)`` clamp and ``iota``'s test would otherwise hide it, so the
    caller checks the total of ``dist_row_sum`` only.
    """
    n, dim = e.shape
    for i in prange(n):
        x = e[i]
        q_row = q[i]
        inv_row = inv_norm[i]
        total = 0.0
        finite = True
        for j in range(n):
            y = e[j]
            acc = 0.0
            for k in range(dim):
                diff = np.float64(x[k]) - np.float64(y[k])
                acc += diff * diff
            q_row[j] = acc
            if not acc <= MAX_FLOAT64:  # NaN or inf
                finite = False
            norm = math.sqrt(acc)
            if j == i:
                inv_row[j] = 0.0
            else:
                inv_row[j] = 1.0 / norm if norm > eps else 0.0
                total += math.sqrt(max(acc, eps))
        dist_row_sum[i] = total if finite else math.nan


@jit
def _smooth_l1(x):
    ax = abs(x)
    return 0.5 * x * x if ax < 1.0 else ax - 0.5


@jit
def _clip1(x):
    """``clip(x, -1, 1)``, the derivative of :func:`_smooth_l1`."""
    return min(max(x, -1.0), 1.0)


@jit
def _distance_residual(qs_ij, qt_ij, eps, inv_mu_s, inv_mu_t):
    """``(x_ij, d^s_ij)`` with ``x_ij = d^s_ij / mu_s - d^t_ij / mu_t`` and
    ``d_ij = sqrt(max(Q_ij, eps))`` (off-diagonal pairs)."""
    d_s = math.sqrt(max(qs_ij, eps))
    d_t = math.sqrt(max(qt_ij, eps))
    return d_s * inv_mu_s - d_t * inv_mu_t, d_s


@parallel_jit
def distance_rows(qs, qt, eps, inv_mu_s, inv_mu_t, row_loss, row_hd):
    """Per row ``i``: ``sum_j smooth_l1(x_ij)`` and ``sum_j clip(x_ij) d^s_ij``.

    ``x_ij = d^s_ij / mu_s - d^t_ij / mu_t`` (off-diagonal; the diagonal is 0 - 0).
    """
    n = qs.shape[0]
    for i in prange(n):
        qs_row = qs[i]
        qt_row = qt[i]
        loss = 0.0
        hd = 0.0
        for j in range(n):
            if j == i:
                continue
            x, d_s = _distance_residual(qs_row[j], qt_row[j], eps, inv_mu_s, inv_mu_t)
            loss += _smooth_l1(x)
            hd += _clip1(x) * d_s
        row_loss[i] = loss
        row_hd[i] = hd


@jit
def _angle_inner(qs_b, qs_a, ins_a, ins_ab, qs_ab, qt_b, qt_a, int_a, int_ab, qt_ab, r_b):
    """One ``(a, b)``: the loop over ``c``; returns (loss, alpha, sum h K)."""
    loss = 0.0
    alpha = 0.0
    hk = 0.0
    for c in range(qs_b.shape[0]):
        w_s = ins_ab * ins_a[c]
        k = 0.5 * (qs_ab + qs_a[c] - qs_b[c]) * w_s
        t = 0.5 * (qt_ab + qt_a[c] - qt_b[c]) * (int_ab * int_a[c])
        x = k - t
        loss += _smooth_l1(x)
        h = _clip1(x)
        a = h * w_s
        r_b[c] += a
        alpha += a
        hk += h * k
    return loss, alpha, hk


@parallel_jit
def angle_rows(qs, ins, qt, int_, r, row_loss):
    """The angle term's loss and its ``dL/dQ`` (unscaled: a sum, not a mean).

    Parameters (all float64):
        qs, ins: ``(B, B)`` student ``Q`` and ``iota``; qt, int_: the teacher's.
        r: ``(B, B)`` output (overwritten): ``-2 S`` of the angle term,
            i.e. ``sum_a A^a_bc`` at ``(b, c)`` plus ``2 (beta^a_b - alpha^a_b)``
            at ``(b, a)``.
        row_loss: ``(B,)`` output, ``sum_{a,c} smooth_l1(K^a_bc - T^a_bc)``.

    A task owns ``ROWS_PER_TASK`` rows ``b`` and sweeps every ``a``; the
    per-``(a, b)`` sums are kept and added at ``(b, a)`` after the sweep.
    (Tiling ``c`` for L1 was 1.1-2x slower, measured: the inner loop is
    instruction-bound, not cache-bound.)
    """
    n = qs.shape[0]
    for task in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        b0 = task * ROWS_PER_TASK
        nb = min(n, b0 + ROWS_PER_TASK) - b0
        alpha = np.zeros((nb, n))
        hk = np.zeros((nb, n))
        loss = np.zeros(nb)
        for bi in range(nb):
            r_b = r[b0 + bi]
            for c in range(n):
                r_b[c] = 0.0
        for a in range(n):
            qs_a = qs[a]
            ins_a = ins[a]
            qt_a = qt[a]
            int_a = int_[a]
            for bi in range(nb):
                b = b0 + bi
                ins_ab = ins_a[b]
                int_ab = int_a[b]
                if ins_ab == 0.0 and int_ab == 0.0:
                    continue  # b == a, or coincident in both: every K and T is 0
                pair_loss, alpha[bi, a], hk[bi, a] = _angle_inner(
                    qs[b], qs_a, ins_a, ins_ab, qs_a[b], qt[b], qt_a, int_a, int_ab, qt_a[b], r[b])
                loss[bi] += pair_loss
        for bi in range(nb):
            b = b0 + bi
            r_b = r[b]
            for a in range(n):
                beta = hk[bi, a] * ins[a, b] * ins[a, b]
                r_b[a] += 2.0 * (beta - alpha[bi, a])
            row_loss[b] = loss[bi]


@parallel_jit
def assemble(r, w_a, qs, qt, eps, inv_mu_s, inv_mu_t, k_mean, w_d, out):
    """The symmetric B x B factor ``M`` of the gradient, ``dL/dE = M E``.

    ``M = w_a [(R + R^T) - diag((R + R^T) 1)] + w_d [4 diag(C 1) - 4 C]``
    with ``R`` from :func:`angle_rows` and ``C_ij = dL_d/dQ_ij`` of the distance term::

        dL_d/dd_ij = h_ij / mu_s - k_mean,   k_mean = sum(h d) / (mu_s^2 B(B-1))
        C_ij = dL_d/dd_ij / (2 d_ij)  where Q_ij >= eps (else the clamp is flat: 0)

    (``w_d`` already holds the ``1/B^2`` of the mean; ``w_a`` the ``1/B^3``.)
    ``r`` is not read when ``w_a == 0`` (pass any float64 2-D array).
    ``out`` must not alias any input.
    """
    n = qs.shape[0]
    for i in prange(n):
        qs_row = qs[i]
        qt_row = qt[i]
        o_row = out[i]
        c_sum = 0.0
        r_sum = 0.0
        for j in range(n):
            if j == i:
                continue
            c = 0.0
            if w_d != 0.0 and qs_row[j] >= eps:  # else the clamp is flat: c = 0
                x, d_s = _distance_residual(qs_row[j], qt_row[j], eps, inv_mu_s, inv_mu_t)
                c = (_clip1(x) * inv_mu_s - k_mean) / (2.0 * d_s)
            rr = 0.0
            if w_a != 0.0:  # r is not written when the angle term is skipped
                rr = r[i, j] + r[j, i]
            o_row[j] = w_a * rr - 4.0 * w_d * c
            c_sum += c
            r_sum += rr
        o_row[i] = -w_a * r_sum + 4.0 * w_d * c_sum


@parallel_jit
def matmul_rows(m, ec, grad):
    """``grad = m @ ec`` (float64 accumulation, written in ``grad``'s dtype)."""
    n, dim = ec.shape
    for i in prange(n):
        acc = np.zeros(dim, dtype=np.float64)
        m_row = m[i]
        for k in range(n):
            mik = m_row[k]
            e_row = ec[k]
            for d in range(dim):
                acc[d] += mik * e_row[d]
        g_row = grad[i]
        for d in range(dim):
            g_row[d] = acc[d]
