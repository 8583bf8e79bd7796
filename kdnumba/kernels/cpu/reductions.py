"""Deterministic reductions.

A ``prange`` reduction of a scalar gives different bits on 1 and 2 threads
(each thread sums its own slice). kdnumba kernels therefore write one partial
per row (or per fixed-size chunk) in parallel and reduce those partials here,
serially, in index order.
"""

from __future__ import annotations

from kdnumba._policy import jit


@jit
def ordered_sum(values):
    """``sum(values)`` in float64, always in the same order."""
    total = 0.0
    for i in range(values.shape[0]):
        total += values[i]
    return total
