"""Response-based KD on the GPU: the CUDA twin of ``kernels.cpu.softmax_kl``.

:func:`kd_rows` has the CPU kernel's signature (on device arrays) and the
same per-row results up to rounding. One thread block owns one row of the
``(B, C)`` logits and reads it twice:

1. **Statistics (online softmax).** Thread ``k`` walks columns
   ``k, k + nt, k + 2 nt, ...`` (coalesced) keeping running maxima
   ``m_s, m_t`` (started at the row's first element, an element of the row,
   so threads that own no column contribute exactly zero) and float64 sums
   rescaled whenever its maximum grows::

       Z_s = sum exp((s_j - m_s)/T)     Z_t = sum exp((t_j - m_t)/T)
       V   = sum exp((t_j - m_t)/T) * ((t_j - t_0) - (s_j - s_0))/T
       Z_h = sum exp(s_j - m_s)                       (hard term)
       Y = sum y_j,  YS = sum y_j (s_j - s_0)         (dense labels)

   The block takes the maxima ``M`` (tree max), every thread rescales its
   partials by ``exp((m - M)/T)``, and a tree sum in fixed order gives the
   row totals. Differences are taken against the row's first element
   ``(s_0, t_0)`` so that a common offset of the logits cancels exactly as
   on the CPU (where the offset is the row maximum).
2. **Gradient.** ``g_j = c_soft (e^{(s_j-M_s)/T}/Z_s - e^{(t_j-M_t)/T}/Z_t)
   + c_hard (Y e^{s_j-M_s}/Z_h - y_j)``; the exponentials are recomputed
   (cheaper than a third trip to memory).

Per row (thread 0 writes it)::

    KL = V/Z_t - ((M_t - t_0) - (M_s - s_0))/T - log Z_t + log Z_s
    CE = (M_s - s_y) + log Z_h                         (index labels)
    CE = ((M_s - s_0) + log Z_h) Y - YS                (dense labels)
    row_loss = w_soft KL + w_hard CE

Contract with the caller, as on the CPU: NaN/inf anywhere in a row's
inputs makes its ``row_loss`` non-finite. Because labels that live on the
GPU cannot be checked on the host without copying them, this kernel also
writes NaN for a row whose index label is outside ``[0, C)`` (never reading
out of bounds) or whose dense label row has a negative entry or does not sum
to 1 within 1e-3. The caller checks only the total and, on the error path,
copies the inputs back to name the culprit.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, types

from kdnumba._constants import (
    DIV_JSD,
    DIV_REVERSE_KL,
    LABELS_DENSE,
    LABELS_INDEX,
    LABELS_NONE,
    SPARSE_DUPLICATE,
    SPARSE_OK,
    SPARSE_OUT_OF_RANGE,
)
from kdnumba.kernels.cuda import block_reductions, block_size, compile_kernel, grid_size

tree_sum, tree_max = block_reductions(globals())


#: float64 partials per thread in shared memory (phase B: Z_s Z_t V Z_h Y YS).
_N_PARTIALS = 6

_SIGNATURE = ("void({F}[:, ::1], {F}[:, ::1], int64[::1], {F}[:, ::1], int64, {F}, "
              "float64, float64, float64, float64, {F}[:, ::1], float64[::1])")


@cuda.jit(device=True)
def _kd_row(sh, i, s, t, labels_index, labels_dense, labels_kind, inv_t,
            w_soft, w_hard, c_soft, c_hard, grad, row_loss):
    """Row ``i`` (the whole block works on it; see the module docstring)."""
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    n_cols = s.shape[1]
    has_hard = labels_kind != LABELS_NONE
    dense = labels_kind == LABELS_DENSE

    # -- pass 1: per-thread online statistics ---------------------------------
    s0 = s[i, 0]
    t0 = t[i, 0]
    m_s = s0
    m_t = t0
    z_s = 0.0
    z_t = 0.0
    v = 0.0
    z_h = 0.0
    y_sum = 0.0
    ys_sum = 0.0
    neg_y = 0.0  # max_j(-y_j): > 0 iff some label entry is negative
    for j in range(tid, n_cols, nt):
        x = s[i, j]
        u = t[i, j]
        # NaN never compares greater, so a NaN flows into the sums below.
        if x > m_s:
            z_s *= math.exp((m_s - x) * inv_t)
            z_h *= math.exp(m_s - x)
            m_s = x
        if u > m_t:
            r = math.exp((m_t - u) * inv_t)
            z_t *= r
            v *= r
            m_t = u
        e_t = math.exp((u - m_t) * inv_t)
        z_s += math.exp((x - m_s) * inv_t)
        z_t += e_t
        v += e_t * (((u - t0) - (x - s0)) * inv_t)
        if has_hard:
            z_h += math.exp(x - m_s)
            if dense:
                y = labels_dense[i, j]
                y_sum += y
                ys_sum += y * (x - s0)
                if -y > neg_y:
                    neg_y = -y

    # -- block maxima -----------------------------------------------------------
    sh[tid] = m_s
    sh[nt + tid] = m_t
    sh[2 * nt + tid] = neg_y
    cuda.syncthreads()
    tree_max(sh, 3, tid, nt)
    big_s = sh[0]
    big_t = sh[nt]
    any_negative = sh[2 * nt] > 0.0
    cuda.syncthreads()  # everyone has read the maxima before sh is reused

    # -- rescale to the block maxima, then block sums -----------------------------
    f_s = math.exp((m_s - big_s) * inv_t)
    f_t = math.exp((m_t - big_t) * inv_t)
    sh[tid] = z_s * f_s
    sh[nt + tid] = z_t * f_t
    sh[2 * nt + tid] = v * f_t
    sh[3 * nt + tid] = z_h * math.exp(m_s - big_s)
    sh[4 * nt + tid] = y_sum
    sh[5 * nt + tid] = ys_sum
    cuda.syncthreads()
    tree_sum(sh, _N_PARTIALS, tid, nt)
    z_s = sh[0]
    z_t = sh[nt]
    v = sh[2 * nt]
    z_h = sh[3 * nt]
    y_sum = sh[4 * nt]
    ys_sum = sh[5 * nt]
    # The maxima back in the row's dtype, so that pass 2 stays in it.
    mx_s = s.dtype.type(big_s)
    mx_t = s.dtype.type(big_t)

    y_index = -1
    if labels_kind == LABELS_INDEX:
        y_index = labels_index[i]

    # -- the row loss -------------------------------------------------------------
    if tid == 0:
        kl = (v / z_t - ((big_t - t0) - (big_s - s0)) * inv_t
              - math.log(z_t) + math.log(z_s))
        loss = w_soft * kl
        if labels_kind == LABELS_INDEX:
            if 0 <= y_index < n_cols:
                loss += w_hard * ((big_s - s[i, y_index]) + math.log(z_h))
            else:
                loss = math.nan
        elif dense:
            loss += w_hard * (((big_s - s0) + math.log(z_h)) * y_sum - ys_sum)
            if any_negative or abs(y_sum - 1.0) > 1e-3:
                loss = math.nan
        row_loss[i] = loss

    # -- pass 2: the gradient row ------------------------------------------------------
    a_s = c_soft / z_s
    a_t = c_soft / z_t
    a_h = c_hard * (y_sum if dense else 1.0) / z_h if has_hard else 0.0
    for j in range(tid, n_cols, nt):
        x = s[i, j]
        g = (a_s * math.exp((x - mx_s) * inv_t)
             - a_t * math.exp((t[i, j] - mx_t) * inv_t))
        if has_hard:
            g += a_h * math.exp(x - mx_s)
            if dense:
                g -= c_hard * labels_dense[i, j]
            elif j == y_index:
                g -= c_hard
        grad[i, j] = g


def _kd_rows_kernel(s, t, labels_index, labels_dense, labels_kind, inv_t,
                    w_soft, w_hard, c_soft, c_hard, grad, row_loss):
    sh = cuda.shared.array(0, dtype=types.float64)
    # Grid-stride over rows (a GPU launch has one block per row).
    for i in range(cuda.blockIdx.x, s.shape[0], cuda.gridDim.x):
        _kd_row(sh, i, s, t, labels_index, labels_dense, labels_kind, inv_t,
                w_soft, w_hard, c_soft, c_hard, grad, row_loss)
        cuda.syncthreads()  # the next row reuses sh


# --- other divergences (reverse KL, JSD, TVD) ---------------------------------------------------
#
# The CPU kernel's math (see kernels/cpu/softmax_kl.py) in four strided
# passes per row, all against the block maxima ``M_s, M_t``:
#   A. maxima (and the dense labels' sign check);
#   B. Z_s, Z_t, Z_h, Y, YS and, for reverse KL, V = sum e_s (u_s - u_t);
#   C. JSD: sum e_s (-L), sum e_t (d - L); TVD: sum |p - q|, sum p sign(p - q)/2
#      (plus 0 * (u_s - u_t), which carries a non-finite logit into the sums);
#   D. the gradient ``a e_s (x - k) + hard``, exponentials recomputed.

_DIV_SIGNATURE = ("void({F}[:, ::1], {F}[:, ::1], int64[::1], {F}[:, ::1], int64, int64, "
                  "float64, {F}, float64, float64, float64, float64, {F}[:, ::1], float64[::1])")
_DIV_PARTIALS = 6


@cuda.jit(device=True)
def _jsd_log_ratio(d, beta):
    """``L = log((1 - beta) + beta e^d)`` without overflow or a log of ~0."""
    if d > 0.0:
        return d + math.log(beta + (1.0 - beta) * math.exp(-d))
    return math.log((1.0 - beta) + beta * math.exp(d))


@cuda.jit(device=True)
def _div_x(divergence, beta, u_s, u_t, shift, p, q):
    """The per-column term ``x_j`` (see the CPU module) in float64."""
    if divergence == DIV_REVERSE_KL:
        return u_s - u_t
    if divergence == DIV_JSD:
        return -_jsd_log_ratio(shift - (u_s - u_t), beta)
    diff = p - q
    return (0.5 if diff > 0.0 else (-0.5 if diff < 0.0 else 0.0)) + 0.0 * (u_s - u_t)


@cuda.jit(device=True)
def _div_row(sh, i, s, t, labels_index, labels_dense, labels_kind, divergence, beta, inv_t,
             w_soft, w_hard, c_soft, c_hard, grad, row_loss):
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    n_cols = s.shape[1]
    has_hard = labels_kind != LABELS_NONE
    dense = labels_kind == LABELS_DENSE
    inv = np.float64(inv_t)

    # -- A: maxima --------------------------------------------------------------------
    m_s = np.float64(s[i, 0])
    m_t = np.float64(t[i, 0])
    neg_y = 0.0
    for j in range(tid, n_cols, nt):
        x = np.float64(s[i, j])
        u = np.float64(t[i, j])
        if x > m_s or x != x:
            m_s = x
        if u > m_t or u != u:
            m_t = u
        if dense:
            if -labels_dense[i, j] > neg_y:
                neg_y = -labels_dense[i, j]
    sh[tid] = m_s
    sh[nt + tid] = m_t
    sh[2 * nt + tid] = neg_y
    cuda.syncthreads()
    tree_max(sh, 3, tid, nt)
    big_s = sh[0]
    big_t = sh[nt]
    any_negative = sh[2 * nt] > 0.0
    cuda.syncthreads()

    # -- B: normalisers ------------------------------------------------------------------
    z_s = 0.0
    z_t = 0.0
    z_h = 0.0
    v = 0.0
    y_sum = 0.0
    ys_sum = 0.0
    for j in range(tid, n_cols, nt):
        x = np.float64(s[i, j])
        u_s = (x - big_s) * inv
        u_t = (np.float64(t[i, j]) - big_t) * inv
        e_s = math.exp(u_s)
        z_s += e_s
        z_t += math.exp(u_t)
        if divergence == DIV_REVERSE_KL:
            v += e_s * (u_s - u_t)
        if has_hard:
            z_h += math.exp(x - big_s)
            if dense:
                y = np.float64(labels_dense[i, j])
                y_sum += y
                ys_sum += y * (x - big_s)
    sh[tid] = z_s
    sh[nt + tid] = z_t
    sh[2 * nt + tid] = z_h
    sh[3 * nt + tid] = v
    sh[4 * nt + tid] = y_sum
    sh[5 * nt + tid] = ys_sum
    cuda.syncthreads()
    tree_sum(sh, _DIV_PARTIALS, tid, nt)
    z_s = sh[0]
    z_t = sh[nt]
    z_h = sh[2 * nt]
    v = sh[3 * nt]
    y_sum = sh[4 * nt]
    ys_sum = sh[5 * nt]
    cuda.syncthreads()
    log_zs = math.log(z_s)
    log_zt = math.log(z_t)
    shift = log_zs - log_zt

    # -- C: the divergence's own sums -------------------------------------------------
    if divergence == DIV_REVERSE_KL:
        k = v / z_s
        div = k - log_zs + log_zt
        a = c_soft / z_s
    else:
        acc1 = 0.0
        acc2 = 0.0
        for j in range(tid, n_cols, nt):
            u_s = (np.float64(s[i, j]) - big_s) * inv
            u_t = (np.float64(t[i, j]) - big_t) * inv
            e_s = math.exp(u_s)
            e_t = math.exp(u_t)
            if divergence == DIV_JSD:
                d = shift - (u_s - u_t)
                big_l = _jsd_log_ratio(d, beta)
                acc1 += e_s * -big_l
                acc2 += e_t * (d - big_l)
            else:
                diff = (e_s - e_t * (z_s / z_t)) / z_s  # exactly 0 where the rows agree
                acc1 += e_s * _div_x(divergence, beta, u_s, u_t, shift, diff, 0.0)
                acc2 += abs(diff)
        sh[tid] = acc1
        sh[nt + tid] = acc2
        cuda.syncthreads()
        tree_sum(sh, 2, tid, nt)
        acc1 = sh[0]
        acc2 = sh[nt]
        cuda.syncthreads()
        if divergence == DIV_JSD:
            k = acc1 / z_s
            div = beta * (acc2 / z_t) + (1.0 - beta) * k
            a = c_soft * (1.0 - beta) / z_s
        else:
            k = acc1 / z_s
            div = 0.5 * acc2 + 0.0 * k
            a = c_soft / z_s

    y_index = -1
    if labels_kind == LABELS_INDEX:
        y_index = labels_index[i]

    if tid == 0:
        loss = w_soft * (0.0 if div < 0.0 else div)  # D >= 0; NaN passes
        if labels_kind == LABELS_INDEX:
            if 0 <= y_index < n_cols:
                loss += w_hard * ((big_s - s[i, y_index]) + math.log(z_h))
            else:
                loss = math.nan
        elif dense:
            loss += w_hard * (math.log(z_h) * y_sum - ys_sum)
            if any_negative or abs(y_sum - 1.0) > 1e-3:
                loss = math.nan
        row_loss[i] = loss

    # -- D: the gradient row ------------------------------------------------------------
    a_h = c_hard * (y_sum if dense else 1.0) / z_h if has_hard else 0.0
    for j in range(tid, n_cols, nt):
        x = np.float64(s[i, j])
        u_s = (x - big_s) * inv
        u_t = (np.float64(t[i, j]) - big_t) * inv
        e_s = math.exp(u_s)
        xj = _div_x(divergence, beta, u_s, u_t, shift,
                    (e_s - math.exp(u_t) * (z_s / z_t)) / z_s, 0.0)
        g = a * e_s * (xj - k)
        if has_hard:
            g += a_h * math.exp(x - big_s)
            if dense:
                g -= c_hard * labels_dense[i, j]
            elif j == y_index:
                g -= c_hard
        grad[i, j] = g


def _divergence_rows_kernel(s, t, labels_index, labels_dense, labels_kind, divergence, beta,
                            inv_t, w_soft, w_hard, c_soft, c_hard, grad, row_loss):
    sh = cuda.shared.array(0, dtype=types.float64)
    for i in range(cuda.blockIdx.x, s.shape[0], cuda.gridDim.x):
        _div_row(sh, i, s, t, labels_index, labels_dense, labels_kind, divergence, beta, inv_t,
                 w_soft, w_hard, c_soft, c_hard, grad, row_loss)
        cuda.syncthreads()


def divergence_rows(s, t, labels_index, labels_dense, labels_kind, divergence, beta, inv_t,
                    w_soft, w_hard, c_soft, c_hard, grad, row_loss):
    """Reverse KL / JSD / TVD loss and gradient on the GPU, one block per row;
    the parameters of ``kdnumba.kernels.cpu.softmax_kl.divergence_rows``."""
    n_rows, n_cols = s.shape
    dtype = np.dtype(s.dtype)
    kernel = compile_kernel(_divergence_rows_kernel, _DIV_SIGNATURE, dtype)
    threads = block_size(n_cols)
    kernel[grid_size(n_rows), threads, 0, _DIV_PARTIALS * threads * 8](
        s, t, labels_index, labels_dense, int(labels_kind), int(divergence), float(beta),
        dtype.type(inv_t), float(w_soft), float(w_hard), float(c_soft), float(c_hard),
        grad, row_loss)


# --- sparse (top-K) teachers ----------------------------------------------------------------
#
# Per row: A. maxima of the student row and of the K teacher logits, and the
# index range check; B. duplicates: every index writes its position into the
# (not yet written) gradient row, and reads it back; C. Z_s, Z_h, Y, YS,
# sum(s) (a non-finite student logit off the support reaches the loss) and,
# over K, Z_q and W = sum e_q (u_q - u_s[idx]); D. the dense gradient
# ``c_soft e^T_s / Z_s + hard``, then ``- c_soft q_k`` at the K columns.

_SPARSE_SIGNATURE = ("void({F}[:, ::1], {F}[:, ::1], int64[:, ::1], int64[::1], {F}[:, ::1], "
                     "int64, {F}, float64, float64, float64, float64, {F}[:, ::1], "
                     "float64[::1], int64[::1])")
_SPARSE_PARTIALS = 7


@cuda.jit(device=True)
def _sparse_row(sh, i, s, top_v, top_i, labels_index, labels_dense, labels_kind, inv_t,
                w_soft, w_hard, c_soft, c_hard, grad, row_loss, row_status):
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    n_cols = s.shape[1]
    n_top = top_v.shape[1]
    has_hard = labels_kind != LABELS_NONE
    dense = labels_kind == LABELS_DENSE
    inv = np.float64(inv_t)

    # -- A: maxima, index range ---------------------------------------------------------
    m_s = np.float64(s[i, 0])
    m_v = np.float64(top_v[i, 0])
    out_of_range = 0.0
    neg_y = 0.0
    for j in range(tid, n_cols, nt):
        x = np.float64(s[i, j])
        if x > m_s or x != x:
            m_s = x
        if dense:
            if -labels_dense[i, j] > neg_y:
                neg_y = -labels_dense[i, j]
    for k in range(tid, n_top, nt):
        u = np.float64(top_v[i, k])
        if u > m_v or u != u:
            m_v = u
        col = top_i[i, k]
        if col < 0 or col >= n_cols:
            out_of_range = 1.0
    sh[tid] = m_s
    sh[nt + tid] = m_v
    sh[2 * nt + tid] = out_of_range
    sh[3 * nt + tid] = neg_y
    cuda.syncthreads()
    tree_max(sh, 4, tid, nt)
    big_s = sh[0]
    big_v = sh[nt]
    out_of_range = sh[2 * nt]
    any_negative = sh[3 * nt] > 0.0
    cuda.syncthreads()
    if out_of_range > 0.0:
        if tid == 0:
            row_status[i] = SPARSE_OUT_OF_RANGE
            row_loss[i] = math.nan
        return

    # -- B: duplicates ------------------------------------------------------------------
    for k in range(tid, n_top, nt):
        grad[i, top_i[i, k]] = k
    cuda.syncthreads()
    duplicate = 0.0
    for k in range(tid, n_top, nt):
        if grad[i, top_i[i, k]] != k:
            duplicate = 1.0
    sh[tid] = duplicate
    cuda.syncthreads()
    tree_max(sh, 1, tid, nt)
    duplicate = sh[0]
    cuda.syncthreads()
    if duplicate > 0.0:
        if tid == 0:
            row_status[i] = SPARSE_DUPLICATE
            row_loss[i] = math.nan
        return

    # -- C: sums --------------------------------------------------------------------------
    z_s = 0.0
    z_h = 0.0
    y_sum = 0.0
    ys_sum = 0.0
    s_sum = 0.0
    for j in range(tid, n_cols, nt):
        x = np.float64(s[i, j])
        s_sum += x
        z_s += math.exp((x - big_s) * inv)
        if has_hard:
            z_h += math.exp(x - big_s)
            if dense:
                y = np.float64(labels_dense[i, j])
                y_sum += y
                ys_sum += y * (x - big_s)
    z_q = 0.0
    w = 0.0
    for k in range(tid, n_top, nt):
        u_q = (np.float64(top_v[i, k]) - big_v) * inv
        e = math.exp(u_q)
        z_q += e
        w += e * (u_q - (np.float64(s[i, top_i[i, k]]) - big_s) * inv)
    sh[tid] = z_s
    sh[nt + tid] = z_h
    sh[2 * nt + tid] = y_sum
    sh[3 * nt + tid] = ys_sum
    sh[4 * nt + tid] = s_sum
    sh[5 * nt + tid] = z_q
    sh[6 * nt + tid] = w
    cuda.syncthreads()
    tree_sum(sh, _SPARSE_PARTIALS, tid, nt)
    z_s = sh[0]
    z_h = sh[nt]
    y_sum = sh[2 * nt]
    ys_sum = sh[3 * nt]
    s_sum = sh[4 * nt]
    z_q = sh[5 * nt]
    w = sh[6 * nt]
    cuda.syncthreads()

    y_index = -1
    if labels_kind == LABELS_INDEX:
        y_index = labels_index[i]
    if tid == 0:
        row_status[i] = SPARSE_OK
        kl = w / z_q - math.log(z_q) + math.log(z_s)
        loss = w_soft * (0.0 if kl < 0.0 else kl) + 0.0 * s_sum  # NaN passes
        if labels_kind == LABELS_INDEX:
            if 0 <= y_index < n_cols:
                loss += w_hard * ((big_s - s[i, y_index]) + math.log(z_h))
            else:
                loss = math.nan
        elif dense:
            loss += w_hard * (math.log(z_h) * y_sum - ys_sum)
            if any_negative or abs(y_sum - 1.0) > 1e-3:
                loss = math.nan
        row_loss[i] = loss

    # -- D: the gradient ----------------------------------------------------------------------
    a_s = c_soft / z_s
    a_h = c_hard * (y_sum if dense else 1.0) / z_h if has_hard else 0.0
    for j in range(tid, n_cols, nt):
        x = np.float64(s[i, j])
        g = a_s * math.exp((x - big_s) * inv)
        if has_hard:
            g += a_h * math.exp(x - big_s)
            if dense:
                g -= c_hard * labels_dense[i, j]
            elif j == y_index:
                g -= c_hard
        grad[i, j] = g
    cuda.syncthreads()
    a_q = c_soft / z_q
    for k in range(tid, n_top, nt):
        col = top_i[i, k]
        grad[i, col] = grad[i, col] - a_q * math.exp((np.float64(top_v[i, k]) - big_v) * inv)


def _sparse_kd_rows_kernel(s, top_v, top_i, labels_index, labels_dense, labels_kind, inv_t,
                           w_soft, w_hard, c_soft, c_hard, grad, row_loss, row_status):
    sh = cuda.shared.array(0, dtype=types.float64)
    for i in range(cuda.blockIdx.x, s.shape[0], cuda.gridDim.x):
        _sparse_row(sh, i, s, top_v, top_i, labels_index, labels_dense, labels_kind, inv_t,
                    w_soft, w_hard, c_soft, c_hard, grad, row_loss, row_status)
        cuda.syncthreads()


def sparse_kd_rows(s, top_v, top_i, labels_index, labels_dense, labels_kind, inv_t,
                   w_soft, w_hard, c_soft, c_hard, grad, row_loss, row_status):
    """KD against a top-K teacher on the GPU, one block per row; the parameters
    of ``kdnumba.kernels.cpu.softmax_kl.sparse_kd_rows``."""
    n_rows, n_cols = s.shape
    dtype = np.dtype(s.dtype)
    kernel = compile_kernel(_sparse_kd_rows_kernel, _SPARSE_SIGNATURE, dtype)
    threads = block_size(n_cols)
    kernel[grid_size(n_rows), threads, 0, _SPARSE_PARTIALS * threads * 8](
        s, top_v, top_i, labels_index, labels_dense, int(labels_kind), dtype.type(inv_t),
        float(w_soft), float(w_hard), float(c_soft), float(c_hard), grad, row_loss,
        row_status)


#: Every kernel of this module with its signature template (``{F}``: the float
#: type), for ahead-of-time compile checks (``tests/test_cuda_simulator.py``).
KERNELS = [(_kd_rows_kernel, _SIGNATURE), (_divergence_rows_kernel, _DIV_SIGNATURE),
           (_sparse_kd_rows_kernel, _SPARSE_SIGNATURE)]


def kd_rows(s, t, labels_index, labels_dense, labels_kind, inv_t,
            w_soft, w_hard, c_soft, c_hard, grad, row_loss):
    """Fused KD loss and gradient on the GPU, one thread block per row.

    The parameters are those of ``kdnumba.kernels.cpu.softmax_kl.kd_rows``, as
    C-contiguous device arrays (``numba.cuda`` device arrays): ``s``, ``t``,
    ``labels_dense``, ``grad`` of the student dtype ``F`` (float32/float64),
    ``labels_index`` int64, ``row_loss`` float64; ``inv_t`` is converted to
    ``F``. Unused label arrays may be any array of the right dtype and rank.
    Launches asynchronously on the default stream.
    """
    n_rows, n_cols = s.shape
    dtype = np.dtype(s.dtype)
    kernel = compile_kernel(_kd_rows_kernel, _SIGNATURE, dtype)
    threads = block_size(n_cols)
    shared_bytes = _N_PARTIALS * threads * 8
    kernel[grid_size(n_rows), threads, 0, shared_bytes](
        s, t, labels_index, labels_dense, int(labels_kind), dtype.type(inv_t),
        float(w_soft), float(w_hard), float(c_soft), float(c_hard), grad, row_loss)
