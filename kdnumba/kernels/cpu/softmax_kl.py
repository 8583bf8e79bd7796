"""Response-based KD: temperature softmax, KL to the teacher, hard cross-entropy.

One fused kernel computes, for every row ``i`` of ``(B, C)`` logits, the
per-row loss and the gradient row, in three passes over the row while it is
hot in cache:

1. row maxima ``m_s = max_j s_ij`` and ``m_t = max_j t_ij`` (stability),
   by ``reductions.lane_max`` (explicit SIMD lanes);
2. the exponentials ``e^T_s = exp((s - m_s)/T)``, ``e^T_t = exp((t - m_t)/T)``
   and, when a hard term is present, ``e_s = exp(s - m_s)`` (at ``T = 1``
   that is ``e^T_s`` itself, bit for bit, and is not recomputed; at an
   integer ``T`` in 2..4 it is ``(e^T_s)**T``, see :func:`hard_power`), element-wise
   into the gradient row and per-chunk scratch rows (so pass 3 needs no
   second ``exp``); then their sums ``Z`` and ``W = sum_j e^T_t (u_t - u_s)``
   with ``u = (z - m)/T`` by ``reductions.lane_sum`` (explicit SIMD lanes in a
   fixed order, block totals in float64);
   Rows ``i + 1`` of ``s`` and ``t`` are prefetched before pass 2 of row
   ``i``, so that pass 1 of the next row finds them in cache;
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

from kdnumba._policy import callee, parallel_jit
from kdnumba._constants import (
    DIV_JSD,
    DIV_REVERSE_KL,
    LABELS_INDEX,
    LABELS_NONE,
    SPARSE_DUPLICATE,
    SPARSE_OK,
    SPARSE_OUT_OF_RANGE,
)
from kdnumba.kernels.cpu.dtypes import cast_like
from kdnumba.kernels.cpu.fastexp import exp_nonpos, log_pos_f64
from kdnumba.kernels.cpu.reductions import lane_dot, lane_max, lane_sum
from kdnumba.kernels.cpu.simd import prefetch_row


_ROWS_PER_CHUNK = 16


#: Integer temperatures up to this one get the hard exponentials as powers of
#: the soft ones (see :func:`hard_power`).
_MAX_POWER = 4


@callee
def hard_power(inv_t):
    """``T`` when ``inv_t`` is the dtype's ``1/T`` (as the caller rounds it:
    float64, then the dtype) for an integer ``T`` in ``2 .. _MAX_POWER``, else 0.

    Then ``exp(s - m) = exp((s - m)/T)**T``: the hard term's exponentials are
    one to three multiplications of the soft ones instead of a third ``exp``
    per element (a third of pass 2). The power carries the soft value's
    relative error ``T`` times (a few ulp) and the rounding of ``1/T`` as
    ``|s - m| * eps`` in the exponent, the size of the rounding of
    ``(s - m)/T`` that every soft exponential already has.
    """
    power = np.int64(round(1.0 / np.float64(inv_t)))
    if power < 2 or power > _MAX_POWER or inv_t != cast_like(1.0 / np.float64(power), inv_t):
        return np.int64(0)
    return power


@callee
def _exponentials(s_row, t_row, m_s, m_t, inv_t, e_s_t, e_t_t, w_terms, e_s, with_hard, power):
    """Pass 2: element-wise, no reduction, so it vectorises fully.

    Fills ``e_s_t = exp(u_s)``, ``e_t_t = exp(u_t)`` and
    ``w_terms = e_t_t * (u_t - u_s)`` with ``u = (z - m) / T``, and when
    ``with_hard`` also ``e_s = exp(s - m_s)`` in the same loop (one read of
    the rows: 5 % faster than a separate pass, measured; the loop-invariant
    tests are hoisted out of the loop by LLVM): ``exp_nonpos(s - m_s)``
    when ``power`` is 0, else ``e_s_t ** power`` (:func:`hard_power`; the
    power's selects are branch-free).
    """
    for j in range(s_row.shape[0]):
        d_s = s_row[j] - m_s
        u_s = d_s * inv_t
        u_t = (t_row[j] - m_t) * inv_t
        # The difference before the exponentials: one value stays live across
        # them instead of two, which on AVX2 (16 vector registers) spared the
        # loop two spills and reloads per vector: pass 2 6-10 % faster on Zen 3
        # (0.94 -> 0.84 ns per element soft-only, 0.97 -> 0.91 with the hard
        # term), the same operations and bits.
        du = u_t - u_s
        es = exp_nonpos(u_s)
        et = exp_nonpos(u_t)
        e_s_t[j] = es
        e_t_t[j] = et
        w_terms[j] = et * du
        if with_hard:
            if power == 0:
                e_s[j] = exp_nonpos(d_s)
            else:
                h = es * es
                h = h * es if power >= 3 else h
                h = h * es if power >= 4 else h
                e_s[j] = h


@callee
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
    power = hard_power(inv_t)
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
            prefetch_row(s, i + 1)  # the next rows load from DRAM during this row's work
            prefetch_row(t, i + 1)
            _exponentials(s_row, t_row, m_s, m_t, inv_t, g_row, e_t_t, w_terms, e_s,
                          has_hard and not unit_t, power)
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
                # (``not has_hard``, True here, rather than a literal True: one
                # compiled _gradient_row instead of two.)
                _gradient_row(g_row, e_t_t, e_s, a_s, a_t, zero, not has_hard)
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


# --- other divergences: reverse KL, generalised JSD, TVD -------------------------------------
#
# ``divergence_rows`` has ``kd_rows``'s structure and arguments plus the
# divergence code and ``beta``. With ``p = e^T_s / Z_s`` (student),
# ``q = e^T_t / Z_t`` (teacher), ``u = (z - m)/T`` and ``x_j`` a per-column
# term kept in a scratch row, every soft gradient has the form
#
#     dD/du_j = p_j (x_j - k),   k = sum_j p_j x_j
#
# (the derivative through the softmax of a divergence whose partial in p_j
# is x_j), so one gradient loop serves all three:
#
# * reverse KL, KL(p || q): ``x = u_s - u_t``, ``D = k - log Z_s + log Z_t``;
# * JSD_beta, ``beta KL(q || m) + (1-beta) KL(p || m)``, ``m = beta q +
#   (1-beta) p``: with ``d = log q - log p`` and
#   ``L = log((1-beta) + beta e^d)`` (= log(m/p), by ``max(d, 0) +
#   log(w1 + w2 e^-|d|)``, an argument in ``[min(beta, 1-beta), 1]``, so no
#   log of an underflowed number), ``log(p/m) = -L``, ``log(q/m) = d - L``;
#   ``x = (1-beta)(-L)``, ``D = beta sum q (d - L) + (1-beta) sum p (-L)``
#   (the partial of D in p_j is ``(1-beta) log(p_j/m_j)``: the ``q/m``
#   terms cancel);
# * TVD, ``1/2 sum |p - q|``: ``x = sign(p - q)/2`` (0 where equal).
#
# Non-finite input: every divergence folds ``u_s - u_t`` (non-finite when
# either logit is) into a sum that reaches the row loss (TVD adds
# ``0 * x`` for that), so the caller's check of the total sees it.


@callee
def _div_exponentials(s_row, t_row, m_s, m_t, inv_t, e_s_t, e_t_t, x, e_s, with_hard):
    """``e_s_t = exp(u_s)``, ``e_t_t = exp(u_t)``, ``x = u_s - u_t`` and, with
    ``with_hard``, ``e_s = exp(s - m_s)``, in one vectorised loop."""
    for j in range(s_row.shape[0]):
        d_s = s_row[j] - m_s
        u_s = d_s * inv_t
        u_t = (t_row[j] - m_t) * inv_t
        x[j] = u_s - u_t  # first: fewer values live across the exponentials (see _exponentials)
        e_s_t[j] = exp_nonpos(u_s)
        e_t_t[j] = exp_nonpos(u_t)
        if with_hard:
            e_s[j] = exp_nonpos(d_s)


@callee
def _jsd_terms(x, shift, beta, y):
    """In place: ``x_j <- -L_j`` (``log p/m``) and ``y_j = d_j - L_j`` (``log q/m``)
    from ``x_j = u_s - u_t`` on entry, with ``d = shift - x`` = ``log q - log p``
    (``shift = log Z_s - log Z_t``). The log runs in float64 (its branch-free
    form vectorises; its argument lies in ``[min(beta, 1 - beta), 1]``)."""
    b = np.float64(beta)
    for j in range(x.shape[0]):
        d = shift - x[j]
        e = exp_nonpos(-abs(d))
        pos = d > 0
        w1 = b if pos else 1.0 - b
        w2 = 1.0 - b if pos else b
        big_l = max(np.float64(d), 0.0) + log_pos_f64(w1 + w2 * np.float64(e))
        x[j] = cast_like(-big_l, x)
        y[j] = cast_like(np.float64(d) - big_l, x)


@callee
def _tvd_terms(e_s_t, e_t_t, inv_zs, ratio, x, y):
    """``y = |p - q|`` and, in place, ``x = sign(p - q)/2 + 0 * x`` (the ``0 * x``
    carries a non-finite ``u_s - u_t`` into the sums). ``p - q`` is taken as
    ``(e_s - e_t Z_s/Z_t) / Z_s``: exactly 0 where student and teacher rows are
    equal, even when LLVM contracts the product into an FMA."""
    half = cast_like(0.5, x)
    zero = cast_like(0.0, x)
    for j in range(x.shape[0]):
        diff = (e_s_t[j] - e_t_t[j] * ratio) * inv_zs
        sgn = half if diff > zero else (-half if diff < zero else zero)
        y[j] = abs(diff)
        x[j] = sgn + zero * x[j]


@callee
def _div_gradient_row(g_row, x, e_s, a, k, a_h, reuse_soft):
    """In place: ``g = a e^T_s (x - k) + a_h e_s``, ``g_row`` holding ``e^T_s`` on
    entry (``reuse_soft``: ``e_s`` is ``e^T_s``, taken from ``g_row``)."""
    for j in range(g_row.shape[0]):
        e = g_row[j]
        h = e if reuse_soft else e_s[j]
        g_row[j] = a * e * (x[j] - k) + a_h * h


@parallel_jit
def divergence_rows(s, t, labels_index, labels_dense, labels_kind, divergence, beta, inv_t,
                    w_soft, w_hard, c_soft, c_hard, grad, row_loss):
    """Fused loss and gradient of the soft term ``T^2 mean_i D(q_i, p_i)`` for
    ``D`` = reverse KL, JSD or TVD (``divergence`` one of :data:`DIV_REVERSE_KL`,
    :data:`DIV_JSD`, :data:`DIV_TVD`), with the hard term of :func:`kd_rows`.

    Parameters as :func:`kd_rows`, plus ``divergence`` (int64 code) and
    ``beta`` (float64, the JSD weight of the teacher, in (0, 1)). Loss and
    gradient come from the same exponentials (one ``exp`` per element and
    input, three passes over the row while it is in cache). Non-finite input
    makes the row loss non-finite.
    """
    n_rows, n_cols = s.shape
    per_chunk = max(1, min(_ROWS_PER_CHUNK, n_rows // 32))
    n_chunks = (n_rows + per_chunk - 1) // per_chunk
    has_hard = labels_kind != LABELS_NONE
    unit_t = inv_t == 1
    for chunk in prange(n_chunks):
        e_t_t = np.empty(n_cols, dtype=s.dtype)
        x = np.empty(n_cols, dtype=s.dtype)
        y = np.empty(n_cols if divergence != DIV_REVERSE_KL else 0, dtype=s.dtype)
        e_s = np.empty(n_cols if has_hard and not unit_t else 0, dtype=s.dtype)
        stop = min(n_rows, (chunk + 1) * per_chunk)
        for i in range(chunk * per_chunk, stop):
            s_row = s[i]
            t_row = t[i]
            g_row = grad[i]
            m_s = lane_max(s_row)
            m_t = lane_max(t_row)
            _div_exponentials(s_row, t_row, m_s, m_t, inv_t, g_row, e_t_t, x, e_s,
                              has_hard and not unit_t)
            z_s = lane_sum(g_row)
            z_t = lane_sum(e_t_t)
            log_zs = math.log(z_s)
            log_zt = math.log(z_t)
            if divergence == DIV_REVERSE_KL:
                k = lane_dot(g_row, x) / z_s
                div = k - log_zs + log_zt
                a = c_soft / z_s
            elif divergence == DIV_JSD:
                _jsd_terms(x, cast_like(log_zs - log_zt, s), beta, y)
                k_s = lane_dot(g_row, x) / z_s
                k_t = lane_dot(e_t_t, y) / z_t
                div = beta * k_t + (1.0 - beta) * k_s
                a = c_soft * (1.0 - beta) / z_s
                k = k_s
            else:
                _tvd_terms(g_row, e_t_t, cast_like(1.0 / z_s, s), cast_like(z_s / z_t, s),
                           x, y)
                k = lane_dot(g_row, x) / z_s
                div = 0.5 * lane_sum(y) + 0.0 * k
                a = c_soft / z_s
            # D >= 0 exactly; rounding can leave a tiny negative value.
            loss = w_soft * max(div, 0.0) if div == div else w_soft * div
            if not has_hard:
                # ``not has_hard`` (True here), not a literal True: a literal
                # compiles a second specialisation of the helper (see kd_rows).
                _div_gradient_row(g_row, x, e_s, cast_like(a, s), cast_like(k, s),
                                  cast_like(0.0, s), not has_hard)
            else:
                z_h = z_s if unit_t else lane_sum(e_s)
                lse = m_s + math.log(z_h)
                if labels_kind == LABELS_INDEX:
                    yi = labels_index[i]
                    _div_gradient_row(g_row, x, e_s, cast_like(a, s), cast_like(k, s),
                                      cast_like(c_hard / z_h, s), unit_t)
                    g_row[yi] -= cast_like(c_hard, s)
                    loss += w_hard * (lse - s_row[yi])
                else:
                    y_row = labels_dense[i]
                    y_sum = lane_sum(y_row)
                    _div_gradient_row(g_row, x, e_s, cast_like(a, s), cast_like(k, s),
                                      cast_like(c_hard * y_sum / z_h, s), unit_t)
                    c_h = cast_like(c_hard, s)
                    for j in range(n_cols):
                        g_row[j] -= c_h * y_row[j]
                    loss += w_hard * (lse * y_sum - lane_dot(y_row, s_row))
            row_loss[i] = loss


# --- sparse (top-K) teachers -----------------------------------------------------------------


@callee
def _soft_exponentials(s_row, m_s, inv_t, e_s_t, e_s, with_hard):
    """``e_s_t = exp((s - m_s)/T)`` and, with ``with_hard``, ``e_s = exp(s - m_s)``."""
    for j in range(s_row.shape[0]):
        d_s = s_row[j] - m_s
        e_s_t[j] = exp_nonpos(d_s * inv_t)
        if with_hard:
            e_s[j] = exp_nonpos(d_s)


@callee
def _scale_row(g_row, e_s, a_s, a_h, reuse_soft):
    """In place: ``g = a_s e^T_s + a_h e_s`` (``g_row`` holds ``e^T_s`` on entry)."""
    for j in range(g_row.shape[0]):
        e = g_row[j]
        h = e if reuse_soft else e_s[j]
        g_row[j] = a_s * e + a_h * h


@callee
def _teacher_terms(v_row, idx_row, s_row, m_v, m_s, inv_t, e_q, w_q):
    """The top-K teacher's ``e_q = exp(u_q)`` and ``w_q = e_q (u_q - u_s[idx])``
    with ``u_q = (v - m_v)/T``, ``u_s = (s - m_s)/T``. A helper rather than a
    loop in the ``prange`` body: the body's own ``exp`` call compiled the
    exponential a second time (issue 16)."""
    for k in range(v_row.shape[0]):
        u_q = (v_row[k] - m_v) * inv_t
        e = exp_nonpos(u_q)
        e_q[k] = e
        w_q[k] = e * (u_q - (s_row[idx_row[k]] - m_s) * inv_t)


@callee
def check_topk_row(idx_row, g_row):
    """:data:`SPARSE_OK`, :data:`SPARSE_OUT_OF_RANGE` or :data:`SPARSE_DUPLICATE`
    for one row of top-K indices, in O(K) and without extra memory: every
    index ``j`` writes its position ``k`` into ``g_row[j]`` (free scratch: the
    gradient row is written afterwards), then reads it back; two equal
    indices leave one of them reading the other's position. Positions are
    exact in float32 (``K <= C < 2^24`` for any row this kernel sees)."""
    n_cols = g_row.shape[0]
    for k in range(idx_row.shape[0]):
        j = idx_row[k]
        if j < 0 or j >= n_cols:
            return SPARSE_OUT_OF_RANGE
    for k in range(idx_row.shape[0]):
        g_row[idx_row[k]] = k
    for k in range(idx_row.shape[0]):
        if g_row[idx_row[k]] != k:
            return SPARSE_DUPLICATE
    return SPARSE_OK


@parallel_jit
def sparse_kd_rows(s, top_v, top_i, labels_index, labels_dense, labels_kind, inv_t,
                   w_soft, w_hard, c_soft, c_hard, grad, row_loss, row_status):
    """KD against a top-K teacher: loss and gradient, one row per ``prange`` step.

    Parameters as :func:`kd_rows`, with the teacher given as ``top_v`` (``(B, K)``
    F logits) and ``top_i`` (``(B, K)`` int64 column indices, unique per row,
    in ``[0, C)``), plus ``row_status`` (``(B,)`` int64 output: a
    ``SPARSE_*`` code; a bad row gets a NaN loss and is not computed).

    Per row (``u = (s - m_s)/T``, ``q_k = exp((v_k - m_v)/T) / Z_q``)::

        KL_i = W/Z_q - log Z_q + log Z_s,  W = sum_k e_q,k ((v_k - m_v)/T - u[idx_k])
        g    = c_soft (e^T_s / Z_s - q scattered to idx) + c_hard (hard term)

    One pass of exponentials over the student row plus O(K) for the teacher;
    no dense teacher row. ``0 * sum(s_row)`` is added to the loss so that a
    non-finite student logit off the teacher's support still reaches it.
    """
    n_rows, n_cols = s.shape
    n_top = top_v.shape[1]
    per_chunk = max(1, min(_ROWS_PER_CHUNK, n_rows // 32))
    n_chunks = (n_rows + per_chunk - 1) // per_chunk
    has_hard = labels_kind != LABELS_NONE
    unit_t = inv_t == 1
    for chunk in prange(n_chunks):
        e_q = np.empty(n_top, dtype=s.dtype)
        w_q = np.empty(n_top, dtype=s.dtype)
        e_s = np.empty(n_cols if has_hard and not unit_t else 0, dtype=s.dtype)
        stop = min(n_rows, (chunk + 1) * per_chunk)
        for i in range(chunk * per_chunk, stop):
            s_row = s[i]
            v_row = top_v[i]
            idx_row = top_i[i]
            g_row = grad[i]
            status = check_topk_row(idx_row, g_row)
            row_status[i] = status
            if status != SPARSE_OK:
                row_loss[i] = math.nan
                continue
            m_s = lane_max(s_row)
            _soft_exponentials(s_row, m_s, inv_t, g_row, e_s, has_hard and not unit_t)
            z_s = lane_sum(g_row)
            _teacher_terms(v_row, idx_row, s_row, lane_max(v_row), m_s, inv_t, e_q, w_q)
            z_q = lane_sum(e_q)
            kl = lane_sum(w_q) / z_q - math.log(z_q) + math.log(z_s)
            kl = max(kl, 0.0) if kl == kl else kl
            loss = w_soft * kl + 0.0 * lane_sum(s_row)
            a_s = cast_like(c_soft / z_s, s)
            if not has_hard:
                # ``not has_hard``, not a literal True (see kd_rows)
                _scale_row(g_row, e_s, a_s, cast_like(0.0, s), not has_hard)
            else:
                z_h = z_s if unit_t else lane_sum(e_s)
                lse = m_s + math.log(z_h)
                if labels_kind == LABELS_INDEX:
                    yi = labels_index[i]
                    _scale_row(g_row, e_s, a_s, cast_like(c_hard / z_h, s), unit_t)
                    g_row[yi] -= cast_like(c_hard, s)
                    loss += w_hard * (lse - s_row[yi])
                else:
                    y_row = labels_dense[i]
                    y_sum = lane_sum(y_row)
                    _scale_row(g_row, e_s, a_s, cast_like(c_hard * y_sum / z_h, s), unit_t)
                    c_h = cast_like(c_hard, s)
                    for j in range(n_cols):
                        g_row[j] -= c_h * y_row[j]
                    loss += w_hard * (lse * y_sum - lane_dot(y_row, s_row))
            a_q = c_soft / z_q
            for k in range(n_top):
                g_row[idx_row[k]] -= cast_like(a_q * e_q[k], s)
            row_loss[i] = loss
