"""Deterministic reductions.

Two rules keep every kdnumba result bit-identical run to run, for any thread
count, and whether a kernel was just compiled or loaded from the disk cache:

1. A ``prange`` reduction of a scalar gives different bits on 1 and 2 threads
   (each thread sums its own slice). Kernels write one partial per row (or per
   fixed-size chunk) in parallel and reduce those partials in index order.
2. The order of every sum is fixed *by the source*, never left to LLVM: the
   compilation policy grants no ``reassoc`` (a freshly compiled kernel and the
   same kernel loaded from cache were measured to round differently when it
   did). Long sums use :func:`lane_sum`: eight independent float64
   accumulators, which LLVM's SLP vectoriser packs into one SIMD register
   without changing the order of any addition.
"""

from __future__ import annotations

from kdnumba._policy import jit


@jit
def ordered_sum(values):
    """``sum(values)`` in float64, strictly in index order."""
    total = 0.0
    for i in range(values.shape[0]):
        total += values[i]
    return total


@jit
def lane_sum(x):
    """``sum(x)`` in float64: lane ``k`` sums ``x[k::8]``, lanes added pairwise.

    Fixed order (so deterministic) and vectorisable without reassociation.
    """
    n = x.shape[0]
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    j = 0
    while j + 8 <= n:
        a0 += x[j]
        a1 += x[j + 1]
        a2 += x[j + 2]
        a3 += x[j + 3]
        a4 += x[j + 4]
        a5 += x[j + 5]
        a6 += x[j + 6]
        a7 += x[j + 7]
        j += 8
    while j < n:
        a0 += x[j]
        j += 1
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


@jit
def lane_dot(x, y):
    """``sum(x * y)`` in float64 with the lane structure of :func:`lane_sum`."""
    n = x.shape[0]
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    j = 0
    while j + 8 <= n:
        a0 += float(x[j]) * y[j]
        a1 += float(x[j + 1]) * y[j + 1]
        a2 += float(x[j + 2]) * y[j + 2]
        a3 += float(x[j + 3]) * y[j + 3]
        a4 += float(x[j + 4]) * y[j + 4]
        a5 += float(x[j + 5]) * y[j + 5]
        a6 += float(x[j + 6]) * y[j + 6]
        a7 += float(x[j + 7]) * y[j + 7]
        j += 8
    while j < n:
        a0 += float(x[j]) * y[j]
        j += 1
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
