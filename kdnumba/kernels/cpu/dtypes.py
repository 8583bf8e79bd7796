"""Dtype helpers for kernels that are compiled once per float dtype.

Numba promotes ``float32 (op) float64`` to float64, which halves the SIMD
width of a loop. Kernels therefore cast every scalar that enters a hot loop to
the dtype of the data with :func:`cast_like` (resolved at compile time).
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import overload

#: Largest finite float64: ``x <= MAX_FLOAT64`` is False for NaN and inf, the
#: kernels' one-comparison finiteness test.
MAX_FLOAT64 = float(np.finfo(np.float64).max)

#: Largest finite value of each kernel dtype, for Python-side range checks
#: (``np.finfo`` costs about a microsecond a call, a small call's budget).
LARGEST_FINITE = {np.dtype(t): float(np.finfo(t).max) for t in (np.float32, np.float64)}


def cast_like(value, like):
    """``value`` converted to the scalar type of ``like`` (kernels only)."""
    raise NotImplementedError("cast_like is only callable from Numba kernels")


@overload(cast_like)
def _cast_like_overload(value, like):
    target = like.dtype if isinstance(like, types.Array) else like
    if target == types.float32:
        return lambda value, like: np.float32(value)
    if target == types.float64:
        return lambda value, like: np.float64(value)
    return None
