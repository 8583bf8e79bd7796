"""Contrastive losses on the GPU: tiled similarities + online log-sum-exp, no ``B x B``.

The CUDA twin of ``kernels.cpu.contrastive``: the softmax losses (NT-Xent,
supervised contrastive, InfoNCE) and the batch-hard triplet loss
(:func:`triplet`, see its kernels' docstrings). Same notation: *anchors* ``a_i`` (normalised
rows scaled by ``1/tau``), *candidates* ``c_j`` (normalised rows), logits
``z_ij = a_i . c_j``.

:func:`softmax_tiles` is a register-tiled, flash-attention-2-style kernel
that never forms the ``R x C`` logits. A block owns ``BM`` rows and streams
over the columns in tiles of ``BN``; for each column tile it computes the
``BM x BN`` logits, turns them into probabilities ``p``, and multiplies ``P``
by the column tile's rows. Two modes:

* ``ONLINE`` (rows = anchors): per row a running maximum ``m`` and sum ``S``
  of ``exp(z - m)`` (float64; when ``m`` grows both ``S`` and ``acc`` are
  rescaled by ``f = exp(m_old - m_new)``), and optionally the float64
  accumulator ``acc_i = sum_j exp(z_ij - m_i) c_j`` -- so that
  ``lse_i = m_i + log S_i`` and ``sum_j p_ij c_j = acc_i / S_i``; or
* ``FIXED`` (rows = candidates, columns = anchors, ``lse`` known from an
  ``ONLINE`` pass): ``acc_j = sum_i exp(z_ij - lse_i) a_i`` -- the
  candidate side of InfoNCE's gradient (no maximum needed).

**Geometry** (GPU; the simulator uses 2 x 2 threads with 2 x 2 micro tiles,
``BM = BN = 4``, ``ACC_DIM = 8``). A block is 16 x 16 = 256 threads, ``BM =
BN = 64``. Thread ``(ty, tx)`` holds in registers a 4 x 4 micro tile of
logits (rows ``4 ty + r``, columns ``4 tx + c``) and the accumulator of its 4
rows at ``8`` of the ``ACC_DIM = 128`` embedding columns (two groups of 4
consecutive columns, ``64 g + 4 tx + w``): ``64 x 128`` float64 per block.

1. *Logits*: K chunks of the rows and columns (``BK`` = 16 float32 / 8
   float64 embedding columns; ``D`` arbitrary, zero-padded) are staged
   transposed in shared memory (strides ``BM + 4`` and ``BN + 4``); each
   k-step a thread reads its 4 row values and 4 column values with one
   128-bit load each (two for float64) and does 16 FMAs in the rows' dtype. The next chunk's
   global loads are issued into registers before the current chunk's FMAs
   (one shared buffer, two barriers per chunk).
2. *Row statistics* (``ONLINE``): each thread's maximum over its 4 columns
   goes to shared memory; every thread then folds the 16 partials of its rows
   into ``m`` in the same fixed order, so the 16 threads sharing a row hold
   identical bits (a NaN wins the maximum, as it did before: the callers
   detect bad input from a non-finite loss). ``p = exp(z - m)`` in float64;
   each thread keeps its own float64 partial of ``S`` per row over its own
   columns (same ``m``, same rescaling), combined over the 16 threads in
   ``tx`` order at the end of the row tile. ``FIXED``: ``p = exp(z - lse_j)``.
3. *Accumulator*: ``P`` (rows' dtype, ``[j][row]``) goes through shared
   memory; the column tile's rows are re-staged in J chunks (``BJ`` = 16 / 8
   columns x ``ACC_DIM``) and each j-step a thread reads its 4 ``p`` and 8
   column values (three 128-bit loads) for 32 FMAs. float32: the tile's
   ``<= 64`` products are summed in float32 registers (full FP32 rate; a
   relative error of at most ~``64 * 2**-24`` of the tile's ``sum |p c|``,
   below the float32 result's own rounding) and then added into the float64
   accumulator, ``acc = acc * f + partial`` -- the long sum over the ``C``
   columns stays in float64, as the house rule asks. float64: into ``acc``
   directly (rescaled first).

``D > ACC_DIM`` with the accumulator runs ``ceil(D / ACC_DIM)`` launches, each
recomputing the logits and writing 128 accumulator columns (D = 256 costs 1.5x
the minimal flops); without the accumulator ``D`` is unbounded. Shared
memory: 8.5 KiB staging (K chunks, J chunks, partials) + 34 KiB ``P`` tile =
42.5 KiB static per block (the ``P`` buffer is sized for float64 in both
builds). Every sum runs in an order fixed by the tile constants only (not by
the grid: a block grid-strides over whole row tiles), no atomics: the same
inputs give the same bits every run; memory ``O((R + C) D)``.

**Resources** (``ptxas -arch=sm_90 -v`` of NVVM's PTX, numba 0.68, CUDA 13.0):
float32 250 registers, float64 242; 0 bytes spilled or stack; 43520 bytes
shared -- so one 256-thread block (8 warps) per SM. The kernel this replaced
(16 x 16 threads, one logit per thread, the softmax update by one thread per
row, ``acc`` read-modify-written in global memory every 16 columns): 94 / 91
registers, 4480 / 6528 bytes shared, 0 spills.

**Expected speed -- estimated on paper, never run on a GPU.** NT-Xent, ``D =
128``, float32: ``4 R C D`` flops (both products). Counting a shared-memory
wavefront per distinct word per bank (broadcasts free), a warp needs 3
wavefronts per 16 FFMA for the logits and 5 per 32 FFMA for ``P . C``; an SM
issues 4 warp-FFMA per wavefront, so the shared pipe is ~65-75 % busy when the
FMA pipes are saturated: FMA-bound. Global/L2 traffic per column tile is at most
``(BM + 2 BN) D 4`` bytes for ``4 BM BN D`` flops: 21 flop/byte, 32-64 when L1
catches the column tile's second read and the block's unchanging row tile --
above an H100's L2 balance (~12). The PTX issues per thread and column tile
~3500 instructions for the logits (2048 FFMA), ~3000 for ``P . C`` (2048 FFMA)
and ~1100-1500 for the softmax (20 float64 ``exp`` of ~40 instructions each,
maxima, ``P`` stores, the float64 fold): FFMA are ~50-54 % of the issue slots,
the ceiling. With 8 warps per SM, ~26 barriers per column tile and the first
chunk of each phase not prefetched, expect ~35-50 % of FP32 peak on an H100/H200
(67 TFLOP/s: ~23-33 TFLOP/s, B = 65536 NT-Xent in ~65-95 ms). The old kernel was
shared-memory bound at about 1 FFMA per 9 wavefronts (2 scalar loads per FMA,
8-way bank conflicts on its column reads), with a float64 ``acc`` update reading
global memory per FMA and a serial per-row softmax: ~2-3 % of FP32 peak. Next
levers, not taken: float32 ``exp`` for float32 inputs (~8 % of the issue slots;
changes the bits of ``S``), double-buffered stages (fewer barriers), 2 blocks
per SM (needs <= 128 registers: a smaller accumulator share per thread).

The finishing kernels (:func:`finish_student_anchored`,
:func:`finish_teacher_anchored`) apply the positive term and the chain rule
through the clamped normalisation ``x_hat = x / max(||x||, EPS)``, one thread
per row (``O(B D)`` work, negligible next to the ``O(B^2 D)`` tiles).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, types

from kdnumba._constants import NORM_EPS as EPS  # SPEC's norm clamp, as on the CPU
from kdnumba.kernels.cuda import (block_size, compile_kernel, grid_size, is_simulator,
                                  item_launch, shared_alignment_supported)


#: Modes of :func:`softmax_tiles`.
ONLINE = 0
FIXED = 1

#: Side of the batch-hard triplet selection's Gram tiles (a TILE x TILE thread
#: block); fixed at import because shared arrays need compile-time shapes.
TILE = 4 if is_simulator() else 16

_F64_MAX = float(np.finfo(np.float64).max)

# Kernels here avoid the ``min``/``max`` builtins: numba 0.68's CUDA target
# fails to compile their vararg overloads (the simulator does not notice).


# --- row norms, normalisation, class means --------------------------------------------

_NORMS_SIG = "void({F}[:, ::1], float64[::1])"


def _norms_kernel(x, out):
    """One thread per row (O(B D) work, negligible next to the tiles; no
    barriers). Overflow-safe like the CPU kernel."""
    n, dim = x.shape
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        acc = 0.0
        for k in range(dim):
            v = np.float64(x[i, k])
            acc += v * v
        if not (acc <= _F64_MAX):
            # NaN/inf (stays non-finite) or float64 overflow of huge finite
            # entries: rescale by the largest magnitude.
            big = 0.0
            for k in range(dim):
                v = abs(np.float64(x[i, k]))
                if v > big:
                    big = v
            if big <= _F64_MAX and big > 0.0:
                acc = 0.0
                for k in range(dim):
                    v = np.float64(x[i, k]) / big
                    acc += v * v
                out[i] = big * math.sqrt(acc)
                continue
        out[i] = math.sqrt(acc)


_NORMALIZE_SIG = "void({F}[:, ::1], float64[::1], float64, {F}[:, ::1])"


def _normalize_kernel(x, norms, scale, out):
    n, dim = x.shape
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for e in range(start, n * dim, step):
        i = e // dim
        k = e % dim
        nrm = norms[i]
        out[i, k] = x[i, k] * out.dtype.type(scale / (nrm if nrm > EPS else EPS))


_CLASS_MEANS_SIG = "void({F}[:, ::1], float64[::1], int64[::1], int64[::1], {F}[:, ::1])"


def _class_means_kernel(t, t_norms, members, starts, out):
    dim = t.shape[1]
    for c in range(cuda.blockIdx.x, out.shape[0], cuda.gridDim.x):
        lo = starts[c]
        hi = starts[c + 1]
        for k in range(cuda.threadIdx.x, dim, cuda.blockDim.x):
            acc = 0.0
            for m in range(lo, hi):  # members of class c in row order
                row = members[m]
                nrm = t_norms[row]
                acc += np.float64(t[row, k]) / (nrm if nrm > EPS else EPS)
            out[c, k] = acc / (hi - lo)


# --- the tiled softmax -----------------------------------------------------------------
#
# Geometry (see the module docstring). Shared memory is two raw buffers of
# complex128 declared 16-byte aligned (with unsigned indices the CUDA compiler
# then merges the fragment reads into 128-bit ``ld.shared.v4.f32`` / ``v2.f64``
# loads), viewed as the rows' dtype. The alignment is asked for explicitly:
# numba-cuda 0.30 aligns complex128 to 8 bytes only, and on the H200 run of
# 2026-12-04 its float64 build lost the vector loads (float32 fell to v2).
# Numba's built-in CUDA target has no ``alignment`` keyword (and aligns
# complex128 to 16 bytes itself); the simulator accepts only None. The
# buffers' byte sizes are fixed; the depth of a K chunk (``BK``) and of a J
# chunk (``BJ``) follow from the itemsize, so float32 stages twice as deep as
# float64. Indices into shared
# and local memory are ``np.uint64`` (``_U``): a signed index costs a
# negative-index fix-up per access that also hides the adjacency of the loads.

if is_simulator():
    # The simulator runs every thread as a Python thread: 2 x 2 threads with
    # 2 x 2 micro tiles, the same code paths (several chunks, groups, passes).
    _NTY, _NTX, _TM, _TN, _VW, _NG, _PAD, _BK_F32, _KU, _JU = 2, 2, 2, 2, 2, 2, 2, 4, 2, 2
else:
    _NTY, _NTX, _TM, _TN, _VW, _NG, _PAD, _BK_F32, _KU, _JU = 16, 16, 4, 4, 4, 2, 4, 16, 4, 2

_NT = _NTY * _NTX           # threads per block
BM = _NTY * _TM             # rows per block tile
BN = _NTX * _TN             # columns per column tile
_DV = _VW * _NG             # accumulator columns per thread (groups of _VW)
#: Accumulator columns per launch: ``softmax_tiles`` covers ``D > ACC_DIM``
#: with ``ceil(D / ACC_DIM)`` launches (each recomputes the logits).
ACC_DIM = _NTX * _DV
_LDA = BM + _PAD            # stride of a transposed row chunk and of the P tile
_LDC = BN + _PAD            # stride of a transposed column chunk
_X_BYTES = 4 * _BK_F32 * (_LDA + _LDC)   # staging buffer (K chunks / J chunks / partials)
_P_BYTES = 8 * BN * _LDA              # the P tile, sized for float64


def _pow2_floor(n):
    p = 1
    while 2 * p <= n:
        p *= 2
    return p


def _geometry(itemsize):
    bk = _X_BYTES // (itemsize * (_LDA + _LDC))
    bj = _pow2_floor(min(BN, _X_BYTES // (itemsize * ACC_DIM)))
    ea, ec, ej = BM * bk // _NT, BN * bk // _NT, bj * ACC_DIM // _NT
    assert bk >= 1 and BM * bk % _NT == 0 and BN * bk % _NT == 0, "K chunk vs block"
    assert BN % bj == 0 and bj * ACC_DIM % _NT == 0, "J chunk vs block"
    assert bk % _KU == 0 and bj % _JU == 0, "chunks are unrolled by _KU / _JU"
    assert _X_BYTES >= 8 * BM * _NTX, "row partials must fit the staging buffer"
    return bk, bj, ea, ec, ej


_BK4, _BJ4, _EA4, _EC4, _EJ4 = _geometry(4)
_BK8, _BJ8, _EA8, _EC8, _EJ8 = _geometry(8)
_PF = max(_EA4 + _EC4, _EJ4)          # prefetch registers per thread
assert _DV >= _TN and _X_BYTES % 16 == 0 and _P_BYTES % 16 == 0
assert _X_BYTES + _P_BYTES <= 48 * 1024, "static shared memory is capped at 48 KiB"
_X_RAW = _X_BYTES // 16
_P_RAW = _P_BYTES // 16


# Both staging buffers, 16-byte aligned (see the comment above). Inlined into
# the kernel's IR, so the shared arrays are the kernel's own.
if shared_alignment_supported():
    @cuda.jit(device=True, inline="always")
    def _staging_buffers():
        return (cuda.shared.array(_X_RAW, dtype=types.complex128, alignment=16),
                cuda.shared.array(_P_RAW, dtype=types.complex128, alignment=16))
else:  # built-in numba.cuda aligns complex128 to 16 bytes itself
    @cuda.jit(device=True, inline="always")
    def _staging_buffers():
        return (cuda.shared.array(_X_RAW, dtype=types.complex128),
                cuda.shared.array(_P_RAW, dtype=types.complex128))

_X8 = _X_BYTES // 8                   # elements of the staging view when float64
_U = np.uint64

_TILES_SIG = ("void({F}[:, ::1], {F}[:, ::1], int64, int64, int64, float64[::1], "
              "float64[::1], float64[::1], float64[:, ::1])")


@cuda.jit(device=True)
def _ld(x, i, k, n, dim, zero):
    """``x[i, k]``, or ``zero`` outside ``n x dim`` (padding of ragged tiles)."""
    if i < n and k < dim:
        return x[_U(i), _U(k)]
    return zero


@cuda.jit(device=True)
def _pc_chunk(ps, xs, hi, lo, fa, fc, bp, bx, bj, n_groups, wide):
    """``acc[r, v] += sum_jj p[jj, row r] * cj[jj, k_v]`` over one staged J chunk
    (``bj`` columns), into ``hi`` (float64 rows) or ``lo`` (the tile's float32
    partial); groups ``>= n_groups`` lie beyond ``D`` and are skipped."""
    jj = 0
    while jj < bj:
        for u in range(_JU):
            for r in range(_TM):
                fa[r] = ps[bp + _U(u * _LDA + r)]
            for g in range(_NG):
                if g < n_groups:
                    bc = bx + _U(u * ACC_DIM + g * (_NTX * _VW))
                    for w in range(_VW):
                        fc[g * _VW + w] = xs[bc + _U(w)]
                    for r in range(_TM):
                        for w in range(_VW):
                            v = g * _VW + w
                            if wide:
                                hi[r, v] += fa[r] * fc[v]
                            else:
                                lo[r, v] += fa[r] * fc[v]
        bp += _U(_JU * _LDA)
        bx += _U(_JU * ACC_DIM)
        jj += _JU


def _tiles_kernel(rows, cols, mode, want_acc, k_lo, lse_cols, m_out, s_out, acc):
    """Register-tiled flash-attention-style pass (see the module docstring).

    Thread ``(ty, tx)`` owns rows ``row0 + ty*TM + r`` (``r < TM``) of the
    block's tile, columns ``j0 + tx*TN + c`` of each column tile, and the
    accumulator columns ``k_lo + g*NTX*VW + tx*VW + e`` of its rows.
    """
    raw_x, raw_p = _staging_buffers()
    xs = raw_x.view(rows.dtype)        # K chunks, J chunks, row maxima
    xd = raw_x.view(np.float64)        # row-sum partials at the end
    ps = raw_p.view(rows.dtype)        # P tile, ps[j * LDA + row]
    z = cuda.local.array((_TM, _TN), dtype=rows.dtype)
    fa = cuda.local.array(_TM, dtype=rows.dtype)
    fc = cuda.local.array(_DV, dtype=rows.dtype)
    pf = cuda.local.array(_PF, dtype=rows.dtype)
    m = cuda.local.array(_TM, dtype=types.float64)
    s = cuda.local.array(_TM, dtype=types.float64)
    f = cuda.local.array(_TM, dtype=types.float64)
    hi = cuda.local.array((_TM, _DV), dtype=types.float64)
    lo = cuda.local.array((_TM, _DV), dtype=rows.dtype)

    # Constant after compilation (the view's length is a constant).
    wide = xs.shape[0] == _X8
    bk = _BK8 if wide else _BK4
    bj = _BJ8 if wide else _BJ4
    ea = _EA8 if wide else _EA4
    ec = _EC8 if wide else _EC4
    ej = _EJ8 if wide else _EJ4

    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    tid = ty * _NTX + tx
    n_rows, dim = rows.shape
    n_cols = cols.shape[0]
    online = mode == ONLINE
    with_acc = want_acc != 0
    zero = rows.dtype.type(0.0)
    neg_inf = rows.dtype.type(-math.inf)
    n_chunks = (dim + bk - 1) // bk
    ng = (dim - k_lo + _NTX * _VW - 1) // (_NTX * _VW)  # accumulator groups in use
    if ng > _NG:
        ng = _NG

    for tile in range(cuda.blockIdx.x, (n_rows + BM - 1) // BM, cuda.gridDim.x):
        row0 = tile * BM
        for r in range(_TM):
            m[r] = -math.inf
            s[r] = 0.0
            f[r] = 1.0
            for v in range(_DV):
                hi[r, v] = 0.0
        for j0 in range(0, n_cols, BN):
            n_here = n_cols - j0
            # --- logits z[r, c] = rows[i] . cols[j], K chunks through shared,
            # the next chunk's loads in flight during the current chunk's FMAs.
            for r in range(_TM):
                for c in range(_TN):
                    z[r, c] = zero
            for q in range(ea):
                e = q * _NT + tid
                pf[q] = _ld(rows, row0 + e // bk, e % bk, n_rows, dim, zero)
            for q in range(ec):
                e = q * _NT + tid
                pf[ea + q] = _ld(cols, j0 + e // bk, e % bk, n_cols, dim, zero)
            for ch in range(n_chunks):
                for q in range(ea):
                    e = q * _NT + tid
                    xs[_U((e % bk) * _LDA + e // bk)] = pf[q]
                for q in range(ec):
                    e = q * _NT + tid
                    xs[_U(bk * _LDA + (e % bk) * _LDC + e // bk)] = pf[ea + q]
                cuda.syncthreads()
                if ch + 1 < n_chunks:
                    k0 = (ch + 1) * bk
                    for q in range(ea):
                        e = q * _NT + tid
                        pf[q] = _ld(rows, row0 + e // bk, k0 + e % bk, n_rows, dim, zero)
                    for q in range(ec):
                        e = q * _NT + tid
                        pf[ea + q] = _ld(cols, j0 + e // bk, k0 + e % bk, n_cols, dim, zero)
                ba = _U(ty * _TM)
                bc = _U(bk * _LDA + tx * _TN)
                kk = 0
                while kk < bk:  # steps of _KU: immediate offsets, little loop control
                    for u in range(_KU):
                        for r in range(_TM):
                            fa[r] = xs[ba + _U(u * _LDA + r)]
                        for c in range(_TN):
                            fc[c] = xs[bc + _U(u * _LDC + c)]
                        for r in range(_TM):
                            for c in range(_TN):
                                z[r, c] += fa[r] * fc[c]
                    ba += _U(_KU * _LDA)
                    bc += _U(_KU * _LDC)
                    kk += _KU
                cuda.syncthreads()
            # --- probabilities (overwrite z), row statistics
            if online:
                # Row maximum: each thread's partial over its columns, then
                # every thread combines the NTX partials of its rows in the
                # same order (identical bits in all of them). A NaN wins.
                for r in range(_TM):
                    pm = neg_inf
                    for c in range(_TN):
                        if tx * _TN + c < n_here:
                            v = z[r, c]
                            if v > pm or v != v:
                                pm = v
                    xs[_U((ty * _TM + r) * _NTX + tx)] = pm
                cuda.syncthreads()
                for r in range(_TM):
                    m_old = m[r]
                    m_new = m_old
                    base = (ty * _TM + r) * _NTX
                    for q in range(_NTX):
                        v = np.float64(xs[_U(base + q)])
                        if v > m_new or v != v:
                            m_new = v
                    f[r] = math.exp(m_old - m_new) if m_old > -math.inf else 0.0
                    m[r] = m_new
                    total = s[r] * f[r]
                    for c in range(_TN):
                        p = 0.0
                        if tx * _TN + c < n_here:
                            p = math.exp(np.float64(z[r, c]) - m_new)
                        total += p
                        z[r, c] = rows.dtype.type(p)
                    s[r] = total
            else:
                for c in range(_TN):
                    j = tx * _TN + c
                    lse_j = lse_cols[j0 + j] if j < n_here else 0.0
                    for r in range(_TM):
                        p = 0.0
                        if j < n_here:
                            p = math.exp(np.float64(z[r, c]) - lse_j)
                        z[r, c] = rows.dtype.type(p)
            if not with_acc:
                cuda.syncthreads()  # the maxima are read before xs is restaged
                continue
            # --- acc_i = acc_i * f_i + sum_j p_ij cols[j, k]: P through shared
            # (transposed: a thread's TM rows are contiguous), cols in J chunks.
            for c in range(_TN):
                bp = _U((tx * _TN + c) * _LDA + ty * _TM)
                for r in range(_TM):
                    ps[bp + _U(r)] = z[r, c]
            for r in range(_TM):
                for v in range(_DV):
                    if wide:
                        hi[r, v] *= f[r]
                    else:
                        lo[r, v] = zero
            n_jc = (n_here + bj - 1) // bj
            if n_jc > BN // bj:
                n_jc = BN // bj
            cuda.syncthreads()  # P written; the maxima read
            for q in range(ej):
                e = q * _NT + tid
                pf[q] = _ld(cols, j0 + e // ACC_DIM, k_lo + e % ACC_DIM, n_cols, dim, zero)
            for jc in range(n_jc):
                for q in range(ej):
                    xs[_U(q * _NT + tid)] = pf[q]
                cuda.syncthreads()
                if jc + 1 < n_jc:
                    jn = j0 + (jc + 1) * bj
                    for q in range(ej):
                        e = q * _NT + tid
                        pf[q] = _ld(cols, jn + e // ACC_DIM, k_lo + e % ACC_DIM, n_cols,
                                    dim, zero)
                bp = _U(jc * bj * _LDA + ty * _TM)
                bx = _U(tx * _VW)
                if ng == _NG:  # the usual case: no per-group test in the inner loop
                    _pc_chunk(ps, xs, hi, lo, fa, fc, bp, bx, bj, _NG, wide)
                else:
                    _pc_chunk(ps, xs, hi, lo, fa, fc, bp, bx, bj, ng, wide)
                cuda.syncthreads()
            if not wide:
                # float32: the tile's <= BN products summed in float32 (full
                # FP32 rate), then added into the float64 accumulator.
                for r in range(_TM):
                    for v in range(_DV):
                        hi[r, v] = hi[r, v] * f[r] + np.float64(lo[r, v])
        # --- results of the row tile
        if online and k_lo == 0:
            for r in range(_TM):
                xd[_U((ty * _TM + r) * _NTX + tx)] = s[r]
            cuda.syncthreads()
            if tx == 0:
                for r in range(_TM):
                    i = row0 + ty * _TM + r
                    if i < n_rows:
                        total = 0.0
                        base = (ty * _TM + r) * _NTX
                        for q in range(_NTX):
                            total += xd[_U(base + q)]
                        s_out[i] = total
                        m_out[i] = m[r]
        if with_acc:
            for r in range(_TM):
                i = row0 + ty * _TM + r
                if i < n_rows:
                    for g in range(_NG):
                        for w in range(_VW):
                            k = k_lo + g * (_NTX * _VW) + tx * _VW + w
                            if g < ng and k < dim:
                                acc[_U(i), _U(k)] = hi[r, g * _VW + w]
        cuda.syncthreads()


# --- finishing passes --------------------------------------------------------------------

_LSE_SIG = "void(float64[::1], float64[::1], float64[::1])"


def _lse_kernel(m, z, out):
    """``lse_i = m_i + log S_i`` of an ``ONLINE`` pass, one thread per row."""
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[i] = m[i] + math.log(z[i])


_FINISH_STUDENT_SIG = ("void({F}[:, ::1], float64[::1], {F}[:, ::1], {F}[:, ::1], "
                       "float64[:, ::1], float64[::1], float64[::1], {F}[:, ::1], int64[::1], "
                       "int64[::1], int64[::1], float64, float64[::1], {F}[:, ::1])")


@cuda.jit(device=True)
def _chain(s, i, norm, g_row_dot, g, k, inv_b):
    """``d loss / d s_ik`` from ``g = d loss / d s_hat_ik`` through the clamped
    normalisation: ``(g - s_hat_ik (s_hat_i . g)) / ||s_i||`` or ``g / EPS``."""
    if norm > EPS:
        return (g - np.float64(s[i, k]) / norm * g_row_dot) / norm * inv_b
    return g * (inv_b / EPS)


@cuda.jit(device=True)
def _logit(rows, cols, i, j):
    """``z_ij = rows[i] . cols[j]`` rounded exactly as :func:`softmax_tiles`
    rounds it: one multiply-add per embedding column, in column order, in the
    rows' dtype, from zero (the tiles' zero padding adds exact zeros)."""
    z = rows.dtype.type(0.0)
    for k in range(rows.shape[1]):
        z += rows[i, k] * cols[j, k]
    return z


@cuda.jit(device=True)
def _row_loss(rows, cols, i, m, s, members, first, last):
    """``mean_{j in members[first:last]} (lse_i - z_ij)`` with ``lse_i = m + log s``
    and the logits rounded as the tiles rounded them: ``(m - mean z) + log s``,
    both terms ``>= 0`` (``m`` is the largest of the same logits, ``s >= 1``)."""
    total = 0.0
    for q in range(first, last):
        total += np.float64(_logit(rows, cols, i, members[q]))
    gap = m - total / (last - first)
    if gap < 0.0:  # only if the two roundings ever differed (NaN stays NaN)
        gap = 0.0
    return gap + math.log(s)


def _finish_student_kernel(s, s_norms, anchors, cand, acc, m, z, pos, pos_class, members,
                           starts, inv_tau, row_loss, grad):
    """One thread per anchor row (O(B D)): ``loss_i = mean_{j in P(i)} (lse_i - z_ij)``
    (see :func:`_row_loss`), ``d loss / d s_hat_i = (acc_i / S_i - pos_i) / (B tau)``."""
    n, dim = s.shape
    inv_b = 1.0 / n
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        norm = s_norms[i]
        inv_n = 1.0 / (norm if norm > EPS else EPS)
        w = 1.0 / z[i]
        p = pos_class[i]
        proj = 0.0
        for k in range(dim):
            xk = np.float64(s[i, k]) * inv_n
            proj += xk * ((acc[i, k] * w - np.float64(pos[p, k])) * inv_tau)
        row_loss[i] = _row_loss(anchors, cand, i, m[i], z[i], members, starts[p],
                                starts[p + 1])
        for k in range(dim):
            g = (acc[i, k] * w - np.float64(pos[p, k])) * inv_tau
            grad[i, k] = _chain(s, i, norm, proj, g, k, inv_b)


_FINISH_TEACHER_SIG = ("void({F}[:, ::1], float64[::1], {F}[:, ::1], {F}[:, ::1], "
                       "float64[:, ::1], float64[::1], float64[::1], int64[::1], float64[::1], "
                       "{F}[:, ::1])")


def _finish_teacher_kernel(s, s_norms, anchors, cand, acc, m, z, diagonal, row_loss, grad):
    """One thread per row ``i`` (anchor ``t_i`` and candidate ``s_i``):
    ``loss_i = lse_i - z_ii`` (see :func:`_row_loss`; ``diagonal = 0..B-1``),
    ``d loss / d s_hat_i = (acc_i - a_i) / B``."""
    n, dim = s.shape
    inv_b = 1.0 / n
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        norm = s_norms[i]
        inv_n = 1.0 / (norm if norm > EPS else EPS)
        proj = 0.0
        for k in range(dim):
            ak = np.float64(anchors[i, k])
            xk = np.float64(s[i, k]) * inv_n
            proj += xk * (acc[i, k] - ak)
        row_loss[i] = _row_loss(anchors, cand, i, m[i], z[i], diagonal, i, i + 1)
        for k in range(dim):
            g = acc[i, k] - np.float64(anchors[i, k])
            grad[i, k] = _chain(s, i, norm, proj, g, k, inv_b)


# --- batch-hard triplet ----------------------------------------------------------------------

@cuda.jit(device=True)
def _tile_dot(a_s, c_s, rows, cols, i, j0, r, c, zero):
    """``rows[i] . cols[j0 + c]`` for thread ``(r, c)`` of a TILE x TILE block,
    through TILE-wide chunks of the embeddings staged in shared memory (every
    thread of the block must call it). Summed in the rows' dtype, in order.
    (The batch-hard triplet selection's Gram tiles.)"""
    n_rows, dim = rows.shape
    n_cols = cols.shape[0]
    dot = zero
    for k0 in range(0, dim, TILE):
        kk = k0 + c
        a_s[r, c] = rows[i, kk] if (i < n_rows and kk < dim) else zero
        c_s[r, c] = cols[j0 + r, kk] if (j0 + r < n_cols and kk < dim) else zero
        cuda.syncthreads()
        for q in range(TILE):
            dot += a_s[r, q] * c_s[c, q]
        cuda.syncthreads()
    return dot


_SELECT_SIG = ("void({F}[:, ::1], float64[::1], int64[::1], boolean[::1], int64[::1], "
               "int64[::1])")


def _triplet_select_kernel(x, sq, labels, qualifies, pos_idx, neg_idx):
    """Hardest positive / negative per anchor from tiles of the Gram matrix.

    Ranking key ``||x_j||^2 - 2 x_i . x_j`` (the squared distance minus a
    per-anchor constant); positive: ``j != i`` with the anchor's label, largest
    key; negative: another label, smallest key; ties: smallest ``j`` (one
    thread per anchor scans the tile's keys in column order, strict ``>``/``<``).
    """
    a_s = cuda.shared.array((TILE, TILE), dtype=x.dtype)
    c_s = cuda.shared.array((TILE, TILE), dtype=x.dtype)
    k_s = cuda.shared.array((TILE, TILE), dtype=types.float64)
    bp_s = cuda.shared.array(TILE, dtype=types.float64)
    bn_s = cuda.shared.array(TILE, dtype=types.float64)
    jp_s = cuda.shared.array(TILE, dtype=types.int64)
    jn_s = cuda.shared.array(TILE, dtype=types.int64)
    c = cuda.threadIdx.x
    r = cuda.threadIdx.y
    n = x.shape[0]
    zero = x.dtype.type(0.0)
    for tile in range(cuda.blockIdx.x, (n + TILE - 1) // TILE, cuda.gridDim.x):
        i = tile * TILE + r
        if c == 0:
            bp_s[r] = -math.inf
            bn_s[r] = math.inf
            jp_s[r] = -1
            jn_s[r] = -1
        for j0 in range(0, n, TILE):
            dot = _tile_dot(a_s, c_s, x, x, i, j0, r, c, zero)
            j = j0 + c
            k_s[r, c] = sq[j] - 2.0 * np.float64(dot) if j < n else 0.0
            cuda.syncthreads()
            if c == 0 and i < n and qualifies[i]:
                yi = labels[i]
                for q in range(TILE):
                    jj = j0 + q
                    if jj < n:
                        key = k_s[r, q]
                        if labels[jj] == yi:
                            if jj != i and key > bp_s[r]:
                                bp_s[r] = key
                                jp_s[r] = jj
                        elif key < bn_s[r]:
                            bn_s[r] = key
                            jn_s[r] = jj
            cuda.syncthreads()
        if c == 0 and i < n:
            pos_idx[i] = jp_s[r]
            neg_idx[i] = jn_s[r]
        cuda.syncthreads()


_TRIPLET_ROWS_SIG = ("void({F}[:, ::1], float64, int64[::1], int64[::1], float64, float64, "
                     "float64[::1], float64[::1], float64[::1], float64[::1])")


def _triplet_rows_kernel(x, scale, pos_idx, neg_idx, margin, w, row_loss, d_pos, d_neg,
                         active):
    """Per anchor: exact distances from differences (float64), the hinge, and
    ``d_pos``/``d_neg`` (unscaled distances; the weight of each unit vector is
    ``w / d``, 0 where ``d == 0``); ``active = 1.0`` where the hinge is positive."""
    n, dim = x.shape
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        row_loss[i] = 0.0
        active[i] = 0.0
        d_pos[i] = 0.0
        d_neg[i] = 0.0
        jp = pos_idx[i]
        jn = neg_idx[i]
        if jp < 0:
            continue
        ap = 0.0
        an = 0.0
        for k in range(dim):
            xi = np.float64(x[i, k])
            dp = xi - np.float64(x[jp, k])
            dn = xi - np.float64(x[jn, k])
            ap += dp * dp
            an += dn * dn
        dp_raw = math.sqrt(ap)
        dn_raw = math.sqrt(an)
        d_pos[i] = dp_raw
        d_neg[i] = dn_raw
        h = scale * dp_raw - scale * dn_raw + margin
        if h > 0.0:
            row_loss[i] = h * w
            active[i] = 1.0


_TRIPLET_GRAD_SIG = ("void({F}[:, ::1], int64[::1], int64[::1], float64[::1], float64[::1], "
                     "float64[::1], int64[::1], int64[::1], int64[::1], int64[::1], float64, "
                     "{F}[:, ::1])")


@cuda.jit(device=True)
def _unit(x, a, b, k, d):
    """``(x_a - x_b)_k / d`` (0 when ``d == 0``: coincident points)."""
    if d > 0.0:
        return (np.float64(x[a, k]) - np.float64(x[b, k])) / d
    return 0.0


def _triplet_grad_kernel(x, pos_idx, neg_idx, d_pos, d_neg, active, pos_members, pos_starts,
                         neg_members, neg_starts, w, grad):
    """Gather, one thread per element ``(j, k)``: row ``j``'s own hinge
    ``u_jp - u_jn``, minus ``u_ij`` for anchors ``i`` whose hardest positive is
    ``j``, plus ``u_ij`` for anchors whose hardest negative is ``j`` (active
    anchors only; lists in anchor order) -- no scatter, no atomics."""
    n, dim = x.shape
    for e in range(cuda.grid(1), n * dim, cuda.gridsize(1)):
        j = e // dim
        k = e % dim
        g = 0.0
        if active[j] != 0.0:
            g += _unit(x, j, pos_idx[j], k, d_pos[j]) - _unit(x, j, neg_idx[j], k, d_neg[j])
        for m in range(pos_starts[j], pos_starts[j + 1]):
            i = pos_members[m]
            g -= _unit(x, i, j, k, d_pos[i])
        for m in range(neg_starts[j], neg_starts[j + 1]):
            i = neg_members[m]
            g += _unit(x, i, j, k, d_neg[i])
        grad[j, k] = g * w


_SCALE_SIG = "void({F}[:, ::1], float64, {F}[:, ::1])"


def _scale_kernel(x, factor, out):
    n, dim = x.shape
    for e in range(cuda.grid(1), n * dim, cuda.gridsize(1)):
        out[e // dim, e % dim] = x[e // dim, e % dim] * out.dtype.type(factor)


KERNELS = [(_norms_kernel, _NORMS_SIG), (_normalize_kernel, _NORMALIZE_SIG),
           (_class_means_kernel, _CLASS_MEANS_SIG), (_tiles_kernel, _TILES_SIG),
           (_lse_kernel, _LSE_SIG), (_finish_student_kernel, _FINISH_STUDENT_SIG),
           (_finish_teacher_kernel, _FINISH_TEACHER_SIG),
           (_triplet_select_kernel, _SELECT_SIG), (_triplet_rows_kernel, _TRIPLET_ROWS_SIG),
           (_triplet_grad_kernel, _TRIPLET_GRAD_SIG), (_scale_kernel, _SCALE_SIG)]


# --- launch functions ------------------------------------------------------------------
#
# The same names, arguments and output conventions as ``kernels.cpu.contrastive``:
# inputs are C-contiguous device arrays, the caller's outputs (float64 per-row
# partials ``row_loss``, the gradient ``grad``) are device arrays written here;
# scratch (normalised rows, tile statistics) is allocated on the device.
# ``tile_rows`` is accepted for the common interface: the GPU tiles are fixed.


def row_norms(x, out):
    """``out_i = ||x_i||`` (float64); NaN/inf rows give a non-finite norm."""
    n = x.shape[0]
    compile_kernel(_norms_kernel, _NORMS_SIG, x.dtype)[item_launch(n)](x, out)


def normalized(x, x_norms, scale, out=None):
    """``x_i * scale / max(||x_i||, EPS)`` in ``x``'s dtype (into ``out`` if given)."""
    n, dim = x.shape
    if out is None:
        out = cuda.device_array((n, dim), dtype=x.dtype)
    compile_kernel(_normalize_kernel, _NORMALIZE_SIG, x.dtype)[item_launch(n * dim, 4096)](
        x, x_norms, float(scale), out)
    return out


def class_means(t, t_norms, members, starts, out):
    """``out_c = mean_{i in class c} t_hat_i`` in ``out``'s dtype; ``members``: row
    indices grouped by class (row order inside a class), ``starts``: CSR offsets."""
    n_classes = starts.shape[0] - 1
    threads = block_size(t.shape[1], items_per_thread=4)
    compile_kernel(_class_means_kernel, _CLASS_MEANS_SIG, t.dtype)[
        grid_size(n_classes), threads](t, t_norms, members, starts, out)


def softmax_tiles(rows, cols, mode, *, lse_cols=None, want_acc=True):
    """Run the tiled softmax kernel (see the module docstring).

    Returns ``(m, s, acc)``: for ``ONLINE`` the per-row maximum and rescaled
    sum (``lse = m + log s``), and ``acc`` (``(R, D)`` float64, or ``None``
    when not wanted); for ``FIXED`` ``(None, None, acc)``. An accumulator wider
    than :data:`ACC_DIM` takes ``ceil(D / ACC_DIM)`` launches, each producing
    ``ACC_DIM`` columns of ``acc`` (and recomputing the logits).
    """
    n_rows, dim = rows.shape
    m = cuda.device_array(n_rows, dtype=np.float64)
    s = cuda.device_array(n_rows, dtype=np.float64)
    acc = cuda.device_array((n_rows, dim) if want_acc else (1, 1), dtype=np.float64)
    lse = lse_cols if lse_cols is not None else m
    kernel = compile_kernel(_tiles_kernel, _TILES_SIG, rows.dtype)
    blocks = grid_size(-(-n_rows // BM))
    for k_lo in (range(0, dim, ACC_DIM) if want_acc and dim > 0 else (0,)):
        kernel[blocks, (_NTX, _NTY)](rows, cols, int(mode), int(want_acc), k_lo, lse, m, s,
                                     acc)
    if mode == ONLINE:
        return m, s, (acc if want_acc else None)
    return None, None, acc


def _candidates(first, first_norms, extra, extra_norms):
    """Normalised candidate rows on the device: ``first`` then ``extra`` (or ``None``)."""
    n, dim = first.shape
    n_extra = 0 if extra is None else extra.shape[0]
    cand = cuda.device_array((n + n_extra, dim), dtype=first.dtype)
    normalized(first, first_norms, 1.0, out=cand[:n])
    if n_extra:
        normalized(extra, extra_norms, 1.0, out=cand[n:])
    return cand


def student_anchored(s, s_norms, t, t_norms, neg, neg_norms, pos, pos_class, members, starts,
                     temperature, tile_rows, row_loss, grad):
    """NT-Xent / supervised contrastive (arguments as the CPU function of the same
    name): one ``ONLINE`` pass with the accumulator, then one thread per anchor
    finishes its loss and gradient."""
    inv_tau = 1.0 / temperature
    anchors = normalized(s, s_norms, inv_tau)
    cand = _candidates(t, t_norms, neg, neg_norms)
    m, z, acc = softmax_tiles(anchors, cand, ONLINE)
    compile_kernel(_finish_student_kernel, _FINISH_STUDENT_SIG, s.dtype)[
        item_launch(s.shape[0])](
        s, s_norms, anchors, cand, acc, m, z, cand if pos is None else pos, pos_class,
        members, starts, float(inv_tau), row_loss, grad)


def teacher_anchored(s, s_norms, t, t_norms, neg, neg_norms, temperature, tile_rows, row_loss,
                     grad):
    """InfoNCE (teacher anchors, student + optional constant candidates; arguments
    as the CPU function of the same name)."""
    n = s.shape[0]
    anchors = normalized(t, t_norms, 1.0 / temperature)
    cand = _candidates(s, s_norms, neg, neg_norms)
    m, z, _ = softmax_tiles(anchors, cand, ONLINE, want_acc=False)
    lse = cuda.device_array(n, dtype=np.float64)
    compile_kernel(_lse_kernel, _LSE_SIG)[item_launch(n)](m, z, lse)
    _, _, acc = softmax_tiles(cand[:n], anchors, FIXED, lse_cols=lse)
    diagonal = cuda.to_device(np.arange(n, dtype=np.int64))
    compile_kernel(_finish_teacher_kernel, _FINISH_TEACHER_SIG, s.dtype)[item_launch(n)](
        s, s_norms, anchors, cand, acc, m, z, diagonal, row_loss, grad)


def triplet(s, s_norms, labels, qualifies, n_qualifying, margin, tile_rows, row_loss, grad):
    """Batch-hard triplet loss (arguments as the CPU function of the same name:
    ``labels`` and ``qualifies`` are NumPy arrays, the class bookkeeping being
    host work). The norms (``B`` doubles) come back to pick the power-of-two
    scale: rows are rescaled by it (exactly) so that selection and distances
    run on rows of norm <= 1, as on the CPU."""
    n, dim = s.shape
    dtype = np.dtype(s.dtype)
    if n_qualifying == 0:
        row_loss.copy_to_device(np.zeros(n, dtype=np.float64))
        grad.copy_to_device(np.zeros((n, dim), dtype=dtype))
        return
    s_norms_host = s_norms.copy_to_host()
    max_norm = float(np.max(s_norms_host))
    # (at most 2**1023: rows of norm <= 2 then, distances may overflow: caught by
    # the caller's check of the total)
    exponent = min(math.frexp(max_norm)[1], 1023) if max_norm > 0.0 else 0
    scale = math.ldexp(1.0, exponent)
    x = cuda.device_array((n, dim), dtype=dtype)
    compile_kernel(_scale_kernel, _SCALE_SIG, dtype)[item_launch(n * dim)](
        s, math.ldexp(1.0, -exponent), x)
    sq = cuda.to_device(((s_norms_host / scale) ** 2).astype(dtype).astype(np.float64))
    d_labels = cuda.to_device(np.ascontiguousarray(labels, dtype=np.int64))
    pos_idx = cuda.device_array(n, dtype=np.int64)
    neg_idx = cuda.device_array(n, dtype=np.int64)
    compile_kernel(_triplet_select_kernel, _SELECT_SIG, dtype)[
        grid_size(-(-n // TILE)), (TILE, TILE)](
        x, sq, d_labels, cuda.to_device(np.ascontiguousarray(qualifies, dtype=np.bool_)),
        pos_idx, neg_idx)
    d_pos, d_neg, active = (cuda.device_array(n, dtype=np.float64) for _ in range(3))
    w = 1.0 / n_qualifying
    compile_kernel(_triplet_rows_kernel, _TRIPLET_ROWS_SIG, dtype)[item_launch(n)](
        x, scale, pos_idx, neg_idx, float(margin), w, row_loss, d_pos, d_neg, active)
    # Who receives which unit vector: CSR lists by target row, in anchor order
    # (B integers on the host; the gradient then gathers without atomics).
    p_host, n_host = pos_idx.copy_to_host(), neg_idx.copy_to_host()
    on = active.copy_to_host() != 0.0
    lists = []
    for target in (p_host, n_host):
        anchors = np.flatnonzero(on)
        order = np.argsort(target[anchors], kind="stable")
        members = anchors[order].astype(np.int64)
        starts = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(target[anchors], minlength=n), out=starts[1:])
        lists += [cuda.to_device(members if members.size else np.zeros(1, np.int64)),
                  cuda.to_device(starts)]
    compile_kernel(_triplet_grad_kernel, _TRIPLET_GRAD_SIG, dtype)[item_launch(n * dim)](
        x, pos_idx, neg_idx, d_pos, d_neg, active, *lists, w, grad)
