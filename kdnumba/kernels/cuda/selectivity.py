"""Per-neuron selectivity statistics and their gradient on the GPU.

The CUDA twin of ``kernels.cpu.selectivity``: the same launch functions
(:func:`column_stats`, and :func:`loss_and_gradient`, which runs the loss's
three steps :func:`column_stats`, :func:`coefficients` and
:func:`gradient_rows`) with the same arguments and outputs, the same codes
(imported from there), the same statistics, tie rule and ``sign(0) = 0``. On ``(B, N)`` activations:

1. :func:`column_stats`, first launch per matrix -- column-blocked partial
   statistics. A block is a tile of ``TILE`` consecutive columns
   (``threadIdx.x``, coalesced loads) by ``LANES`` row lanes
   (``threadIdx.y``) over one chunk of rows (``blockIdx.y``); lane ``l``
   takes rows ``r0 + l, r0 + l + LANES, ...``. Per column and thread, in
   float64::

       S1 = sum d, S2 = sum d**2 (d = x - x[0, j])        variance
       H = #{|x| < threshold}                              hard sparsity
       R = sum sigmoid(z)                                  relaxed sparsity
       A = sum |x|                                         sparsity, peak
       M = max x with its first row                        peak

   The lanes are combined by a shared-memory tree (fixed order; the maximum
   keeps the smaller row on ties, so the *first* maximal row wins, as on the
   CPU), and one partial per (chunk, column) is written.
2. :func:`column_stats`, second launch per matrix -- one thread per column
   adds the chunks in chunk order into ``stats[m, ST_*, j]``:
   ``mean = x0 + S1/B``, ``var = max(S2/B - (S1/B)**2, 0)``, ``hard = H/B``,
   ``soft = R/B``, ``mean_abs = A/B``, ``peak``, ``argmax``,
   ``ratio = peak / (mean_abs + eps)``.
3. :func:`coefficients` -- one thread per column: the loss term
   ``(sel_s - sel_t)**2`` (NaN when a mean magnitude is not finite, which
   reveals inf/NaN input that ``sigmoid`` or ``max`` hide) and the gradient
   coefficients of the metric.
4. :func:`gradient_rows` -- elementwise gradient (``grad_ij`` depends on
   ``x_ij`` and column ``j``'s coefficients only); any non-finite element
   sets ``flag[0] = 1`` (a plain store: all writers store the same value).

The chunk plan is a function of the shape only, so results are
deterministic. ``z = sharpness - k |x|`` with ``k = sharpness / threshold``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, types

from kdnumba.kernels.cpu.selectivity import (  # noqa: F401  (the shared interface)
    CF_A,
    CF_B,
    CF_BOUND,
    CF_C,
    N_COEFS,
    N_STATS,
    PEAK_TO_AVERAGE,
    SPARSITY,
    ST_HARD,
    ST_MEAN,
    ST_MEAN_ABS,
    ST_PEAK,
    ST_RATIO,
    ST_SOFT,
    ST_VAR,
    VARIANCE,
    WANT_HARD,
    WANT_PEAK,
    WANT_SPARSITY,
    WANT_VARIANCE,
)
from kdnumba.kernels.cuda import compile_kernel, grid_size, is_simulator, reduce

#: Columns per block (one warp: a row segment is one coalesced load; fewer
#: under the simulator, where every thread is a Python thread).
TILE = 8 if is_simulator() else 32
#: Row lanes per block on a GPU (256-thread blocks) and under the simulator.
LANES = 8
SIMULATOR_LANES = 2
#: Aim for this many blocks in the partials launch (a few per SM).
TARGET_BLOCKS = 512
#: Rows per chunk are at least this many (amortise a block's fixed costs).
MIN_ROWS_PER_CHUNK = 64
#: Largest grid height of the gradient launch (threads then loop over rows).
MAX_GRID_ROWS = 1024

_N_SLOTS = 7  # S1 S2 H R A M argmax, float64 in shared memory


def _lanes() -> int:
    return SIMULATOR_LANES if is_simulator() else LANES


def plan(n_rows: int, n_cols: int) -> int:
    """Rows per chunk of :func:`column_partials` (a function of the shape only)."""
    tiles = -(-n_cols // TILE)
    want_chunks = max(1, -(-TARGET_BLOCKS // tiles))
    rows = max(MIN_ROWS_PER_CHUNK, -(-n_rows // want_chunks))
    return min(rows, n_rows)


def n_chunks(n_rows: int, rows_per_chunk: int) -> int:
    """Number of row chunks."""
    return -(-n_rows // rows_per_chunk)


@cuda.jit(device=True)
def _sigmoid(z):
    """``1/(1+exp(-z))`` without overflow (``e = exp(-|z|) <= 1``)."""
    e = math.exp(-abs(z))
    r = 1.0 / (1.0 + e)
    return r if z >= 0 else e * r


_PARTIALS_SIG = ("void({F}[:, ::1], int64, float64, {F}, {F}, int64, float64[:, ::1], "
                 "float64[:, ::1], float64[:, ::1], float64[:, ::1], float64[:, ::1], "
                 "float64[:, ::1], int64[:, ::1])")


def _partials_kernel(x, flags, threshold, sharpness, k, rows_per_chunk,
                     p_s1, p_s2, p_hard, p_soft, p_abs, p_max, p_arg):
    sh = cuda.shared.array(0, dtype=types.float64)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    width = cuda.blockDim.x
    lanes = cuda.blockDim.y
    n_rows, n_cols = x.shape
    j = cuda.blockIdx.x * width + tx
    ch = cuda.blockIdx.y
    r0 = ch * rows_per_chunk
    r1 = r0 + rows_per_chunk
    if r1 > n_rows:  # (no ``min``: see kernels/cuda/contrastive.py)
        r1 = n_rows
    want_var = (flags & WANT_VARIANCE) != 0
    want_sparsity = (flags & WANT_SPARSITY) != 0
    want_peak = (flags & WANT_PEAK) != 0
    want_hard = (flags & WANT_HARD) != 0
    want_abs = want_sparsity or want_peak

    s1 = 0.0
    s2 = 0.0
    hard = 0.0
    soft = 0.0
    asum = 0.0
    pmax = -math.inf
    parg = -1.0  # no row seen (argmax travels as float64: exact below 2**53)
    if j < n_cols:
        shift = np.float64(x[0, j])
        first = r0 + ty
        if want_peak and first < r1:
            pmax = np.float64(x[first, j])
            parg = np.float64(first)
        for i in range(first, r1, lanes):
            v = x[i, j]
            if want_var:
                d = np.float64(v) - shift
                s1 += d
                s2 += d * d
            if want_hard:
                # float64 ``threshold``, compared exactly (as on the CPU).
                if abs(np.float64(v)) < threshold:
                    hard += 1.0
            if want_sparsity:
                soft += _sigmoid(sharpness - k * abs(v))
            if want_abs:
                asum += abs(np.float64(v))
            if want_peak:
                # Strict ``>`` in row order keeps this lane's first maximal row.
                if v > pmax:
                    pmax = np.float64(v)
                    parg = np.float64(i)

    per = width * lanes
    me = ty * width + tx
    sh[me] = s1
    sh[per + me] = s2
    sh[2 * per + me] = hard
    sh[3 * per + me] = soft
    sh[4 * per + me] = asum
    sh[5 * per + me] = pmax
    sh[6 * per + me] = parg
    cuda.syncthreads()
    stride = lanes // 2
    while stride > 0:
        if ty < stride:
            other = me + stride * width
            for q in range(5):
                sh[q * per + me] += sh[q * per + other]
            a_arg = sh[6 * per + me]
            b_arg = sh[6 * per + other]
            if b_arg >= 0.0:
                a_max = sh[5 * per + me]
                b_max = sh[5 * per + other]
                if (a_arg < 0.0 or b_max > a_max
                        or (b_max == a_max and b_arg < a_arg)):
                    sh[5 * per + me] = b_max
                    sh[6 * per + me] = b_arg
        cuda.syncthreads()
        stride //= 2

    if ty == 0 and j < n_cols:
        if want_var:
            p_s1[ch, j] = sh[tx]
            p_s2[ch, j] = sh[per + tx]
        if want_hard:
            p_hard[ch, j] = sh[2 * per + tx]
        if want_sparsity:
            p_soft[ch, j] = sh[3 * per + tx]
        if want_abs:
            p_abs[ch, j] = sh[4 * per + tx]
        if want_peak:
            p_max[ch, j] = sh[5 * per + tx]
            p_arg[ch, j] = np.int64(sh[6 * per + tx])


@cuda.jit(device=True)
def _chunk_sum(partials, j, n_ch):
    """``sum_ch partials[ch, j]`` in chunk order."""
    total = 0.0
    for ch in range(n_ch):
        total += partials[ch, j]
    return total


_COMBINE_SIG = ("void({F}[:, ::1], int64, int64, float64, int64, float64[:, ::1], "
                "float64[:, ::1], float64[:, ::1], float64[:, ::1], float64[:, ::1], "
                "float64[:, ::1], int64[:, ::1], float64[:, :, ::1], int64[:, ::1])")


def _combine_kernel(x, m, flags, eps, n_ch, p_s1, p_s2, p_hard, p_soft, p_abs, p_max, p_arg,
                    stats, argmax):
    j = cuda.grid(1)
    n_rows, n_cols = x.shape
    if j >= n_cols:
        return
    inv_b = 1.0 / n_rows
    if (flags & WANT_VARIANCE) != 0:
        mu = _chunk_sum(p_s1, j, n_ch) * inv_b
        v = _chunk_sum(p_s2, j, n_ch) * inv_b - mu * mu
        if v < 0.0:  # a rounding residue; NaN fails the test and is kept
            v = 0.0
        stats[m, ST_MEAN, j] = np.float64(x[0, j]) + mu
        stats[m, ST_VAR, j] = v
    if (flags & WANT_HARD) != 0:
        stats[m, ST_HARD, j] = _chunk_sum(p_hard, j, n_ch) * inv_b
    if (flags & WANT_SPARSITY) != 0:
        stats[m, ST_SOFT, j] = _chunk_sum(p_soft, j, n_ch) * inv_b
    if (flags & (WANT_SPARSITY | WANT_PEAK)) != 0:
        stats[m, ST_MEAN_ABS, j] = _chunk_sum(p_abs, j, n_ch) * inv_b
    if (flags & WANT_PEAK) != 0:
        top = p_max[0, j]
        arg = p_arg[0, j]
        for ch in range(1, n_ch):
            if p_max[ch, j] > top:
                top = p_max[ch, j]
                arg = p_arg[ch, j]
        stats[m, ST_PEAK, j] = top
        argmax[m, j] = arg
        stats[m, ST_RATIO, j] = top / (stats[m, ST_MEAN_ABS, j] + eps)


_COEF_SIG = ("void(int64, float64[:, :, ::1], float64, float64, float64, int64, "
             "float64[::1], float64[:, ::1])")


def _coefficients_kernel(metric, stats, weight, eps, k, n_rows, sq, coef):
    j = cuda.grid(1)
    n_cols = sq.shape[0]
    if j >= n_cols:
        return
    row = ST_VAR if metric == VARIANCE else (ST_SOFT if metric == SPARSITY else ST_RATIO)
    diff = stats[1, row, j] - stats[0, row, j]
    term = diff * diff
    if metric != VARIANCE and not (math.isfinite(stats[0, ST_MEAN_ABS, j])
                                   and math.isfinite(stats[1, ST_MEAN_ABS, j])):
        term = math.nan
    sq[j] = term
    c = 2.0 * weight / n_cols * diff
    a = 0.0
    cc = 0.0
    if metric == VARIANCE:
        a = stats[1, ST_MEAN, j]
        b = c * (2.0 / n_rows)
        bound = abs(b) * math.sqrt(n_rows * stats[1, ST_VAR, j])
    elif metric == SPARSITY:
        b = c * (-k / n_rows)
        bound = 0.25 * abs(b)
    else:
        d = stats[1, ST_MEAN_ABS, j] + eps
        b = -c * stats[1, ST_PEAK, j] / (n_rows * d * d)
        cc = c / d
        bound = abs(b)
    coef[CF_A, j] = a
    coef[CF_B, j] = b
    coef[CF_C, j] = cc
    coef[CF_BOUND, j] = bound


_GRAD_SIG = ("void({F}[:, ::1], int64, {F}, {F}, float64[:, ::1], int64[::1], {F}[:, ::1], "
             "int32[::1])")


def _gradient_kernel(x, metric, sharpness, k, coef, argmax, grad, flag):
    n_rows, n_cols = x.shape
    j = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if j >= n_cols:
        return
    a = coef[CF_A, j]
    b = coef[CF_B, j]
    for i in range(cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y, n_rows,
                   cuda.gridDim.y * cuda.blockDim.y):
        v = x[i, j]
        sgn = 1.0 if v > 0 else (-1.0 if v < 0 else 0.0)
        if metric == VARIANCE:
            g = (np.float64(v) - a) * b
        elif metric == SPARSITY:
            # sigmoid'(z) = e / (1 + e)**2 with e = exp(-|z|): no overflow.
            e = math.exp(-abs(np.float64(sharpness - k * abs(v))))
            r = 1.0 / (1.0 + e)
            g = b * (e * r * r) * sgn
        else:
            g = b * sgn
            if i == argmax[j]:
                g += coef[CF_C, j]
        gf = grad.dtype.type(g)
        grad[i, j] = gf
        if not math.isfinite(gf):
            flag[0] = 1


KERNELS = [(_partials_kernel, _PARTIALS_SIG), (_combine_kernel, _COMBINE_SIG),
           (_coefficients_kernel, _COEF_SIG), (_gradient_kernel, _GRAD_SIG)]


def _empty2(shape, dtype, wanted):
    return cuda.device_array(shape if wanted else (1, 1), dtype=dtype)


def column_stats(a, b, n_mats, flags, threshold, sharpness, k, eps, stats, argmax):
    """Per-column statistics of ``a`` (and of ``b`` when ``n_mats == 2``) into
    ``stats`` and ``argmax`` (device arrays): the interface and outputs of
    ``kernels.cpu.selectivity.column_stats``.

    ``a``, ``b``: ``(B, N)`` C-contiguous device arrays of one float dtype
    ``F``; ``threshold``, ``eps``: float64; ``sharpness``, ``k``: F scalars;
    ``stats``: ``(n_mats, N_STATS, N)`` float64; ``argmax``: ``(n_mats, N)``
    int64. Rows not asked for by ``flags`` are left unwritten.
    """
    n_rows, n_cols = a.shape
    dtype = np.dtype(a.dtype)
    rows = plan(n_rows, n_cols)
    n_ch = n_chunks(n_rows, rows)
    want_var = bool(flags & WANT_VARIANCE)
    want_sp = bool(flags & WANT_SPARSITY)
    want_pk = bool(flags & WANT_PEAK)
    shape = (n_ch, n_cols)
    # Scratch, reused by both matrices (launches run in order on one stream).
    p_s1 = _empty2(shape, np.float64, want_var)
    p_s2 = _empty2(shape, np.float64, want_var)
    p_hard = _empty2(shape, np.float64, bool(flags & WANT_HARD))
    p_soft = _empty2(shape, np.float64, want_sp)
    p_abs = _empty2(shape, np.float64, want_sp or want_pk)
    p_max = _empty2(shape, np.float64, want_pk)
    p_arg = _empty2(shape, np.int64, want_pk)
    lanes = _lanes()
    threads = TILE * lanes
    partials = compile_kernel(_partials_kernel, _PARTIALS_SIG, dtype)
    combine = compile_kernel(_combine_kernel, _COMBINE_SIG, dtype)
    for m in range(n_mats):
        x = a if m == 0 else b
        partials[(-(-n_cols // TILE), n_ch), (TILE, lanes), 0, _N_SLOTS * TILE * lanes * 8](
            x, int(flags), float(threshold), dtype.type(sharpness), dtype.type(k), rows,
            p_s1, p_s2, p_hard, p_soft, p_abs, p_max, p_arg)
        combine[-(-n_cols // threads), threads](
            x, m, int(flags), float(eps), n_ch, p_s1, p_s2, p_hard, p_soft, p_abs, p_max,
            p_arg, stats, argmax)


def coefficients(metric, stats, weight, eps, k, n_rows, sq, coef):
    """Per-column loss terms ``sq`` and gradient coefficients ``coef`` (device
    arrays), the same values as the CPU module's ``_coef_*`` functions
    (formulas in ``kernels/cpu/selectivity.py``, "loss terms and gradient
    coefficients"); a step of :func:`loss_and_gradient`."""
    n_cols = sq.shape[0]
    threads = TILE * _lanes()
    compile_kernel(_coefficients_kernel, _COEF_SIG)[-(-n_cols // threads), threads](
        int(metric), stats, float(weight), float(eps), float(k), int(n_rows), sq, coef)


def loss_and_gradient(t, s, metric, flags, threshold, sharpness, k, eps, weight, grad):
    """:func:`column_stats` of the teacher and the student, :func:`coefficients`,
    the sum of the loss terms and :func:`gradient_rows`, in order on one
    stream: the interface and results of
    ``kernels.cpu.selectivity.loss_and_gradient`` (``(total, fits)``, host
    values; ``t``, ``s``, ``grad`` device arrays)."""
    n_rows, n_cols = s.shape
    stats = cuda.device_array((2, N_STATS, n_cols), dtype=np.float64)
    argmax = cuda.device_array((2, n_cols), dtype=np.int64)
    sq = cuda.device_array(n_cols, dtype=np.float64)
    coef = cuda.device_array((N_COEFS, n_cols), dtype=np.float64)
    flag = cuda.to_device(np.zeros(1, dtype=np.int32))
    column_stats(t, s, 2, flags, threshold, sharpness, k, eps, stats, argmax)
    coefficients(metric, stats, weight, eps, k, n_rows, sq, coef)
    total = reduce.total(sq)
    gradient_rows(s, metric, sharpness, k, coef, argmax[1], grad, flag)
    return total, not flag.copy_to_host()[0]


def gradient_rows(x, metric, sharpness, k, coef, argmax, grad, flag):
    """Write ``grad = d loss / d x``; ``flag[0] = 1`` when some element is not
    finite (``flag``: a zeroed ``(1,)`` int32 device array; the CPU decides
    the same from per-column bounds): a step of :func:`loss_and_gradient`."""
    n_rows, n_cols = x.shape
    dtype = np.dtype(x.dtype)
    lanes = _lanes()
    grid = (-(-n_cols // TILE), grid_size(min(MAX_GRID_ROWS, -(-n_rows // lanes))))
    compile_kernel(_gradient_kernel, _GRAD_SIG, dtype)[grid, (TILE, lanes)](
        x, int(metric), dtype.type(sharpness), dtype.type(k), coef, argmax, grad, flag)
