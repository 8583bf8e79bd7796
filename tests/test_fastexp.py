"""``kdnumba.kernels.cpu.fastexp``: the branch-free ``exp`` for arguments <= 0.

Accuracy is measured in ulps of the dtype against the best available value of exp:
``np.exp`` in float64 for float64 (what the module's docstring promises), and the float64
``np.exp`` (exact to ~1e-16, far below a float32 ulp) for float32.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba.np.numpy_support import from_dtype

from kdnumba import _policy
from kdnumba.kernels.cpu.fastexp import ZERO_BELOW, exp_nonpos, exp_nonpos_f32, exp_nonpos_f64

F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)
#: At or below these the function returns exactly 0 (documented underflow thresholds).
ZERO = {F32: ZERO_BELOW["float32"], F64: ZERO_BELOW["float64"]}
#: Above these it is accurate (< 2 ulp, in subnormal ulps where exp(x) is subnormal).
UNDERFLOW = {F32: -87.68, F64: -708.74}
#: The documented bound (< 2 ulp); the whole-range test at the end checks it too.
GUARD_ULPS = {F32: 2, F64: 2}


@_policy.jit(cache=False)
def _vexp(x):
    """Apply exp_nonpos elementwise exactly as the kernels do (same policy, same overload)."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = exp_nonpos(x[i])
    return out


@_policy.jit(cache=False)
def _scalar_exp(x):
    return exp_nonpos(x)


def ulp_errors(x: np.ndarray) -> np.ndarray:
    """|fastexp(x) - exp(x)| in units of the dtype's spacing at exp(x)."""
    got = _vexp(x)
    assert got.dtype == x.dtype
    exact = np.exp(x.astype(np.float64))
    spacing = np.spacing(exact.astype(x.dtype)).astype(np.float64)
    return np.abs(got.astype(np.float64) - exact) / spacing


def sample_points(dtype, lo):
    """Dense uniform and log-spaced points in [lo, 0], both ends included."""
    pts = np.concatenate([np.linspace(lo, 0.0, 100_001), -np.geomspace(1e-30, -lo, 50_001),
                          [lo, 0.0]]).astype(dtype)
    return pts[(pts >= lo) & (pts <= 0)]


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_zero_gives_exactly_one(dtype):
    x = np.array([0.0, -0.0, -np.finfo(dtype).smallest_subnormal,
                  -np.finfo(dtype).tiny], dtype=dtype)
    np.testing.assert_array_equal(_vexp(x), np.ones(4, dtype=dtype))
    scalar = exp_nonpos_f32 if dtype == F32 else exp_nonpos_f64
    assert scalar(dtype.type(0.0)) == 1.0
    assert _scalar_exp(dtype.type(-0.0)) == 1.0


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_underflow_is_exactly_zero(dtype):
    limit = ZERO[dtype]
    below = np.array([limit, np.nextafter(dtype.type(limit), dtype.type(-np.inf)), limit - 0.5,
                      limit - 1, -745.2 if dtype == F64 else -103.9, -1e6,
                      -np.finfo(dtype).max, -np.inf], dtype=dtype)
    got = _vexp(below)
    np.testing.assert_array_equal(got, np.zeros_like(below))
    assert not np.signbit(got).any()
    # ... and just above the zero band the result is positive and as accurate
    # as elsewhere (subnormal there), normal once exp(x) is.
    above = np.array([UNDERFLOW[dtype], np.log(np.finfo(dtype).tiny) + 1e-3], dtype=dtype)
    assert (_vexp(above) > 0).all() and _vexp(above)[1] >= np.finfo(dtype).tiny
    assert ulp_errors(above).max() <= GUARD_ULPS[dtype]


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_result_dtype_follows_the_argument(dtype):
    """The overload must not promote float32 to float64 (that would halve the SIMD width)."""
    _scalar_exp(dtype.type(-1.5))
    sig = [s for s in _scalar_exp.nopython_signatures if s.args[0] == from_dtype(dtype)]
    assert sig and sig[0].return_type == from_dtype(dtype)


def test_not_callable_from_python():
    with pytest.raises(NotImplementedError, match="only callable from Numba kernels"):
        exp_nonpos(-1.0)


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_accuracy_on_minus_one_to_zero(dtype):
    """Where range reduction is trivial (n in {-1, 0}) the documented < 2 ulp holds."""
    assert ulp_errors(sample_points(dtype, -1.0)).max() < 2


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_monotone_non_increasing_towards_minus_infinity(dtype):
    x = np.sort(sample_points(dtype, -20.0))
    y = _vexp(x)
    assert (np.diff(y) >= 0).all()


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_relative_error_guard_over_the_whole_range(dtype):
    """Regression guard at today's accuracy (the documented bound is tested below):
    the kernels' softmax sums need a small *relative* error everywhere."""
    x = sample_points(dtype, UNDERFLOW[dtype])
    assert ulp_errors(x).max() <= GUARD_ULPS[dtype]


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_documented_accuracy_over_the_whole_range(dtype):
    lo = -700.0 if dtype == F64 else -87.0
    assert ulp_errors(sample_points(dtype, lo)).max() < 2


def test_vectorisable_log_is_accurate(rng):
    from numba import njit

    from kdnumba.kernels.cpu.fastexp import log_pos_f64

    @njit
    def apply(x, out):
        for i in range(x.size):
            out[i] = log_pos_f64(x[i])

    x = np.concatenate([np.exp(rng.uniform(-708, 709, 20000)), rng.uniform(0.5, 2.0, 20000),
                        [1.0, 2.0, 0.5, np.sqrt(2), np.nextafter(np.sqrt(2), 2), 1e-300,
                         np.finfo(np.float64).max]])
    out = np.empty_like(x)
    apply(x, out)
    ref = np.log(x)
    ulps = np.abs(out - ref) / np.spacing(np.maximum(np.abs(ref), 1e-300))
    assert ulps.max() <= 2
    tiny = np.array([0.0, 5e-324, 1e-310])
    apply(tiny, out[:3])
    np.testing.assert_array_equal(out[:3], np.log(np.finfo(np.float64).tiny))
