"""Deterministic reductions.

Two rules keep every kdnumba result bit-identical run to run, for any thread
count, and whether a kernel was just compiled or loaded from the disk cache:

1. A ``prange`` reduction of a scalar gives different bits on 1 and 2 threads
   (each thread sums its own slice). Kernels write one partial per row (or per
   fixed-size chunk) in parallel and reduce those partials in index order.
2. The order of every sum is fixed *by the source*, never left to LLVM: the
   compilation policy grants no ``reassoc`` (a freshly compiled kernel and the
   same kernel loaded from cache were measured to round differently when it
   did). Long sums use :func:`lane_sum`: explicit SIMD vectors
   (:mod:`kdnumba.kernels.cpu.simd`, whose order is fixed in the LLVM IR)
   per 1024-element block, and block totals added in float64.
"""

from __future__ import annotations

from kdnumba._policy import callee, jit
from kdnumba.kernels.cpu.simd import simd_dot, simd_max, simd_sum


@jit
def ordered_sum(values):
    """``sum(values)`` in float64, strictly in index order."""
    total = 0.0
    for i in range(values.shape[0]):
        total += values[i]
    return total


#: Lanes accumulate in the data's own dtype over blocks of this many elements
#: (32 terms per lane), and block totals are added in float64: the lanes stay
#: in float32 SIMD registers, and the rounding error stays that of a 32-term
#: sum whatever the length.
LANE_BLOCK = 1024


@callee
def lane_sum(x):
    """``sum(x)`` as float64: fixed-order SIMD lanes per block, blocks in float64.

    Each block of :data:`LANE_BLOCK` elements is summed in ``x``'s dtype by
    :func:`kdnumba.kernels.cpu.simd.simd_sum` (32 lanes in a fixed order) plus
    its tail of fewer than 32 elements in index order; block totals are added
    in float64 in index order. ``x``: 1-D C-contiguous float32/float64.
    """
    n = x.shape[0]
    total = 0.0
    start = 0
    while start < n:
        stop = min(n, start + LANE_BLOCK)
        block, j = simd_sum(x, start, stop)
        while j < stop:
            block += x[j]
            j += 1
        total += block
        start = stop
    return total


@callee
def lane_dot(x, y):
    """``sum(x * y)`` as float64 with the block/lane structure of :func:`lane_sum`."""
    n = x.shape[0]
    total = 0.0
    start = 0
    while start < n:
        stop = min(n, start + LANE_BLOCK)
        block, j = simd_dot(x, y, start, stop)
        while j < stop:
            block += x[j] * y[j]
            j += 1
        total += block
        start = stop
    return total


@callee
def lane_max(x):
    """``max(x)`` by :func:`kdnumba.kernels.cpu.simd.simd_max` (32 lanes) and a
    scalar tail; ``x`` non-empty, 1-D C-contiguous. NaN elements are skipped
    (unless ``x[0]`` is NaN): callers detect non-finite input elsewhere."""
    n = x.shape[0]
    best, j = simd_max(x, 0, n)
    while j < n:
        if x[j] > best:
            best = x[j]
        j += 1
    return best
