"""Contrastive losses (NT-Xent, InfoNCE, supervised, batch-hard triplet) without
the ``B x B`` similarity matrix.

Cosine similarity uses SPEC's clamped normalisation
``x_hat = x / max(||x||, EPS)``. The softmax losses are all of one shape: an
*anchor* matrix ``A`` (``B x D``, normalised rows scaled by ``1/tau``), a
*candidate* matrix ``C`` (``N x D``, normalised rows; the batch plus any queued
negatives) and per-anchor log-sum-exps of the logits ``Z = A C^T``. We stream
over tiles of ``R`` anchor rows (memory ``O((B + N) D + R N)``)::

    Z_tile = A_tile C^T                       BLAS GEMM, R x N
    E_tile = exp(Z_tile - shift)              in place (Numba, vectorised exp)
    S      = E_tile 1                         row sums in the same pass (SIMD lanes)
    lse_i  = shift_i + log S_i
    student-anchored: G_tile = E_tile C        BLAS GEMM, R x D, one owner per row
    teacher-anchored: H += E_tile[:, :B]^T (A_tile / S)   (candidate side, fixed tile order)

then one O(B D) pass turns ``G``/``H`` into the gradient with respect to the
normalised rows and applies the chain rule through the clamped normalisation
(float64, per row)::

    d x_hat / d x = (I - x_hat x_hat^T) / ||x||     if ||x|| > EPS
                  = I / EPS                           otherwise (clamped branch)

Shift. All candidate rows have norm <= 1, so every logit of anchor ``i`` lies in
``[-b_i, b_i]`` with ``b_i = ||a_i||`` (``<= 1/tau``). When ``2/tau`` is at most
``EXP_RANGE`` (60 in float32, 600 in float64: ``tau >= 0.034`` / ``0.0034``)
the shift is ``b_i``: every exponent lies in ``[-2/tau, 0]``, nothing
underflows, and no row-maximum pass is needed. Otherwise the shift is the
row maximum (``reductions.lane_max``); exponents below ``-EXP_RANGE`` are
flushed to 0 (their share of the row sum is below ``B e^-60``, far under
float32 rounding), which also keeps denormals out of the second GEMM.

Threads. The two GEMMs (~75 % of the time) run in NumPy's BLAS with its
threads; the exp pass and the O(B D) passes are serial Numba loops. Running
them with ``prange`` instead was measured 3-5x *slower* in total on a
2-core machine: the Numba (OpenMP) and OpenBLAS thread pools both spin-wait
between calls and fight for the same cores. Every row is owned by one
serial loop and the candidate-side accumulation runs in tile order, so the
result is bit-identical for any Numba thread count.

The drivers (``student_anchored``, ``teacher_anchored``, ``triplet``) are plain
Python around the kernels: they only allocate buffers and call ``np.matmul``.
Inputs are validated, C-contiguous arrays of one float dtype.
"""

from __future__ import annotations

import math

import numpy as np

from kdnumba._constants import NORM_EPS as EPS  # cos(a, b) = a.b / (max(||a||, EPS) ...)
from kdnumba._policy import callee, jit
from kdnumba.kernels.contrastive_lists import diagonal
from kdnumba.kernels.cpu.dtypes import MAX_FLOAT64, cast_like
from kdnumba.kernels.cpu.fastexp import exp_nonpos
from kdnumba.kernels.cpu.reductions import lane_dot, lane_max, lane_sum


#: Fewest anchor rows per tile that :func:`default_tile_rows` picks (unless B is smaller).
TILE_ROWS = 256

#: Bytes of the ``R x N`` similarity tile that :func:`default_tile_rows` aims at.
TILE_BYTES = 16 << 20

#: Exponent range kept by the exp pass: ``exp(x)`` with ``x < -EXP_RANGE`` is 0.
EXP_RANGE_F32 = 60.0
EXP_RANGE_F64 = 600.0


def exp_range(dtype) -> float:
    """``EXP_RANGE`` of a dtype (see the module docstring)."""
    return EXP_RANGE_F32 if np.dtype(dtype) == np.float32 else EXP_RANGE_F64


def default_tile_rows(n_anchors: int, n_candidates: int, itemsize: int) -> int:
    """Anchor rows per tile: about ``TILE_BYTES`` of similarities, 256..1024 rows.

    The second GEMM contracts over all ``N`` candidates; with fewer than ~256
    rows OpenBLAS's threaded GEMM spends its time synchronising its threads
    once per K-panel (measured: 0.5 vs 19 GFLOP/s for 128 vs 256 rows at
    N = 32768 on a busy 2-core machine). The tile is ``R x N``: 16 MiB at
    B = 4096 (1024 rows), 32 MiB at B = 32768 and 64 MiB at B = 65536 (256 rows).
    """
    rows = TILE_BYTES // max(1, n_candidates * itemsize)
    return int(max(1, min(n_anchors, max(TILE_ROWS, min(1024, rows)))))


# --- row norms and normalisation ------------------------------------------------

@jit
def row_norms(x, out):
    """``out_i = ||x_i||`` in float64; overflow-safe (rescales a row whose
    sum of squares overflows); NaN/inf rows give a non-finite norm."""
    n, dim = x.shape
    for i in range(n):
        acc = lane_dot(x[i], x[i])
        # ``not (acc <= max)`` catches inf and NaN. (``math.isfinite`` here was
        # measured to be folded away while the policy still granted ``reassoc``.)
        if not (acc <= MAX_FLOAT64):
            # Either a NaN/inf entry (stays non-finite) or float64 overflow of
            # huge finite entries: rescale by the largest magnitude.
            big = 0.0
            for k in range(dim):
                big = max(big, abs(np.float64(x[i, k])))
            if big <= MAX_FLOAT64 and big > 0.0:
                acc = 0.0
                for k in range(dim):
                    v = np.float64(x[i, k]) / big
                    acc += v * v
                out[i] = big * math.sqrt(acc)
                continue
        out[i] = math.sqrt(acc)


@jit
def normalize_rows(x, norms, scale, out):
    """``out_i = x_i * scale / max(norms_i, EPS)`` in ``out``'s dtype."""
    n, dim = x.shape
    for i in range(n):
        f = cast_like(scale / max(norms[i], EPS), out)
        for k in range(dim):
            out[i, k] = x[i, k] * f


@jit
def _class_sums(t, t_norms, labels, sums, counts):
    n, dim = t.shape
    for i in range(n):
        c = labels[i]
        inv = 1.0 / max(t_norms[i], EPS)
        counts[c] += 1
        for k in range(dim):
            sums[c, k] += np.float64(t[i, k]) * inv


def class_means(t, t_norms, members, starts, out):
    """``out_c = mean_{i in class c} t_hat_i`` (summed in float64 in row order),
    stored in ``out``'s dtype. ``members``: row indices grouped by class (row
    order inside a class), ``starts``: CSR offsets (``(n_classes + 1,)``)."""
    n_classes = out.shape[0]
    labels = np.empty(t.shape[0], dtype=np.int64)
    labels[members] = np.repeat(np.arange(n_classes, dtype=np.int64), np.diff(starts))
    sums = np.zeros((n_classes, t.shape[1]), dtype=np.float64)
    counts = np.zeros(n_classes, dtype=np.int64)
    _class_sums(t, t_norms, labels, sums, counts)
    out[...] = sums / counts[:, None]


# --- the exp pass over one tile ------------------------------------------------------

@callee
def _exp_in_place(row, shift, lo):
    """``row_j <- exp(min(row_j - shift, 0))``, 0 below ``lo``: element-wise, no
    reduction, so the loop vectorises fully."""
    zero = shift - shift
    for j in range(row.shape[0]):
        x = min(row[j] - shift, zero)
        e = exp_nonpos(x)
        row[j] = e if x >= lo else zero


@jit
def softmax_rows(block, bounds, use_bound, neg_range, row0, pos_class, members, starts,
                 saved, inv_sum, row_loss):
    """Exp pass over a tile of logits, in place, and each row's loss.

    For every row ``r`` of ``block`` (anchor ``i = row0 + r``): the shift is the
    anchor's bound ``bounds[i]`` (``use_bound``) or the row maximum;
    ``block[r, j] <- exp(block[r, j] - shift)`` (0 below ``neg_range``); then
    ``S = sum_j block[r, j]`` while the row is still in cache, and ``inv_sum[i] = 1/S``.

    The loss of anchor ``i`` is ``mean_{j in P(i)} (lse_i - z_ij)`` over its
    positive columns ``P(i) = members[starts[c] : starts[c + 1]]``,
    ``c = pos_class[i]``, taken from the *same rounded logits* as the
    log-sum-exp, so that it is never negative and accurate relative to its
    own size (a confident positive's loss is tiny):

    * bound shift: ``log(S / e_ij) = log1p((S - e_ij) / e_ij)`` with ``e_ij =
      block[r, j]`` the rounded exponential that ``S`` contains (``S >= e_ij
      > 0``: nothing is flushed on this path, every exponent is ``>= -2/tau``);
    * row-maximum shift ``m``: ``(m - z_ij) + log1p(S - 1)``, both terms
      ``>= 0`` (``S >= 1``: the maximum contributes ``exp(0) = 1`` exactly).

    ``S`` is the positives' exponentials (float64) plus ``reductions.lane_sum``
    of the other columns (explicit SIMD lanes in a fixed order, float64 block
    totals) -- summed apart, so that the small terms of a confident row are not
    lost next to its positive's. ``saved`` holds the positives meanwhile (at
    least the largest class's size). Rows are independent and each sum's
    order is fixed, so the result does not depend on any thread count
    (neither Numba's nor BLAS's).
    """
    lo = cast_like(neg_range, block)
    zero = cast_like(0.0, block)
    for r in range(block.shape[0]):
        i = row0 + r
        row = block[r]
        c = pos_class[i]
        first = starts[c]
        last = starts[c + 1]
        z_pos = 0.0
        if not use_bound:  # the raw logits, before the exp pass overwrites them
            for q in range(first, last):
                z_pos += np.float64(row[members[q]])
            z_pos /= last - first
        # The shift in the block's dtype: exactly the value subtracted below.
        shift = cast_like(bounds[i], block) if use_bound else lane_max(row)
        _exp_in_place(row, shift, lo)
        pos_total = 0.0
        for q in range(first, last):
            j = members[q]
            saved[q - first] = row[j]
            pos_total += np.float64(row[j])
            row[j] = zero
        rest = lane_sum(row)
        for q in range(first, last):
            row[members[q]] = saved[q - first]
        inv_sum[i] = 1.0 / (rest + pos_total)
        if use_bound:  # log(S / e_j) as log1p((S - e_j) / e_j), S - e_j >= 0
            acc = 0.0
            for q in range(first, last):
                e = np.float64(saved[q - first])
                acc += math.log1p(((pos_total - e) + rest) / e)
            row_loss[i] = acc / (last - first)
        else:  # log S as log1p(S - 1): exact when the positive is the maximum
            row_loss[i] = (np.float64(shift) - z_pos) + math.log1p((pos_total - 1.0) + rest)


# --- gradient finishing passes ---------------------------------------------------------

@callee
def _chain_normalisation(x_row, norm, g, out_row, scale):
    """``out_row = scale * d(loss)/d x`` from ``g = d(loss)/d x_hat`` (float64).

    ``x_hat = x / max(||x||, EPS)``: Jacobian ``(I - x_hat x_hat^T)/||x||`` when
    ``||x|| > EPS``, else the clamped branch ``I / EPS``.
    """
    dim = x_row.shape[0]
    if norm > EPS:
        inv = 1.0 / norm
        proj = lane_dot(x_row, g) * inv
        if not (abs(proj) <= MAX_FLOAT64):  # x_row . g overflowed (rows near 1e308)
            proj = 0.0
            for k in range(dim):
                proj += np.float64(x_row[k]) * inv * g[k]
        for k in range(dim):
            out_row[k] = (g[k] - np.float64(x_row[k]) * inv * proj) * inv * scale
    else:
        for k in range(dim):
            out_row[k] = g[k] * (scale / EPS)


@jit
def finish_student_anchored(s, s_norms, g_raw, inv_sum, pos, pos_class, inv_tau, g, grad):
    """Student anchors: the gradient, in place over ``g_raw``.

    ``g_raw_i = sum_j exp(z_ij - shift_i) c_j`` (the second GEMM);
    ``pos[pos_class[i]]`` is the positive target of anchor ``i`` (its teacher
    row, or its class mean of teacher rows). With ``p_ij`` the softmax::

        d loss_i / d s_hat_i = (sum_j p_ij c_j - pos_i) / tau

    and ``grad_i = chain(d/ds_hat) / B``. ``grad`` may alias ``g_raw``; ``g``:
    ``(D,)`` float64 scratch (allocated by the caller: an ``np.empty`` here
    costs its own compile).
    """
    n, dim = s.shape
    inv_b = 1.0 / n
    for i in range(n):
        norm = s_norms[i]
        p = pos[pos_class[i]]
        w = inv_sum[i]
        for k in range(dim):
            g[k] = (np.float64(g_raw[i, k]) * w - np.float64(p[k])) * inv_tau
        _chain_normalisation(s[i], norm, g, grad[i], inv_b)


@jit
def accumulate(acc, part):
    """``acc += part`` (float64 accumulator, rows in order)."""
    n, dim = acc.shape
    for i in range(n):
        for k in range(dim):
            acc[i, k] += part[i, k]


@jit
def scale_rows(a, inv_sum, row0, out):
    """``out_r = a_r * inv_sum[row0 + r]`` (the softmax-normalised anchors)."""
    n, dim = out.shape
    for r in range(n):
        w = cast_like(inv_sum[row0 + r], out)
        for k in range(dim):
            out[r, k] = a[r, k] * w


@jit
def finish_teacher_anchored(s, s_norms, anchors, acc, g, grad):
    """Teacher anchors ``a_i = t_hat_i / tau``, student candidates: the gradient.

    ``acc_j = sum_i p_ij a_i`` (accumulated over tiles)::

        d loss / d s_hat_j = (acc_j - a_j) / B

    and the chain rule through ``s_j``'s normalisation; ``g``: ``(D,)`` float64 scratch.
    """
    n, dim = s.shape
    inv_b = 1.0 / n
    for i in range(n):
        for k in range(dim):
            g[k] = acc[i, k] - np.float64(anchors[i, k])
        _chain_normalisation(s[i], s_norms[i], g, grad[i], inv_b)


# --- batch-hard triplet --------------------------------------------------------------

@callee
def _masked_extrema(keys, labels, yi):
    """``(max of keys with labels == yi, min of keys with labels != yi)``.

    Eight independent lanes each (a loop-carried ``max`` does not vectorise
    without ``nnan``); masked entries become -inf / +inf by a select.
    """
    n = keys.shape[0]
    lo = cast_like(-np.inf, keys)
    hi = cast_like(np.inf, keys)
    p0 = p1 = p2 = p3 = p4 = p5 = p6 = p7 = lo
    q0 = q1 = q2 = q3 = q4 = q5 = q6 = q7 = hi
    j = 0
    while j + 8 <= n:
        k0 = keys[j]
        k1 = keys[j + 1]
        k2 = keys[j + 2]
        k3 = keys[j + 3]
        k4 = keys[j + 4]
        k5 = keys[j + 5]
        k6 = keys[j + 6]
        k7 = keys[j + 7]
        s0 = labels[j] == yi
        s1 = labels[j + 1] == yi
        s2 = labels[j + 2] == yi
        s3 = labels[j + 3] == yi
        s4 = labels[j + 4] == yi
        s5 = labels[j + 5] == yi
        s6 = labels[j + 6] == yi
        s7 = labels[j + 7] == yi
        p0 = max(p0, k0 if s0 else lo)
        p1 = max(p1, k1 if s1 else lo)
        p2 = max(p2, k2 if s2 else lo)
        p3 = max(p3, k3 if s3 else lo)
        p4 = max(p4, k4 if s4 else lo)
        p5 = max(p5, k5 if s5 else lo)
        p6 = max(p6, k6 if s6 else lo)
        p7 = max(p7, k7 if s7 else lo)
        q0 = min(q0, hi if s0 else k0)
        q1 = min(q1, hi if s1 else k1)
        q2 = min(q2, hi if s2 else k2)
        q3 = min(q3, hi if s3 else k3)
        q4 = min(q4, hi if s4 else k4)
        q5 = min(q5, hi if s5 else k5)
        q6 = min(q6, hi if s6 else k6)
        q7 = min(q7, hi if s7 else k7)
        j += 8
    while j < n:
        if labels[j] == yi:
            p0 = max(p0, keys[j])
        else:
            q0 = min(q0, keys[j])
        j += 1
    best_p = max(max(max(p0, p1), max(p2, p3)), max(max(p4, p5), max(p6, p7)))
    best_n = min(min(min(q0, q1), min(q2, q3)), min(min(q4, q5), min(q6, q7)))
    return best_p, best_n


@jit
def triplet_select(block, sq_norms, labels, qualifies, row0, pos_idx, neg_idx):
    """Hardest positive / negative of anchors ``row0 ..`` from a Gram tile.

    ``block[r, j] = x_i . x_j`` is overwritten with the ranking key
    ``||x_j||^2 - 2 x_i . x_j`` (the squared distance minus a per-anchor
    constant; the anchor's own entry is set to -inf so it is never its own
    positive). Positive: the anchor's label, largest key; negative: another
    label, smallest key; ties go to the smallest ``j``. Two passes per row:
    vectorised masked extrema, then the first index that attains them.
    """
    n_rows, n_cols = block.shape
    two = cast_like(2.0, block)
    for r in range(n_rows):
        i = row0 + r
        pos_idx[i] = -1
        neg_idx[i] = -1
        if not qualifies[i]:
            continue
        yi = labels[i]
        row = block[r]
        for j in range(n_cols):
            row[j] = sq_norms[j] - two * row[j]
        row[i] = -np.inf
        best_p, best_n = _masked_extrema(row, labels, yi)
        for j in range(n_cols):
            if labels[j] == yi and row[j] == best_p:
                pos_idx[i] = j
                break
        for j in range(n_cols):
            if labels[j] != yi and row[j] == best_n:
                neg_idx[i] = j
                break


@callee
def _distance_and_unit(x, i, j, unit):
    """``||x_i - x_j||`` in float64 and ``unit = (x_i - x_j)/d`` (0 if d == 0)."""
    dim = x.shape[1]
    acc = 0.0
    for k in range(dim):
        diff = np.float64(x[i, k]) - np.float64(x[j, k])
        unit[k] = diff
        acc += diff * diff
    d = math.sqrt(max(acc, 0.0))
    inv = 1.0 / d if d > 0.0 else 0.0
    for k in range(dim):
        unit[k] *= inv
    return d


@jit
def triplet_finish(x, scale, pos_idx, neg_idx, margin, n_qualifying, row_loss, grad64):
    """Loss rows and the gradient of the batch-hard triplet loss.

    ``x`` = embeddings / ``scale`` (a power of two); true distances are
    ``scale * ||x_i - x_j||``. For anchor ``i`` with ``h_i = d_ip - d_in + margin > 0``::

        d h_i / d s_i = u_ip - u_in,  d h_i / d s_p = -u_ip,  d h_i / d s_n = u_in

    with ``u_ij = (s_i - s_j)/d_ij`` (0 when ``d_ij = 0``); everything divided
    by the number of qualifying anchors. Scattered serially in anchor order.
    """
    n, dim = x.shape
    u_p = np.empty(dim, dtype=np.float64)
    u_n = np.empty(dim, dtype=np.float64)
    w = 1.0 / n_qualifying
    for i in range(n):
        row_loss[i] = 0.0
        jp = pos_idx[i]
        jn = neg_idx[i]
        if jp < 0:
            continue
        d_p = scale * _distance_and_unit(x, i, jp, u_p)
        d_n = scale * _distance_and_unit(x, i, jn, u_n)
        h = d_p - d_n + margin
        if h > 0.0:
            row_loss[i] = h * w
            for k in range(dim):
                grad64[i, k] += (u_p[k] - u_n[k]) * w
                grad64[jp, k] -= u_p[k] * w
                grad64[jn, k] += u_n[k] * w


# --- launch functions (plain Python: buffers + BLAS) ----------------------------------
#
# The same names, arguments and output conventions as ``kernels.cuda.contrastive``:
# the caller allocates the outputs (float64 per-row partials ``row_loss``, the
# gradient ``grad`` of the student's shape and dtype) and reduces the partials.


def _tiles(anchors: np.ndarray, candidates: np.ndarray, tile_rows):
    """Yield ``(r0, r1, block)`` with ``block = anchors[r0:r1] @ candidates.T``
    (BLAS), tile by tile in order, in one reused ``R x N`` buffer (freed when
    the iteration ends). ``tile_rows``: ``None`` for :func:`default_tile_rows`."""
    n = anchors.shape[0]
    n_cand = candidates.shape[0]
    rows = tile_rows or default_tile_rows(n, n_cand, anchors.dtype.itemsize)
    block_buf = np.empty((min(rows, n), n_cand), dtype=anchors.dtype)
    cand_t = candidates.T
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        block = block_buf[: r1 - r0]
        np.matmul(anchors[r0:r1], cand_t, out=block)
        yield r0, r1, block


def _shift_mode(temperature, dtype):
    """Whether to shift the logits by the anchors' bounds ``||a_i||``
    (:func:`_logit_bounds`), and the exp pass's flush threshold (none on the
    bound path: no exponent is below ``-2/tau >= -EXP_RANGE`` there, and the
    row losses read every positive's exponential)."""
    limit = exp_range(dtype)
    use_bound = 2.0 / temperature <= limit
    return use_bound, (-math.inf if use_bound else -limit)


def _rows_per_tile(n, n_cand, tile_rows, itemsize):
    """Anchor rows per tile: ``tile_rows``, or :func:`default_tile_rows` (which
    never gives fewer than ``min(n, TILE_ROWS)``, hence the shortcut)."""
    if tile_rows is None and n <= TILE_ROWS:
        return n
    return tile_rows or default_tile_rows(n, n_cand, itemsize)


def _normalize_candidates(first, first_norms, extra, extra_norms, cand):
    """``cand`` = the normalised rows of ``first``, then of ``extra`` (or ``None``;
    no slice of ``cand`` then: a view costs a small call 0.2 us)."""
    if extra is None:
        normalize_rows(first, first_norms, 1.0, cand)
    else:
        n = first.shape[0]
        normalize_rows(first, first_norms, 1.0, cand[:n])
        normalize_rows(extra, extra_norms, 1.0, cand[n:])


# No fast-math: exactly the IEEE float64 operations of
# ``np.minimum(norms, EPS) / EPS / temperature`` (``arcp`` would turn the
# divisions into multiplications by reciprocals). A kernel rather than those
# three NumPy operations: 2.5 us less per call (issue #16).
@jit(fastmath=False)
def _logit_bounds(norms, temperature, out):
    """``out_i = min(norms_i, EPS) / EPS / temperature`` (``||a_i||`` of the
    anchors ``x_hat_i / tau``; ``norms`` finite)."""
    for i in range(norms.shape[0]):
        x = norms[i]
        unit = (x if x < EPS else EPS) / EPS  # ||x_hat||: 1, or < 1 when clamped
        out[i] = unit / temperature


def student_anchored(s, s_norms, t, t_norms, neg, neg_norms, pos, pos_class, members, starts,
                     temperature, tile_rows, row_loss, grad):
    """Student anchors against normalised teacher rows and queued negatives
    (NT-Xent, supervised contrastive).

    Args:
        s: ``(B, D)`` student embeddings (F = float32/float64).
        s_norms: their float64 norms.
        t, t_norms: ``(B, D)`` F teacher rows and their norms.
        neg, neg_norms: ``(K, D)`` F queued negatives and their norms, or ``None``.
        pos: ``None`` (the positive target of anchor ``i`` is normalised
            teacher row ``i``) or ``(P, D)`` F targets (class means).
        pos_class: ``(B,)`` int64: anchor ``i``'s positive is ``pos[pos_class[i]]``,
            its positive columns ``members[starts[c] : starts[c + 1]]``,
            ``c = pos_class[i]`` (indices of teacher rows).
        temperature: ``tau > 0``.
        tile_rows: anchor rows per tile (``None``: :func:`default_tile_rows`).
        row_loss: ``(B,)`` float64 output, anchor ``i``'s loss (the loss is their mean).
        grad: ``(B, D)`` F output, the gradient of the mean.
    """
    # Every buffer first, then the kernels and products back to back: Python
    # work between two kernels costs a small call more than its own time (it
    # evicts the embeddings from cache, issue #16).
    n, dim = s.shape
    dtype = s.dtype
    n_cand = n if neg is None else n + neg.shape[0]
    inv_tau = 1.0 / temperature
    # The anchors live in ``grad``: tile ``[r0, r1)`` reads its anchor rows
    # before its gradient rows overwrite them, and later tiles read later
    # rows. One ``B x D`` buffer less per call: freeing it let glibc return
    # the heap's top to the system, and every call page-faulted it back
    # (measured: 32x1000 float64 spent 390 us of a 560 us call so).
    anchors = grad
    cand = np.empty((n_cand, dim), dtype=dtype)
    bounds = np.empty(n, dtype=np.float64)
    inv_sum = np.empty(n, dtype=np.float64)
    # softmax_rows' room for the largest class's positives: n (at least its
    # size) rather than computing the size, which costs a call ~2 us in
    # NumPy or a kernel's compile.
    saved = np.empty(n, dtype=dtype)
    g = np.empty(dim)  # scratch of finish_student_anchored
    use_bound, lo = _shift_mode(temperature, dtype)
    rows = _rows_per_tile(n, n_cand, tile_rows, dtype.itemsize)
    # One tile (every small call) runs without ``_tiles``: a generator costs a
    # small call ~1 us.
    one_tile = rows >= n
    block = np.empty((n, n_cand), dtype=dtype) if one_tile else None
    if pos is None:
        pos = cand

    normalize_rows(s, s_norms, inv_tau, anchors)
    _normalize_candidates(t, t_norms, neg, neg_norms, cand)
    _logit_bounds(s_norms, temperature, bounds)
    if one_tile:
        np.matmul(anchors, cand.T, out=block)
        softmax_rows(block, bounds, use_bound, lo, 0, pos_class, members, starts, saved,
                     inv_sum, row_loss)
        np.matmul(block, cand, out=grad)
    else:
        for r0, r1, block in _tiles(anchors, cand, rows):
            softmax_rows(block, bounds, use_bound, lo, r0, pos_class, members, starts, saved,
                         inv_sum, row_loss)
            np.matmul(block, cand, out=grad[r0:r1])
    finish_student_anchored(s, s_norms, grad, inv_sum, pos, pos_class, inv_tau, g, grad)


def teacher_anchored(s, s_norms, t, t_norms, neg, neg_norms, temperature, tile_rows, row_loss,
                     grad):
    """Teacher anchors, student (+ optional constant extra) candidates: InfoNCE.

    ``neg``: ``(K, D)`` extra candidate rows (constants) or ``None``. The
    candidate side of the gradient ``sum_i p_ij a_i`` is accumulated in
    float64 tile by tile, in tile order. Outputs as :func:`student_anchored`.
    """
    # Buffers first, then the kernels and products back to back (see
    # :func:`student_anchored`).
    n, dim = s.shape
    dtype = s.dtype
    n_cand = n if neg is None else n + neg.shape[0]
    inv_tau = 1.0 / temperature
    anchors = np.empty_like(t)
    cand = np.empty((n_cand, dim), dtype=dtype)
    bounds = np.empty(n, dtype=np.float64)
    use_bound, lo = _shift_mode(temperature, dtype)
    pos_class, members, starts = diagonal(n)
    saved = np.empty(1, dtype=dtype)
    rows = _rows_per_tile(n, n_cand, tile_rows, dtype.itemsize)
    one_tile = rows >= n  # every small call
    # Fewer ``B x D`` buffers per call (see student_anchored): the products'
    # ``part`` lives in ``grad`` (written only by the last pass), and with one
    # tile the scaled anchors in ``cand`` (not read after the first product).
    weighted = cand[:n] if one_tile else np.empty((rows, dim), dtype=dtype)
    part = grad
    acc = np.zeros((n, dim), dtype=np.float64)
    inv_sum = np.empty(n, dtype=np.float64)
    g = np.empty(dim)  # scratch of finish_teacher_anchored

    normalize_rows(t, t_norms, inv_tau, anchors)
    _normalize_candidates(s, s_norms, neg, neg_norms, cand)
    _logit_bounds(t_norms, temperature, bounds)
    if one_tile:  # no generator, no slices
        block = np.empty((n, n_cand), dtype=dtype)
        np.matmul(anchors, cand.T, out=block)
        softmax_rows(block, bounds, use_bound, lo, 0, pos_class, members, starts, saved,
                     inv_sum, row_loss)
        scale_rows(anchors, inv_sum, 0, weighted)
        np.matmul((block if neg is None else block[:, :n]).T, weighted, out=part)
        accumulate(acc, part)
    else:
        for r0, r1, block in _tiles(anchors, cand, rows):
            softmax_rows(block, bounds, use_bound, lo, r0, pos_class, members, starts, saved,
                         inv_sum, row_loss)
            w = weighted[: r1 - r0]
            scale_rows(anchors[r0:r1], inv_sum, r0, w)
            np.matmul(block[:, :n].T, w, out=part)
            accumulate(acc, part)
    del weighted, part, cand, block  # (``block`` is a view of the tile buffer)
    finish_teacher_anchored(s, s_norms, anchors, acc, g, grad)


def triplet(s, s_norms, labels, qualifies, n_qualifying, margin, tile_rows, row_loss, grad):
    """Batch-hard triplet loss on ``s`` (Euclidean), tiled Gram for the selection.

    ``s_norms``: the float64 row norms of ``s`` (:func:`row_norms`);
    ``labels``: int64 ``(B,)`` dense class ids and ``qualifies``: bool ``(B,)``
    (anchor has a positive ``j != i`` and a negative), NumPy arrays (class
    bookkeeping is host work on any device); ``n_qualifying``: how many do.
    Writes ``row_loss`` (anchor ``i``'s hinge over ``n_qualifying``: the loss
    is their sum) and ``grad``; with no qualifying anchor both are 0.
    """
    if n_qualifying == 0:
        row_loss[:] = 0.0
        grad[...] = 0
        return
    n, dim = s.shape
    dtype = s.dtype
    max_norm = float(np.max(s_norms))
    # A power of two, so scaling is exact: selection and distances run on
    # rows of norm <= 1 (no overflow of squared distances in the Gram form).
    # (at most 2**1023: rows of norm <= 2 then, distances may overflow: caught by
    # the caller's check of the total)
    exponent = min(math.frexp(max_norm)[1], 1023) if max_norm > 0.0 else 0
    scale = math.ldexp(1.0, exponent)
    x = np.ldexp(s, -exponent).astype(dtype, copy=False)
    sq = np.einsum("ij,ij->i", x, x).astype(dtype)
    pos_idx = np.empty(n, dtype=np.int64)
    neg_idx = np.empty(n, dtype=np.int64)
    for r0, _, block in _tiles(x, x, tile_rows):
        triplet_select(block, sq, labels, qualifies, r0, pos_idx, neg_idx)
    grad64 = np.zeros((n, dim), dtype=np.float64)
    triplet_finish(x, scale, pos_idx, neg_idx, float(margin), n_qualifying, row_loss, grad64)
    grad[...] = grad64
