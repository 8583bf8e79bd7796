"""Neuron selectivity: per-column statistics of a ``(B, N)`` activation matrix
over its rows (the batch), and the row-major gradient pass.

Memory layout drives the design. Activations are row-major, a neuron is a
*column*, and its statistics are sums over rows. Walking one column at a time
would touch one float per cache line; instead every parallel task owns a
rectangle ``rows [r0, r1) x columns [c0, c1)`` and walks its rows in order,
adding each row segment into per-column accumulators (``float64``, a few KiB,
in L1). The inner loop runs along a contiguous row segment, so it vectorises
across columns: each SIMD lane is one neuron, and every neuron's partial is
summed in row order.

Tasks are ``(row chunk, column block)`` pairs (of the student and the
teacher, in one launch) whose sizes depend only on the shape (see
:func:`plan`), never on the thread count. Each task writes its partials to its
own slot of a ``(n_chunks, N)`` buffer; :func:`column_stats` then adds the
chunks of every column serially, in chunk order. So every statistic has the
same bits for any number of threads, with no cross-thread reduction.

Accumulators per metric (``d = x - x[0, j]``; the shift by the first row makes
the one-pass variance formula accurate: ``(x[0,j] - mean_j)**2 <= B var_j``,
so the cancellation in ``S2/B - (S1/B)**2`` loses at most ``log10(B)`` digits
of float64, far below float32/float64 output precision):

=================  =====================================================
statistic          per-column partials
=================  =====================================================
variance           ``S1 = sum d``, ``S2 = sum d**2``
relaxed sparsity   ``R = sum sigmoid(z)``, ``A = sum |x|`` (``A`` detects
                   NaN/inf, which ``R`` hides)
hard sparsity      ``H = #{|x| < threshold}`` (statistics only)
peak_to_average    ``M = max x`` with its first row, ``A = sum |x|``
=================  =====================================================

with ``z = sharpness * (1 - |x| / threshold) = sharpness - k |x|``,
``k = sharpness / threshold``. Rows are consumed four at a time (the four
values are combined, then added once to the float64 accumulator), which
halves the load/store traffic on the accumulators; the grouping is fixed by
the row index, so it is deterministic too. The sigmoid terms are summed in
the input's dtype over 32 rows before they join their float64 partial, so
the exp runs at the full float32 vector width.

The gradient of every metric is, per element, a per-column coefficient times
a function of the element itself (``d stat_j / d x_ij`` depends on column
``j``'s statistics only), so one row-major pass writes it; the
peak-to-average metric then adds one extra term per column at the row of the
column maximum.

Compilation is per metric: each of the loss's three metrics has its own
statistics kernel, coefficient function and gradient kernel, so a call
compiles only its metric's code (``selectivity_statistics`` runs the three
and a hard-count kernel); :func:`column_stats_grid` and
:func:`loss_and_gradient` are Python launchers choosing among them.

The launch functions -- :func:`column_stats` (the statistics alone) and
:func:`loss_and_gradient` (statistics, loss terms and gradient in one call)
-- are the interface shared with ``kernels.cuda.selectivity`` (same names,
arguments and output conventions: every array result goes into an output the
caller allocated; scratch is the launcher's own business). The codes and row
indices below are the home of both modules'.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import prange

from kdnumba._policy import callee, jit, kernel_launch, parallel_jit
from kdnumba.kernels.cpu.dtypes import LARGEST_FINITE, cast_like
from kdnumba.kernels.cpu.fastexp import exp_nonpos
from kdnumba.kernels.cpu.reductions import ordered_sum

#: ``metric`` codes of :func:`loss_and_gradient`.
VARIANCE = 0
SPARSITY = 1
PEAK_TO_AVERAGE = 2

#: ``flags`` bits of :func:`column_stats`
#: (``WANT_SPARSITY``: the relaxed fraction; ``WANT_HARD``: the hard one).
WANT_VARIANCE = 1
WANT_SPARSITY = 2
WANT_PEAK = 4
WANT_HARD = 8

#: Widest column block. A 4 KiB row segment (float32) spans a whole page, which
#: keeps the hardware prefetchers streaming although consecutive segments of a
#: task are a row stride apart (measured: 1024 columns read at np.sum speed,
#: 256 columns 35% slower).
COL_BLOCK = 1024
#: Rows per task are at least this many, so a task's fixed costs are amortised.
MIN_ROWS_PER_CHUNK = 64
#: Aim for this many tasks, enough to balance 16-64 threads.
TARGET_TASKS = 64
#: Relaxed-sparsity terms are summed in the input's dtype over this many rows
#: (a multiple of 4), then added to the float64 partial: float32 SIMD width
#: for the exp, float32 rounding of at most 32 terms in [0, 1].
SOFT_FLUSH_ROWS = 32
#: Rows per task of the gradient pass.
GRAD_ROWS_PER_CHUNK = 32


def plan(n_rows: int, n_cols: int) -> tuple[int, int]:
    """``(col_block, rows_per_chunk)`` for a ``(n_rows, n_cols)`` input.

    A function of the shape only: results never depend on the thread count.
    """
    col_block = min(n_cols, COL_BLOCK)
    n_col_blocks = -(-n_cols // col_block)
    want_chunks = max(1, -(-TARGET_TASKS // n_col_blocks))
    rows = max(MIN_ROWS_PER_CHUNK, -(-n_rows // want_chunks))
    return col_block, min(rows, n_rows)


def n_chunks(n_rows: int, rows_per_chunk: int) -> int:
    """Number of row chunks of :func:`column_stats`."""
    return -(-n_rows // rows_per_chunk)


# --- one task's partials -----------------------------------------------------------
# Each ``*_task`` (inlined into its caller's Numba IR: a task compiled as a
# library of its own is optimised by LLVM twice, alone and again inlined into
# the parallel kernel) walks rows ``[r0, r1)`` x columns ``[c0, c1)`` of ``x`` and
# writes one statistic's partials into the row segments it is given (views of
# columns ``[c0, c1)`` of this chunk's slot; C-contiguous). Rows are taken four
# at a time, then one at a time for the rest of the chunk. The inner loops run
# over ``range(len)`` of contiguous row views, so LLVM sees contiguous,
# non-negative indices and vectorises across columns. Buffers are filled by
# loops, never by array-to-array slice assignment (whose shape check costs
# seconds of compilation).

#: Rows of the ``part`` buffer of :func:`column_stats_grid` (per matrix).
P_S1, P_S2, P_HARD, P_SOFT, P_ABS = 0, 1, 2, 3, 4
N_PARTIALS = 5
#: Rows of the ``stats`` output of :func:`column_stats` (per matrix).
ST_MEAN, ST_VAR, ST_HARD, ST_SOFT, ST_MEAN_ABS, ST_PEAK, ST_RATIO = 0, 1, 2, 3, 4, 5, 6
N_STATS = 7


# Inlined into the Numba IR of each task (``inline="always"``): four copies of
# seven integer operations type faster than a function compiled on its own.
@jit(inline="always")
def _box(task, n_rows, n_cols, col_block, rows_per_chunk):
    """``(matrix, chunk, r0, r1, c0, c1)`` of task number ``task`` (tasks are
    numbered matrix-major, then by row chunk, then by column block)."""
    n_col_blocks = (n_cols + col_block - 1) // col_block
    per_mat = ((n_rows + rows_per_chunk - 1) // rows_per_chunk) * n_col_blocks
    m = task // per_mat
    rest = task % per_mat
    ch = rest // n_col_blocks
    c0 = (rest % n_col_blocks) * col_block
    r0 = ch * rows_per_chunk
    return m, ch, r0, min(n_rows, r0 + rows_per_chunk), c0, min(n_cols, c0 + col_block)


@jit(inline="always")
def _var_task(task, a, b, col_block, rows_per_chunk, shift, part):
    """``S1 = sum d``, ``S2 = sum d**2`` with ``d = x - shift``."""
    m, ch, r0, r1, c0, c1 = _box(task, a.shape[0], a.shape[1], col_block, rows_per_chunk)
    x = a if m == 0 else b
    sh = shift[m, c0:c1]
    s1 = part[m, ch, P_S1, c0:c1]
    s2 = part[m, ch, P_S2, c0:c1]
    n = sh.shape[0]
    for j in range(n):
        s1[j] = 0.0
        s2[j] = 0.0
    i = r0
    while i + 4 <= r1:
        a0 = x[i, c0:c1]
        a1 = x[i + 1, c0:c1]
        a2 = x[i + 2, c0:c1]
        a3 = x[i + 3, c0:c1]
        for j in range(n):
            c = sh[j]
            d0 = a0[j] - c
            d1 = a1[j] - c
            d2 = a2[j] - c
            d3 = a3[j] - c
            s1[j] += (d0 + d1) + (d2 + d3)
            s2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        i += 4
    for i in range(i, r1):
        a0 = x[i, c0:c1]
        for j in range(n):
            d0 = a0[j] - sh[j]
            s1[j] += d0
            s2[j] += d0 * d0


@callee
def _sigmoid_parts(z):
    """``(e, r)`` with ``e = exp(-|z|) <= 1`` and ``r = 1 / (1 + e)``, in the
    dtype of ``z``: what the sigmoid and its derivative are made of, without
    overflow. The only ``exp`` of the module's sigmoids, so it is compiled
    once (an ``exp_nonpos`` in a ``prange`` body would be compiled again for
    the parallel kernel's flags, issue 16)."""
    e = exp_nonpos(-abs(z))
    return e, cast_like(1.0, z) / (cast_like(1.0, z) + e)


@callee
def sigmoid(z):
    """``1 / (1 + exp(-z))`` without overflow, in the dtype of ``z``.

    ``1/(1+e)`` for ``z >= 0`` and ``e/(1+e)`` for ``z < 0``, with
    ``e = exp(-|z|) <= 1`` (branch-free selects; vectorises).
    """
    e, r = _sigmoid_parts(z)
    return r if z >= cast_like(0.0, z) else e * r


@callee
def _abs_rows4(r0, r1, r2, r3, asum):
    """``asum += |r0| + |r1| + |r2| + |r3|`` (float64 before adding: a sum of
    float32 values can overflow float32)."""
    for j in range(r0.shape[0]):
        asum[j] += ((abs(np.float64(r0[j])) + abs(np.float64(r1[j])))
                    + (abs(np.float64(r2[j])) + abs(np.float64(r3[j]))))


@jit(inline="always")
def _soft_task(task, a, b, col_block, rows_per_chunk, sharp, k, part, acc_all):
    """``R = sum sigmoid(sharp - k |x|)`` and ``A = sum |x|``.

    The sigmoid terms are summed in ``x``'s dtype over ``SOFT_FLUSH_ROWS``
    rows, then added to the float64 ``soft``: with a float64 accumulator LLVM
    would run the whole loop, exp included, at the float64 vector width
    (measured 2x slower in float32). ``A`` goes through float64 per element
    (a sum of float32 values can overflow float32). ``acc_all``: ``(tasks,
    col_block)`` scratch in ``x``'s dtype, one row per task.
    """
    m, ch, r0, r1, c0, c1 = _box(task, a.shape[0], a.shape[1], col_block, rows_per_chunk)
    x = a if m == 0 else b
    soft = part[m, ch, P_SOFT, c0:c1]
    asum = part[m, ch, P_ABS, c0:c1]
    n = c1 - c0
    acc = acc_all[task, :n]
    for j in range(n):
        soft[j] = 0.0
        asum[j] = 0.0
        acc[j] = 0.0
    i = r0
    while i + 4 <= r1:
        a0 = x[i, c0:c1]
        a1 = x[i + 1, c0:c1]
        a2 = x[i + 2, c0:c1]
        a3 = x[i + 3, c0:c1]
        # Two loops: a float64 operation in the first would set its vector width.
        for j in range(n):
            acc[j] += ((sigmoid(sharp - k * abs(a0[j])) + sigmoid(sharp - k * abs(a1[j])))
                       + (sigmoid(sharp - k * abs(a2[j])) + sigmoid(sharp - k * abs(a3[j]))))
        _abs_rows4(a0, a1, a2, a3, asum)
        i += 4
        if (i - r0) % SOFT_FLUSH_ROWS == 0:
            for j in range(n):
                soft[j] += acc[j]
                acc[j] = 0.0
    for i in range(i, r1):
        a0 = x[i, c0:c1]
        for j in range(n):
            acc[j] += sigmoid(sharp - k * abs(a0[j]))
        for j in range(n):
            asum[j] += abs(np.float64(a0[j]))
    for j in range(n):
        soft[j] += acc[j]


@jit(inline="always")
def _hard_task(task, a, b, col_block, rows_per_chunk, thr, part):
    """``H = #{|x| < thr}`` (``thr`` float64 and the comparison exact: a float32
    threshold would be rounded (float32(0.01) < 0.01) and misclassify values
    between the two)."""
    m, ch, r0, r1, c0, c1 = _box(task, a.shape[0], a.shape[1], col_block, rows_per_chunk)
    x = a if m == 0 else b
    hard = part[m, ch, P_HARD, c0:c1]
    n = c1 - c0
    for j in range(n):
        hard[j] = 0.0
    for i in range(r0, r1):
        a0 = x[i, c0:c1]
        for j in range(n):
            hard[j] += np.float64(abs(np.float64(a0[j])) < thr)


@jit(inline="always")
def _peak_task(task, a, b, col_block, rows_per_chunk, part, p_max, p_arg):
    """``M = max x`` with its first row (an int32 offset within the chunk), and
    ``A = sum |x|``.

    Strict ``>`` in row order keeps the first maximal row (the tie rule); the
    selects are branch-free, and int32 offsets keep the vector width of the
    float32 loop (int64 lanes would halve it).
    """
    m, ch, r0, r1, c0, c1 = _box(task, a.shape[0], a.shape[1], col_block, rows_per_chunk)
    x = a if m == 0 else b
    pmax = p_max[m, ch, c0:c1]
    parg = p_arg[m, ch, c0:c1]
    asum = part[m, ch, P_ABS, c0:c1]
    n = c1 - c0
    first = x[r0, c0:c1]
    for j in range(n):
        pmax[j] = first[j]
        parg[j] = 0
    for j in range(n):
        asum[j] = 0.0
    i = r0
    while i + 4 <= r1:
        a0 = x[i, c0:c1]
        a1 = x[i + 1, c0:c1]
        a2 = x[i + 2, c0:c1]
        a3 = x[i + 3, c0:c1]
        off = np.int32(i - r0)
        for j in range(n):
            m = pmax[j]
            a = parg[j]
            v = a0[j]
            t = v > m
            m = v if t else m
            a = off if t else a
            v = a1[j]
            t = v > m
            m = v if t else m
            a = off + np.int32(1) if t else a
            v = a2[j]
            t = v > m
            m = v if t else m
            a = off + np.int32(2) if t else a
            v = a3[j]
            t = v > m
            m = v if t else m
            a = off + np.int32(3) if t else a
            pmax[j] = m
            parg[j] = a
        _abs_rows4(a0, a1, a2, a3, asum)
        i += 4
    for i in range(i, r1):
        a0 = x[i, c0:c1]
        off = np.int32(i - r0)
        for j in range(n):
            v = a0[j]
            t = v > pmax[j]
            pmax[j] = v if t else pmax[j]
            parg[j] = off if t else parg[j]
        for j in range(n):
            asum[j] += abs(np.float64(a0[j]))


# --- combining the chunks (serial, in chunk order) -----------------------------------
# No fast-math: ``arcp`` would turn ``count / B`` into ``count * (1/B)``, one
# ulp off the exactly rounded fraction. (Fast-math flags live on each LLVM
# instruction, so they stay off when this is inlined into a parallel kernel.)
# The loops are O(chunks * N) and run once per call; speed does not matter.

@callee(fastmath=False)
def _combine_var(shift, n_rows, part, stats):
    """``stats[ST_MEAN]``, ``stats[ST_VAR]`` of one matrix."""
    b = np.float64(n_rows)
    for j in range(part.shape[2]):
        s1 = 0.0
        s2 = 0.0
        for ch in range(part.shape[0]):
            s1 += part[ch, P_S1, j]
            s2 += part[ch, P_S2, j]
        m = s1 / b
        v = s2 / b - m * m
        if v < 0.0:  # a rounding residue; NaN stays NaN
            v = 0.0
        stats[ST_MEAN, j] = shift[j] + m
        stats[ST_VAR, j] = v


@callee(fastmath=False)
def _combine_mean(n_rows, part, out):
    """``out = sum_ch part[ch] / B`` in chunk order (``part``: ``(C, N)``, one
    partial's row of every chunk; not a literal row number, which Numba would
    compile a function for each of)."""
    b = np.float64(n_rows)
    for j in range(part.shape[1]):
        total = 0.0
        for ch in range(part.shape[0]):
            total += part[ch, j]
        out[j] = total / b


@callee(fastmath=False)
def _combine_peak(rows_per_chunk, eps, p_max, p_arg, stats, argmax):
    """``stats[ST_PEAK]``, ``argmax`` and ``stats[ST_RATIO]`` (after
    ``stats[ST_MEAN_ABS]``)."""
    for j in range(p_max.shape[1]):
        m = p_max[0, j]
        arg = np.int64(p_arg[0, j])
        for ch in range(1, p_max.shape[0]):
            if p_max[ch, j] > m:  # strict: the earliest chunk wins ties
                m = p_max[ch, j]
                arg = ch * rows_per_chunk + np.int64(p_arg[ch, j])
        stats[ST_PEAK, j] = m
        argmax[j] = arg
        stats[ST_RATIO, j] = m / (stats[ST_MEAN_ABS, j] + eps)


# --- the task grid ---------------------------------------------------------------------

def _soft_scratch(n_tasks, col_block, dtype):
    """Each task's row of relaxed-sparsity terms in ``dtype``
    (:func:`_soft_task`)."""
    return np.empty((n_tasks, col_block), dtype)


def _n_tasks(n_mats, n_rows, n_cols, col_block, rows_per_chunk):
    return (n_mats * -(-n_rows // rows_per_chunk) * -(-n_cols // col_block))


# One kernel per statistic the loss matches, so that a call compiles only the
# code of its own metric, and one for the hard count (``selectivity_statistics``
# runs all four). Each has one parallel loop over the tasks; the chunks are
# then combined serially.

@parallel_jit
def _variance_grid(a, b, n_mats, n_tasks, col_block, rows_per_chunk, shift, part, stats):
    # ``shift`` (float64 scratch, ``(n_mats, N)``) is filled here, not by the
    # launcher: two NumPy row copies cost a small call about 2 us (issue #16).
    for m in range(n_mats):
        x = a if m == 0 else b
        for j in range(a.shape[1]):
            shift[m, j] = np.float64(x[0, j])  # the first row, exactly
    for task in prange(n_tasks):
        _var_task(np.int64(task), a, b, col_block, rows_per_chunk, shift, part)
    for m in range(n_mats):
        _combine_var(shift[m], a.shape[0], part[m], stats[m])


@parallel_jit
def _sparsity_grid(a, b, n_mats, n_tasks, sharpness, k, col_block, rows_per_chunk, part, acc,
                   stats):
    for task in prange(n_tasks):
        _soft_task(np.int64(task), a, b, col_block, rows_per_chunk, sharpness, k, part,
                   acc)
    for m in range(n_mats):
        _combine_mean(a.shape[0], part[m, :, P_SOFT], stats[m, ST_SOFT])
        _combine_mean(a.shape[0], part[m, :, P_ABS], stats[m, ST_MEAN_ABS])


@parallel_jit
def _peak_grid(a, b, n_mats, n_tasks, eps, col_block, rows_per_chunk, part, p_max, p_arg,
               stats, argmax):
    for task in prange(n_tasks):
        _peak_task(np.int64(task), a, b, col_block, rows_per_chunk, part, p_max, p_arg)
    for m in range(n_mats):
        _combine_mean(a.shape[0], part[m, :, P_ABS], stats[m, ST_MEAN_ABS])
        _combine_peak(rows_per_chunk, eps, p_max[m], p_arg[m], stats[m], argmax[m])


@parallel_jit
def _hard_grid(a, b, n_mats, n_tasks, threshold, col_block, rows_per_chunk, part, stats):
    for task in prange(n_tasks):
        _hard_task(np.int64(task), a, b, col_block, rows_per_chunk, threshold, part)
    for m in range(n_mats):
        _combine_mean(a.shape[0], part[m, :, P_HARD], stats[m, ST_HARD])


def column_stats(a, b, n_mats, flags, threshold, sharpness, k, eps, stats, argmax):
    """Per-column statistics of ``a`` (and of ``b`` when ``n_mats == 2``) into
    ``stats`` and ``argmax`` (see :func:`column_stats_grid` for the formulas).

    Parameters (``F`` is the dtype of ``a``; the same on both devices):
        a, b: ``(B, N)`` F, C-contiguous (``b`` is ignored when ``n_mats == 1``).
        n_mats: 1 or 2.
        flags: bit set of ``WANT_VARIANCE | WANT_SPARSITY | WANT_PEAK | WANT_HARD``.
        threshold: float64, bound of the hard count (compared exactly).
        sharpness, k: F scalars of the relaxation (``k = sharpness / threshold``).
        eps: float64, denominator epsilon of ``ST_RATIO``.
        stats: ``(n_mats, N_STATS, N)`` float64 output (rows ``ST_*``; the rows
            ``flags`` asks for are written, possibly more).
        argmax: ``(n_mats, N)`` int64 output (written with ``WANT_PEAK``).

    The task grid is :func:`plan`'s and the scratch is allocated here.
    """
    n_rows, n_cols = a.shape
    col_block, rows, n_ch, _ = _grid(n_mats, n_rows, n_cols)
    # Scratch of statistics not requested is never written, so np.empty costs
    # no memory traffic (its pages are never touched). The peak's scratch only
    # when the peak is asked for.
    part = np.empty((n_mats, n_ch, N_PARTIALS, n_cols), np.float64)
    peak_cols = n_cols if flags & WANT_PEAK else 0
    p_max = np.empty((n_mats, n_ch, peak_cols), a.dtype)
    p_arg = np.empty((n_mats, n_ch, peak_cols), np.int32)  # offsets within a chunk
    column_stats_grid(a, b, n_mats, flags, threshold, sharpness, k, eps,
                      col_block, rows, part, p_max, p_arg, stats, argmax)


@functools.lru_cache(maxsize=256)
def _grid(n_mats: int, n_rows: int, n_cols: int) -> tuple[int, int, int, int]:
    """``(col_block, rows_per_chunk, n_chunks, n_tasks)`` of :func:`plan` (cached:
    the plan costs a small call 1.5 us of Python arithmetic)."""
    col_block, rows = plan(n_rows, n_cols)
    return (col_block, rows, n_chunks(n_rows, rows),
            _n_tasks(n_mats, n_rows, n_cols, col_block, rows))


def column_stats_grid(a, b, n_mats, flags, threshold, sharpness, k, eps, col_block,
                      rows_per_chunk, part, p_max, p_arg, stats, argmax):
    """Per-column statistics of ``a`` (and of ``b`` when ``n_mats == 2``) on an
    explicit task grid (:func:`column_stats` chooses it with :func:`plan`).

    One parallel loop over the tasks ``(matrix, row chunk, column block)``
    writes partials; then, serially, the chunks of every column are combined
    in chunk order into::

        stats[m, ST_MEAN]     = mean_i x_ij = x_0j + S1_j / B
        stats[m, ST_VAR]      = max(S2_j / B - (S1_j / B)**2, 0)     (ddof = 0)
        stats[m, ST_HARD]     = H_j / B        stats[m, ST_SOFT] = R_j / B
        stats[m, ST_MEAN_ABS] = A_j / B
        stats[m, ST_PEAK]     = max_i x_ij     argmax[m, j] = first such i
        stats[m, ST_RATIO]    = peak_j / (mean_abs_j + eps)

    The rows ``flags`` asks for are written (possibly more): one statistic
    alone (``WANT_VARIANCE``, ``WANT_SPARSITY`` or ``WANT_PEAK``, the loss's
    three metrics) runs a kernel of its own, any other set all of them and
    the hard count's.

    Parameters (``F`` is the dtype of ``a``):
        a, b: ``(B, N)`` F, C-contiguous (``b`` is ignored when ``n_mats == 1``).
        flags: bit set of ``WANT_VARIANCE | WANT_SPARSITY | WANT_PEAK | WANT_HARD``.
        threshold: float64, bound of the hard count (compared exactly).
        sharpness, k: F scalars of the relaxation (``k = sharpness / threshold``).
        eps: float64.
        col_block, rows_per_chunk: the task grid (:func:`plan`).
        part: ``(n_mats, C, N_PARTIALS, N)`` float64 scratch;
            p_max ``(n_mats, C, N)`` F, p_arg ``(n_mats, C, N)`` int32 scratch
            (row offsets within the chunk, so ``rows_per_chunk < 2**31``),
            with ``C = n_chunks(B, rows_per_chunk)``. Allocate them with
            ``np.empty``: only the parts ``flags`` needs are touched.
        stats: ``(n_mats, N_STATS, N)`` float64 output; argmax ``(n_mats, N)`` int64.
    """
    n_rows, n_cols = a.shape
    n_tasks = _n_tasks(n_mats, n_rows, n_cols, col_block, rows_per_chunk)
    if flags & WANT_VARIANCE:
        # Shift of the variance sums (the kernel copies the first rows into it).
        shift = np.empty((n_mats, n_cols), np.float64)
    if flags == WANT_VARIANCE:
        _variance_grid(a, b, n_mats, n_tasks, col_block, rows_per_chunk, shift, part, stats)
    elif flags == WANT_SPARSITY:
        _sparsity_grid(a, b, n_mats, n_tasks, sharpness, k, col_block, rows_per_chunk,
                       part, _soft_scratch(n_tasks, col_block, a.dtype), stats)
    elif flags == WANT_PEAK:
        _peak_grid(a, b, n_mats, n_tasks, float(eps), col_block, rows_per_chunk, part,
                   p_max, p_arg, stats, argmax)
    else:
        # Every statistic (selectivity_statistics): the three loss kernels and
        # the hard count's, one pass each. The same run time as one kernel
        # computing them all (the sigmoid dominates), and a process that also
        # calls the loss compiles one kernel more instead of a fifth large one.
        # ``ST_MEAN_ABS`` is written twice with the same bits (same order).
        _variance_grid(a, b, n_mats, n_tasks, col_block, rows_per_chunk, shift, part, stats)
        _sparsity_grid(a, b, n_mats, n_tasks, sharpness, k, col_block, rows_per_chunk,
                       part, _soft_scratch(n_tasks, col_block, a.dtype), stats)
        _peak_grid(a, b, n_mats, n_tasks, float(eps), col_block, rows_per_chunk, part,
                   p_max, p_arg, stats, argmax)
        _hard_grid(a, b, n_mats, n_tasks, float(threshold), col_block, rows_per_chunk, part,
                   stats)


# --- loss terms and gradient coefficients ----------------------------------------

#: Rows of the gradient coefficients (``coef``, see the loss terms' section below).
CF_A, CF_B, CF_C, CF_BOUND = 0, 1, 2, 3
N_COEFS = 4

# Per-column loss terms and gradient coefficients, from ``stats`` (``(2,
# N_STATS, N)`` float64: teacher ``stats[0]``, student ``stats[1]``):
#
# * ``sq_j = (sel_s - sel_t)_j**2``, NaN where a mean magnitude is not finite
#   and the metric is not the variance (inf/NaN input that the sigmoid or the
#   maximum hide); the loss is ``weight * sum_j sq_j / N``;
# * ``coef`` (``(N_COEFS, N)``): with ``c = 2 weight / N (sel_s - sel_t)``,
#   variance ``A = mean_s, B = 2c/B``; sparsity ``B = -k c / B``; peak
#   ``B = -c M / (B D**2), C = c / D`` (``D = mean_abs_s + eps``, ``M`` the
#   peak); ``BOUND`` bounds ``|grad_ij|`` over the column (off the peak's row:
#   ``|s_ij - mean_j| <= sqrt(B var_j)``, ``sigmoid' <= 1/4``, ``|sign| <= 1``).
#
# One function per metric (a call compiles its own metric's only). No
# fast-math: the coefficients are exactly the IEEE float64 expressions below
# (no FMA contraction), whatever the device.

@jit(fastmath=False)
def _coef_variance(stats, weight, n_rows, sq, coef):
    scale = 2.0 * weight / sq.shape[0]
    for j in range(sq.shape[0]):
        diff = stats[1, ST_VAR, j] - stats[0, ST_VAR, j]
        sq[j] = diff * diff
        b = (scale * diff) * (2.0 / n_rows)
        coef[CF_A, j] = stats[1, ST_MEAN, j]
        coef[CF_B, j] = b
        coef[CF_C, j] = 0.0
        coef[CF_BOUND, j] = abs(b) * np.sqrt(n_rows * stats[1, ST_VAR, j])


@callee(fastmath=False)
def _finite_sq(stats, row, j):
    """``(sel_s - sel_t)_j**2`` and the difference; the square is NaN where a
    mean magnitude is not finite (inf/NaN input that the sigmoid or the
    maximum hide)."""
    diff = stats[1, row, j] - stats[0, row, j]
    if np.isfinite(stats[0, ST_MEAN_ABS, j]) and np.isfinite(stats[1, ST_MEAN_ABS, j]):
        return diff * diff, diff
    return np.nan, diff


@jit(fastmath=False)
def _coef_sparsity(stats, weight, k, n_rows, sq, coef):
    scale = 2.0 * weight / sq.shape[0]
    for j in range(sq.shape[0]):
        # np.int64(): a global constant is a literal to Numba, and each literal
        # value would compile _finite_sq once more (tests/test_compile_cost.py).
        sq[j], diff = _finite_sq(stats, np.int64(ST_SOFT), j)
        b = (scale * diff) * (-k / n_rows)
        coef[CF_A, j] = 0.0
        coef[CF_B, j] = b
        coef[CF_C, j] = 0.0
        coef[CF_BOUND, j] = 0.25 * abs(b)


@jit(fastmath=False)
def _coef_peak(stats, weight, eps, n_rows, sq, coef):
    scale = 2.0 * weight / sq.shape[0]
    for j in range(sq.shape[0]):
        sq[j], diff = _finite_sq(stats, np.int64(ST_RATIO), j)
        c = scale * diff
        d = stats[1, ST_MEAN_ABS, j] + eps
        b = -c * stats[1, ST_PEAK, j] / (n_rows * d * d)
        coef[CF_A, j] = 0.0
        coef[CF_B, j] = b
        coef[CF_C, j] = c / d
        coef[CF_BOUND, j] = abs(b)


def loss_and_gradient(t, s, metric, flags, threshold, sharpness, k, eps, weight, grad):
    """The loss's launches in one call: :func:`column_stats` of the teacher
    and the student, the per-column loss terms and gradient coefficients
    (``_coef_*``, formulas above), their sum, and the gradient of the student
    (``_grad_*``, with the overflow check).

    Parameters (the same on both devices; ``F`` is the dtype of ``s``):
        t, s: ``(B, N)`` F, C-contiguous (teacher, student).
        metric: ``VARIANCE``, ``SPARSITY`` or ``PEAK_TO_AVERAGE``; flags: its
            ``WANT_*`` bit.
        threshold, sharpness, k, eps, weight: Python floats
            (``k = sharpness / threshold``).
        grad: ``(B, N)`` F output, ``d loss / d s``.

    Returns ``(total, fits)``: ``sum_j sq_j`` of the loss terms (the loss
    is ``weight * total / N``; NaN/inf when an input is not finite) and
    whether every gradient element is finite.

    On the CPU the kernels run back to back with nothing in between but their
    calls (a small call's Python work between two kernels costs more than its
    own time: it evicts the activations from cache, issue #16), under launch
    contexts of its own, with the element count of ``s`` as ``work`` for the
    serial-below threshold (the relaxed sparsity's statistics too: counting
    them twice, as before, sent 16k-32k-element inputs to the parallel build,
    which was measured 1.2-2x *slower* than the serial one there on 1 and 2
    threads, 3200x10 to 32x1000, float32 and float64, with the same bits).
    """
    n_rows, n_cols = s.shape
    f = s.dtype.type
    col_block, rows, n_ch, n_tasks = _grid(2, n_rows, n_cols)
    part = np.empty((2, n_ch, N_PARTIALS, n_cols), np.float64)
    stats = np.empty((2, N_STATS, n_cols), np.float64)
    sq = np.empty(n_cols, np.float64)
    coef = np.empty((N_COEFS, n_cols), np.float64)
    largest = LARGEST_FINITE[grad.dtype]
    if metric == VARIANCE:
        shift = np.empty((2, n_cols), np.float64)
        with kernel_launch(s.size):
            _variance_grid(t, s, 2, n_tasks, col_block, rows, shift, part, stats)
            _coef_variance(stats, weight, n_rows, sq, coef)
            fits = _grad_variance(s, coef, largest, grad)
    elif metric == SPARSITY:
        sharp_f, k_f = f(sharpness), f(k)
        acc = _soft_scratch(n_tasks, col_block, s.dtype)
        coef_f = np.empty(n_cols, s.dtype)
        with kernel_launch(s.size):
            _sparsity_grid(t, s, 2, n_tasks, sharp_f, k_f, col_block, rows, part, acc, stats)
            _coef_sparsity(stats, weight, k, n_rows, sq, coef)
            fits = _grad_sparsity(s, sharp_f, k_f, coef, coef_f, largest, grad)
    else:
        p_max = np.empty((2, n_ch, n_cols), s.dtype)
        p_arg = np.empty((2, n_ch, n_cols), np.int32)
        argmax = np.empty((2, n_cols), np.int64)
        coef_f = np.empty(n_cols, s.dtype)
        with kernel_launch(s.size):
            _peak_grid(t, s, 2, n_tasks, eps, col_block, rows, part, p_max, p_arg, stats,
                       argmax)
            _coef_peak(stats, weight, eps, n_rows, sq, coef)
            fits = _grad_peak(s, coef, coef_f, argmax[1], largest, grad)
    return ordered_sum(sq), fits


@callee
def _gradient_fits(grad, bound, largest):
    """Whether no element of ``grad`` overflowed: every per-column bound
    ``bound_j`` of ``|grad_ij|`` is at most ``largest`` (the dtype's largest
    finite value; a NaN bound is not), or else every element is finite."""
    for j in range(bound.shape[0]):
        if not (bound[j] <= largest):
            for i in range(grad.shape[0]):
                for jj in range(grad.shape[1]):
                    if not np.isfinite(grad[i, jj]):
                        return False
            return True
    return True


@callee
def _coef_in_dtype(coef, coef_f):
    """``coef_f_j = coef[CF_B, j]`` rounded to ``coef_f``'s dtype (an overflow
    gives inf, which the gradient's check reports)."""
    for j in range(coef_f.shape[0]):
        coef_f[j] = cast_like(coef[CF_B, j], coef_f)


# --- gradient ------------------------------------------------------------------
# No reduction in these loops (the policy grants no ``reassoc``, so a scalar
# accumulator would keep LLVM from vectorising them): overflow of the gradient
# is ruled out from per-column bounds instead (:func:`_gradient_fits`, after
# the loop; each kernel returns its answer).

# One kernel per metric (a call compiles its own metric's only); rows are
# processed in chunks of GRAD_ROWS_PER_CHUNK by one parallel loop. Rows are
# independent: any thread count gives the same bits.

@parallel_jit
def _grad_variance(x, coef, largest, grad):
    """``grad_ij = (x_ij - mean_j) * coef_j`` (``mean = coef[CF_A]``, ``coef =
    coef[CF_B]``, float64). float64 arithmetic: ``x - mean`` cancels when
    |mean| >> std; the loop is memory-bound, so the narrower vectors cost
    nothing (measured)."""
    n_rows = x.shape[0]
    mean64 = coef[CF_A]
    coef64 = coef[CF_B]
    for ch in prange((n_rows + GRAD_ROWS_PER_CHUNK - 1) // GRAD_ROWS_PER_CHUNK):
        for i in range(ch * GRAD_ROWS_PER_CHUNK, min(n_rows, (ch + 1) * GRAD_ROWS_PER_CHUNK)):
            row = x[i]
            g = grad[i]
            for j in range(row.shape[0]):
                g[j] = cast_like((np.float64(row[j]) - mean64[j]) * coef64[j], g)
    return _gradient_fits(grad, coef[CF_BOUND], largest)


@callee
def _sigmoid_slope(z):
    """``sigmoid'(z) = e / (1 + e)**2`` with ``e = exp(-|z|)`` (no overflow), in
    the dtype of ``z`` (from :func:`_sigmoid_parts`)."""
    e, r = _sigmoid_parts(z)
    return e * r * r


@callee
def _sign(v):
    """``sign(v)`` in the dtype of ``v``, ``sign(0) = 0`` (branch-free selects)."""
    zero = cast_like(0.0, v)
    one = cast_like(1.0, v)
    return one if v > zero else (-one if v < zero else zero)


@parallel_jit
def _grad_sparsity(x, sharp, k, coef64, coef, largest, grad):
    """``grad_ij = coef_j sigmoid'(z_ij) sign(x_ij)``, ``z = sharp - k |x|``
    (``coef``: ``(N,)`` scratch, set to ``coef64[CF_B]`` in ``x``'s dtype)."""
    _coef_in_dtype(coef64, coef)
    n_rows = x.shape[0]
    for ch in prange((n_rows + GRAD_ROWS_PER_CHUNK - 1) // GRAD_ROWS_PER_CHUNK):
        for i in range(ch * GRAD_ROWS_PER_CHUNK, min(n_rows, (ch + 1) * GRAD_ROWS_PER_CHUNK)):
            row = x[i]
            g = grad[i]
            for j in range(row.shape[0]):
                v = row[j]
                g[j] = coef[j] * _sigmoid_slope(sharp - k * abs(v)) * _sign(v)
    return _gradient_fits(grad, coef64[CF_BOUND], largest)


@parallel_jit
def _grad_peak(x, coef64, coef, argmax, largest, grad):
    """``grad_ij = coef_j sign(x_ij)``, except at ``i = argmax_j`` where
    ``grad_ij = coef64[CF_B, j] sign(x_ij) + coef64[CF_C, j]`` (the maximum's
    own derivative, in float64); ``coef``: ``(N,)`` scratch, set to
    ``coef64[CF_B]`` in ``x``'s dtype. The peak's elements are not covered by
    ``coef64[CF_BOUND]``: they are checked directly."""
    _coef_in_dtype(coef64, coef)
    n_rows, n_cols = x.shape
    for ch in prange((n_rows + GRAD_ROWS_PER_CHUNK - 1) // GRAD_ROWS_PER_CHUNK):
        for i in range(ch * GRAD_ROWS_PER_CHUNK, min(n_rows, (ch + 1) * GRAD_ROWS_PER_CHUNK)):
            row = x[i]
            g = grad[i]
            for j in range(row.shape[0]):
                g[j] = coef[j] * _sign(row[j])
    peaks_finite = True
    for j in range(n_cols):
        i = argmax[j]
        grad[i, j] = cast_like(coef64[CF_B, j] * np.float64(_sign(x[i, j])) + coef64[CF_C, j],
                               x)
        if not np.isfinite(grad[i, j]):
            peaks_finite = False
    return peaks_finite and _gradient_fits(grad, coef64[CF_BOUND], largest)
