"""Response-based KD: temperature softmax, KL to the teacher, hard cross-entropy.

One fused kernel computes, for every row ``i`` of ``(B, C)`` logits, the
per-row loss and the gradient row, in three passes over the row while it is
hot in cache:

1. row maxima ``m_s = max_j s_ij`` and ``m_t = max_j t_ij`` (stability),
   by ``reductions.lane_max`` (explicit SIMD lanes);
2. the exponentials ``e^T_s = exp((s - m_s)/T)``, ``e^T_t = exp((t - m_t)/T)``
   and, when a hard term is present, ``e_s = exp(s - m_s)`` (at ``T = 1``
   that is ``e^T_s`` itself, bit for bit, and is not recomputed), element-wise
   into the gradient row and per-chunk scratch rows (so pass 3 needs no
   second ``exp``); then their sums ``Z`` and ``W = sum_j e^T_t (u_t - u_s)``
   with ``u = (z - m)/T`` by ``reductions.lane_sum`` (explicit SIMD lanes in a
   fixed order, block totals in float64);
3. the gradient row
   ``g = c_soft (e^T_s/Z^T_s - e^T_t/Z^T_t) + c_hard (sum(y) e_s/Z_s - y)``.

Per-row loss (all logs of sums, never of a probability that may underflow)::

    KL_i = W / Z^T_t - log Z^T_t + log Z^T_s
    CE_i = logsumexp(s_i) * sum(y_i) - sum_j y_ij s_ij
    loss_i = w_soft * KL_i + w_hard * CE_i

The caller chooses the weights (``w_soft = (1-alpha) T^2 / B``, ``c_soft =
(1-alpha) T / B``, ...). Rows are independent, so the result of each row is the
same for any thread count; the batch loss is reduced in a fixed order by the
caller.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from kdnumba._policy import jit, parallel_jit
from kdnumba._constants import LABELS_DENSE, LABELS_INDEX, LABELS_NONE
from kdnumba.kernels.cpu.dtypes import cast_like
from kdnumba.kernels.cpu.fastexp import exp_nonpos
from kdnumba.kernels.cpu.reductions import lane_dot, lane_max, lane_sum


_ROWS_PER_CHUNK = 16


@jit
def _exponentials(s_row, t_row, m_s, m_t, inv_t, e_s_t, e_t_t, w_terms, e_s, with_hard):
    """Pass 2: element-wise, no reduction, so it vectorises fully.

    Fills ``e_s_t = exp(u_s)``, ``e_t_t = exp(u_t)`` and
    ``w_terms = e_t_t * (u_t - u_s)`` with ``u = (z - m) / T``, and when
    ``with_hard`` also ``e_s = exp(s - m_s)`` in the same loop (one read of
    the rows: 5 % faster than a separate pass, measured; the loop-invariant
    test is hoisted out of the loop by LLVM).
    """
    for j in range(s_row.shape[0]):
        d_s = s_row[j] - m_s
        u_s = d_s * inv_t
        u_t = (t_row[j] - m_t) * inv_t
        es = exp_nonpos(u_s)
        et = exp_nonpos(u_t)
        e_s_t[j] = es
        e_t_t[j] = et
        w_terms[j] = et * (u_t - u_s)
        if with_hard:
            e_s[j] = exp_nonpos(d_s)


@jit
def _gradient_row(g_row, e_t_t, e_s, a_s, a_t, a_h, reuse_soft):
    """Pass 3, in place: ``g = a_s e^T_s - a_t e^T_t + a_h e_s``.

    ``g_row`` holds ``e^T_s`` on entry. ``reuse_soft`` (``T = 1``, or no hard
    term with ``a_h = 0``) takes ``e_s`` from ``g_row`` itself, bit for bit the
    same numbers; the loop-invariant test is hoisted out by LLVM (reading
    ``g_row`` through a second name instead would make LLVM's alias check
    send the loop down its scalar path).
    """
    for j in range(g_row.shape[0]):
        e = g_row[j]
        h = e if reuse_soft else e_s[j]
        g_row[j] = a_s * e - a_t * e_t_t[j] + a_h * h


@parallel_jit
def kd_rows(s, t, labels_index, labels_dense, labels_kind, inv_t,
            w_soft, w_hard, c_soft, c_hard, grad, row_loss):
    """Fused KD loss and gradient, one row per ``prange`` iteration.

    Parameters (``F`` is the dtype of ``s``; scalars typed by the caller):
        s, t: ``(B, C)`` F, C-contiguous student / teacher logits.
        labels_index: ``(B,)`` int64 class indices (used when ``labels_kind == 1``).
        labels_dense: ``(B, C)`` F target rows (used when ``labels_kind == 2``).
        labels_kind: 0 none, 1 index, 2 dense.
        inv_t: F, ``1/T``.
        w_soft, w_hard: float64 loss weights of the KL and CE terms.
        c_soft, c_hard: float64 gradient weights of the KL and CE terms.
        grad: ``(B, C)`` F output.
        row_loss: ``(B,)`` float64 output, ``w_soft*KL_i + w_hard*CE_i``;
            non-finite for a row whose inputs hold NaN or inf (see below).

    Non-finite input is detected without a separate sweep over the arrays:
    any NaN/inf in ``s`` or ``t`` makes some ``u_t - u_s`` (or ``e^T_t``)
    non-finite, and since the policy never grants LLVM ``nnan``/``ninf``,
    ``W`` and hence the row loss become NaN or inf (a NaN/inf label does
    the same through ``sum(y)``). The caller checks only the total.
    """
    n_rows, n_cols = s.shape
    # Chunks of rows share one scratch row; small batches get smaller chunks
    # (at least 32 of them) so every thread has work. Rows are independent, so
    # chunking never changes bits. (Asking Numba for the thread count here
    # would make the kernel uncacheable.)
    per_chunk = max(1, min(_ROWS_PER_CHUNK, n_rows // 32))
    n_chunks = (n_rows + per_chunk - 1) // per_chunk
    has_hard = labels_kind != LABELS_NONE
    # T = 1: exp((s - m_s)/T) is exp(s - m_s) bit for bit (the scaling by
    # 1/T = 1 is exact), so the hard term reuses the soft exponentials instead
    # of a third exp pass and sum: same results, a quarter less work.
    unit_t = inv_t == 1
    zero = cast_like(0.0, s)
    for chunk in prange(n_chunks):
        # Per-chunk scratch: the teacher's (and hard) exponentials of one row.
        e_t_t = np.empty(n_cols, dtype=s.dtype)
        w_terms = np.empty(n_cols, dtype=s.dtype)
        e_s = np.empty(n_cols if has_hard and not unit_t else 0, dtype=s.dtype)
        stop = min(n_rows, (chunk + 1) * per_chunk)
        for i in range(chunk * per_chunk, stop):
            s_row = s[i]
            t_row = t[i]
            g_row = grad[i]
            m_s = lane_max(s_row)
            m_t = lane_max(t_row)
            _exponentials(s_row, t_row, m_s, m_t, inv_t, g_row, e_t_t, w_terms, e_s,
                          has_hard and not unit_t)
            z_s = lane_sum(g_row)
            z_t = lane_sum(e_t_t)
            w = lane_sum(w_terms)
            # KL >= 0 exactly; rounding can leave -1e-16 (float64) or -1e-7
            # (float32) when student and teacher agree up to a row constant.
            kl = max(w / z_t - math.log(z_t) + math.log(z_s), 0.0)
            a_s = cast_like(c_soft / z_s, s)
            a_t = cast_like(c_soft / z_t, s)
            loss = w_soft * kl
            if not has_hard:
                _gradient_row(g_row, e_t_t, e_s, a_s, a_t, zero, True)
            else:
                z_h = z_s if unit_t else lane_sum(e_s)
                lse = m_s + math.log(z_h)
                if labels_kind == LABELS_INDEX:
                    y = labels_index[i]
                    _gradient_row(g_row, e_t_t, e_s, a_s, a_t, cast_like(c_hard / z_h, s),
                                  unit_t)
                    g_row[y] -= cast_like(c_hard, s)
                    loss += w_hard * (lse - s_row[y])
                else:
                    y_row = labels_dense[i]
                    y_sum = lane_sum(y_row)
                    _gradient_row(g_row, e_t_t, e_s, a_s, a_t,
                                  cast_like(c_hard * y_sum / z_h, s), unit_t)
                    c_h = cast_like(c_hard, s)
                    for j in range(n_cols):
                        g_row[j] -= c_h * y_row[j]
                    loss += w_hard * (lse * y_sum - lane_dot(y_row, s_row))
            row_loss[i] = loss
