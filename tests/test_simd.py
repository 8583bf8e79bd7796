"""The explicit-SIMD reductions (``kernels/cpu/simd.py``) and the lane sums built on them.

What they promise, and what is checked here:

* the order of every addition is the documented one -- compared bit for bit
  with a NumPy emulation of the lanes;
* the result does not depend on the address of the data (unaligned loads);
* the sums are really vectorised (packed ``addps``/``addpd`` in the machine
  code: the reason the module exists);
* ``lane_sum``/``lane_dot``/``lane_max`` cover the tails and blocks exactly.
"""

from __future__ import annotations

import math
import re

import numba
import numpy as np
import pytest

from kdnumba.kernels.cpu import simd
from kdnumba.kernels.cpu import reductions
from kdnumba.kernels.cpu.reductions import LANE_BLOCK

DTYPES = [np.float32, np.float64]


# The lane reductions are kernel helpers (``callee``: no Python wrapper), so
# the tests call them from a kernel of their own.
@numba.njit(cache=False)
def lane_sum(x):
    return reductions.lane_sum(x)


@numba.njit(cache=False)
def lane_dot(x, y):
    return reductions.lane_dot(x, y)


@numba.njit(cache=False)
def lane_max(x):
    return reductions.lane_max(x)


@numba.njit(cache=False)
def _sum(x, start, stop):
    return simd.simd_sum(x, start, stop)


@numba.njit(cache=False)
def _dot(x, y, start, stop):
    return simd.simd_dot(x, y, start, stop)


@numba.njit(cache=False)
def _max(x, start, stop):
    return simd.simd_max(x, start, stop)


def _emulate(values, dtype, op="sum"):
    """The documented order: FOLDS vector accumulators over STEP-element strides,
    folded pairwise, then lanes by a halving tree -- in ``dtype`` arithmetic."""
    acc = None
    for q in range(0, values.size, simd.STEP):
        chunk = values[q:q + simd.STEP].reshape(simd.FOLDS, simd.LANES)
        if acc is None:
            acc = np.zeros_like(chunk) if op == "sum" else np.full_like(chunk, values[0])
        acc = acc + chunk if op == "sum" else np.where(chunk > acc, chunk, acc)
    rows = list(acc)
    while len(rows) > 1:
        rows = [rows[k] + rows[k + 1] if op == "sum" else np.where(rows[k + 1] > rows[k],
                                                                    rows[k + 1], rows[k])
                for k in range(0, len(rows), 2)]
    lanes = list(rows[0])
    while len(lanes) > 1:
        half = len(lanes) // 2
        lanes = [dtype(lanes[k] + lanes[k + half]) if op == "sum" else max(lanes[k], lanes[k + half])
                 for k in range(half)]
    return lanes[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("start, stop", [(0, 96), (3, 131), (0, 1000), (17, 17 + 32)])
def test_sum_and_dot_follow_the_documented_order_bit_for_bit(rng, dtype, start, stop):
    x = (rng.standard_normal(1000) * 10.0 ** rng.uniform(-3, 3, 1000)).astype(dtype)
    y = rng.standard_normal(1000).astype(dtype)
    value, end = _sum(x, start, stop)
    assert end == start + (stop - start) // simd.STEP * simd.STEP
    assert value == _emulate(x[start:end], dtype)
    assert type(value) is type(x[0].item()) or isinstance(value, float)
    value, end = _dot(x, y, start, stop)
    assert value == _emulate((x[start:end] * y[start:end]).astype(dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_matches_numpy_and_the_emulation(rng, dtype):
    x = rng.standard_normal(517).astype(dtype)
    value, end = _max(x, 5, 517)
    assert end == 5 + 512 // simd.STEP * simd.STEP
    assert value == x[5:end].max() == _emulate(x[5:end], dtype, op="max")


def test_short_ranges_return_the_identity_and_their_start():
    x = np.arange(1.0, 40.0)
    assert _sum(x, 2, 33) == (0.0, 2)  # fewer than STEP elements: nothing consumed
    assert _dot(x, x, 7, 7) == (0.0, 7)
    assert _max(x, 4, 20) == (5.0, 4)  # the maximum starts at x[start]


def test_mixed_dtypes_widen_exactly(rng):
    x = rng.standard_normal(64).astype(np.float32)
    y = rng.standard_normal(64)
    value, end = _dot(x, y, 0, 64)
    assert end == 64
    assert value == _emulate(x.astype(np.float64) * y, np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_results_do_not_depend_on_alignment(rng, dtype):
    x = rng.standard_normal(1000).astype(dtype)
    buffer = np.empty(x.size + 16, dtype=dtype)
    sums, dots = set(), set()
    for offset in range(16):
        view = buffer[offset:offset + x.size]
        view[:] = x
        sums.add(lane_sum(view))
        dots.add(lane_dot(view, view))
    assert len(sums) == 1 and len(dots) == 1


def test_the_sums_are_vectorised():
    # The reason the module exists: packed adds, not a chain of scalar ``addss``.
    for dtype, packed in ((np.float32, "addps"), (np.float64, "addpd")):
        x = np.zeros(64, dtype=dtype)
        _sum(x, 0, 64)
        asm = _sum.inspect_asm((numba.typeof(x), numba.intp, numba.intp))
        assert re.search(rf"\bv?{packed}\b", asm), f"simd_sum({dtype.__name__}) is scalar"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 31, 32, 33, LANE_BLOCK - 1, LANE_BLOCK, LANE_BLOCK + 1,
                               3 * LANE_BLOCK + 77])
def test_lane_reductions_cover_every_element(rng, dtype, n):
    x = rng.standard_normal(n).astype(dtype)
    y = rng.standard_normal(n).astype(dtype)
    eps = np.finfo(dtype).eps
    exact = math.fsum(x.astype(np.float64))
    assert abs(lane_sum(x) - exact) <= 40 * eps * np.abs(x).sum()
    exact_dot = math.fsum(x.astype(np.float64) * y)
    assert abs(lane_dot(x, y) - exact_dot) <= 40 * eps * np.abs(x * y.astype(np.float64)).sum()
    assert lane_max(x) == x.max()
    # A spike anywhere, tails included, is seen by the maximum and counted once by the sum.
    for where in {0, n // 2, n - 1}:
        z = np.zeros(n, dtype=dtype)
        z[where] = 3.0
        assert lane_max(z) == 3.0 and lane_sum(z) == 3.0


def test_lane_sum_is_accurate_on_long_float32_rows():
    # 1 + 2^-24 * 4096 in float32: a plain float32 running sum would return 1.0.
    # Lanes round like a 32-term float32 sum (the lane holding the 1.0 loses its
    # other 31 terms); blocks add in float64, so the other 4065 terms survive.
    x = np.array([1.0] + [2.0 ** -24] * 4096, dtype=np.float32)
    exact = 1.0 + 4096 * 2.0 ** -24
    assert abs(lane_sum(x) - exact) <= 32 * np.finfo(np.float32).eps * exact
    assert abs(lane_sum(x) - exact) < abs(1.0 - exact) / 100


def test_nan_reaches_the_sum_not_the_maximum():
    x = np.ones(100, dtype=np.float32)
    x[40] = np.nan
    assert math.isnan(lane_sum(x)) and math.isnan(lane_dot(x, x))
    assert lane_max(x) == 1.0  # documented: callers detect NaN from their sums
