"""Decoupled KD (DKD, Zhao et al. CVPR 2022) as mdistiller computes it, fused per row.

For row ``i`` with target ``g`` and ``u = z / T`` (student ``s``, teacher ``t``):

* **TCKD** is the KL between the binary distributions
  ``b = (p_g, p_rest)`` of ``p = softmax(u)``, with ``p_rest = sum_{j != g} p_j``;
* **NCKD** is the KL between ``p' = softmax(u - 1000 e_g)`` of teacher and
  student (mdistiller masks the target with ``-1000`` instead of dropping it).

Everything is computed from logs of sums, never from a log of a probability:
with ``M = max_{j != g} z_j`` (the *non-target* maximum), ``d_j = (z_j - M)/T``,
``E_j = exp(d_j)`` for ``j != g`` (``E_g = 0``), ``Z = sum E >= 1`` and
``a = (z_g - M)/T``::

    L  = logaddexp(a, log Z)           log b_g = a - L,   log b_rest = log Z - L
    L' = logaddexp(a - 1000, log Z)    log p'_j = d_j - L' (j != g),  log p'_g = a - 1000 - L'

so no term is ever ``log 0`` (the peer's ``torch.log(pred_student)`` is
``-inf`` once ``p_rest`` or ``p_g`` underflows). Per row::

    TCKD = sum_{k in g, rest} b_t,k (log b_t,k - log b_s,k)
    NCKD = exp(-L'_t) (W + Z_t (L'_s - L'_t)) + p'_t,g (a_t - a_s + L'_s - L'_t)
    W    = sum_{j != g} E_t,j (d_t,j - d_s,j)
    row_loss = w (alpha TCKD + beta NCKD)                 (w = T^2 / B)

and the gradient row, with ``delta = b_s,g - b_t,g`` and ``c = T / B``::

    j != g:  c (beta exp(-L'_s) - alpha delta / Z_s) E_s,j - c beta exp(-L'_t) E_t,j
    j == g:  c (alpha delta + beta (p'_s,g - p'_t,g))

Passes over the row while it is hot: non-target maxima (two ``lane_max`` on
the slices around ``g``), the exponentials (vectorised, into the gradient row
and per-chunk scratch), their ``lane_sum``s, the gradient row in place. Rows
are independent (per-row results, reduced in a fixed order by the caller).
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from kdnumba._constants import DKD_MASK as MASK
from kdnumba._policy import callee, parallel_jit
from kdnumba.kernels.cpu.dtypes import cast_like
from kdnumba.kernels.cpu.fastexp import exp_nonpos
from kdnumba.kernels.cpu.reductions import lane_max, lane_sum

_ROWS_PER_CHUNK = 16


@callee
def _max_except(row, g):
    """``max_{j != g} row[j]`` (``row`` has at least 2 elements, ``0 <= g < C``)."""
    n = row.shape[0]
    if g == 0:
        return lane_max(row[1:])
    if g == n - 1:
        return lane_max(row[:n - 1])
    a = lane_max(row[:g])
    b = lane_max(row[g + 1:])
    return a if a > b else b


@callee
def _exponentials(s_row, t_row, m_s, m_t, inv_t, e_s, e_t, w_terms):
    """``e = exp(min(d, 0))``, ``w = e_t (d_t - d_s)`` element-wise (vectorises);
    the target column (the only one where ``d`` may be > 0) is fixed by the
    caller. ``w`` takes the unclamped ``d``, so a NaN/inf input always reaches
    it (``0 * NaN`` is NaN; the policy grants LLVM no ``nnan``/``ninf``)."""
    zero = cast_like(0.0, s_row)
    for j in range(s_row.shape[0]):
        d_s = (s_row[j] - m_s) * inv_t
        d_t = (t_row[j] - m_t) * inv_t
        # The difference first: one value rather than two stays live across
        # the exponentials (AVX2's 16 vector registers spilled them; the same
        # change made kd_loss's exponential loop 6-10 % faster).
        dd = d_t - d_s
        et = exp_nonpos(min(d_t, zero))
        e_s[j] = exp_nonpos(min(d_s, zero))
        e_t[j] = et
        w_terms[j] = et * dd


@callee
def _gradient_row(g_row, e_t, a_s, a_t):
    for j in range(g_row.shape[0]):
        g_row[j] = a_s * g_row[j] - a_t * e_t[j]


@callee
def _logaddexp(a, b):
    m = max(a, b)
    return m + math.log(math.exp(a - m) + math.exp(b - m))


@callee
def row_terms(a_s, log_z_s, a_t, log_z_t):
    """Per-row scalars shared by the CPU and CUDA kernels (float64).

    Returns ``(tckd, nckd_without_w, e_ls, e_lt, delta, pg_s, pg_t)``: TCKD;
    NCKD minus its ``exp(-L'_t) W`` part; ``exp(-L'_s)``, ``exp(-L'_t)``;
    ``delta = b_s,g - b_t,g``; ``p'_s,g``, ``p'_t,g``.
    """
    l_s = _logaddexp(a_s, log_z_s)
    l_t = _logaddexp(a_t, log_z_t)
    lb_s_g = a_s - l_s
    lb_s_r = log_z_s - l_s
    lb_t_g = a_t - l_t
    lb_t_r = log_z_t - l_t
    b_t_g = math.exp(lb_t_g)
    b_t_r = math.exp(lb_t_r)
    b_s_g = math.exp(lb_s_g)
    b_s_r = math.exp(lb_s_r)
    tckd = b_t_g * (lb_t_g - lb_s_g) + b_t_r * (lb_t_r - lb_s_r)
    # delta = b_s,g - b_t,g = b_t,rest - b_s,rest: take the difference of the
    # smaller pair (no cancellation of two numbers near 1).
    delta = b_s_g - b_t_g if b_s_g + b_t_g < 1.0 else b_t_r - b_s_r
    lp_s = _logaddexp(a_s - MASK, log_z_s)
    lp_t = _logaddexp(a_t - MASK, log_z_t)
    e_ls = math.exp(-lp_s)
    e_lt = math.exp(-lp_t)
    pg_s = math.exp(a_s - MASK - lp_s)
    pg_t = math.exp(a_t - MASK - lp_t)
    nckd_rest = math.exp(log_z_t - lp_t) * (lp_s - lp_t) + pg_t * (a_t - a_s + lp_s - lp_t)
    return tckd, nckd_rest, e_ls, e_lt, delta, pg_s, pg_t


@parallel_jit
def dkd_rows(s, t, labels, inv_t, alpha, beta, w, c, grad, row_loss):
    """Fused DKD loss and gradient, one row per ``prange`` iteration.

    Parameters (``F`` the dtype of ``s``):
        s, t: ``(B, C)`` F, C-contiguous, ``C >= 2``.
        labels: ``(B,)`` int64 targets in ``[0, C)`` (checked by the caller).
        inv_t: F, ``1/T``.
        alpha, beta: float64 weights of TCKD and NCKD.
        w: float64 loss weight ``T^2 / B``; c: float64 gradient weight ``T / B``.
        grad: ``(B, C)`` F output.
        row_loss: ``(B,)`` float64 output; non-finite when the row's inputs are.
    """
    n_rows, n_cols = s.shape
    per_chunk = max(1, min(_ROWS_PER_CHUNK, n_rows // 32))
    n_chunks = (n_rows + per_chunk - 1) // per_chunk
    for chunk in prange(n_chunks):
        e_t = np.empty(n_cols, dtype=s.dtype)
        w_terms = np.empty(n_cols, dtype=s.dtype)
        stop = min(n_rows, (chunk + 1) * per_chunk)
        for i in range(chunk * per_chunk, stop):
            s_row = s[i]
            t_row = t[i]
            g_row = grad[i]
            g = labels[i]
            m_s = _max_except(s_row, g)
            m_t = _max_except(t_row, g)
            _exponentials(s_row, t_row, m_s, m_t, inv_t, g_row, e_t, w_terms)
            g_row[g] = 0
            e_t[g] = 0
            w_terms[g] = 0
            z_s = lane_sum(g_row)
            z_t = lane_sum(e_t)
            big_w = lane_sum(w_terms)
            a_s = (np.float64(s_row[g]) - np.float64(m_s)) * np.float64(inv_t)
            a_t = (np.float64(t_row[g]) - np.float64(m_t)) * np.float64(inv_t)
            tckd, nckd_rest, e_ls, e_lt, delta, pg_s, pg_t = row_terms(
                a_s, math.log(z_s), a_t, math.log(z_t))
            nckd = e_lt * big_w + nckd_rest
            # Both KLs are >= 0 exactly; rounding can leave -1e-16.
            row_loss[i] = w * (alpha * max(tckd, 0.0) + beta * max(nckd, 0.0))
            _gradient_row(g_row, e_t, cast_like(c * (beta * e_ls - alpha * delta / z_s), s),
                          cast_like(c * beta * e_lt, s))
            g_row[g] = cast_like(c * (alpha * delta + beta * (pg_s - pg_t)), s)
