"""Correctness of neuron-selectivity distillation: ``selectivity_statistics``,
``selectivity_loss`` and ``NeuronSelectivityDistillationStrategy``.

Every result is compared with the NumPy reference ``kdnumba.reference`` evaluated
in float64 on the very same (dtype-rounded) inputs, with finite differences, and
(where PyTorch is installed) with autograd of the same formula.

Tolerances: float64 ``rtol = 1e-10``; float32 ``rtol = 2e-5`` for the loss and
``atol = 2e-5 * max|grad_ref|`` for the gradient (statistics are accumulated in
float64 in both dtypes; the float32 error comes from the per-element float32
sigmoid and the final rounding of the gradient).
"""

from __future__ import annotations

import warnings

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from testkit import (
    assert_inputs_untouched,
    assert_loss_grad_close,
    assert_same_loss_and_grad,
    central_difference,
    one_and_two_threads,
)

import kdnumba
from kdnumba import reference
from kdnumba.functional import (
    SelectivityMetric,
    SelectivityStatistics,
    kd_loss,
    selectivity_loss,
    selectivity_statistics,
)
from kdnumba.kernels.cpu import selectivity as kern
from kdnumba.strategies import (
    IntermediateActivations,
    IntermediateActivationStrategy,
    NeuronSelectivityDistillationStrategy,
)

F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)
DTYPES = [F32, F64]
METRICS = ["variance", "sparsity", "peak_to_average"]
RTOL = {F32: 2e-5, F64: 1e-10}
# B straddles the 4-row unroll and the 64-row minimum chunk; N the 1024-column block.
SHAPES = [(1, 1), (1, 5), (2, 3), (5, 1), (7, 9), (65, 13), (130, 7), (9, 1030)]


def acts(rng, shape, dtype, scale=0.02, offset=0.0):
    """Activations on the scale of the default sparsity threshold (0.01)."""
    return (offset + scale * rng.standard_normal(shape)).astype(dtype)


def ref64(s, t, **kw):
    return reference.selectivity_loss(np.asarray(s, np.float64), np.asarray(t, np.float64), **kw)


def assert_loss_grad(loss, grad, ref_loss, ref_grad, dtype):
    assert_loss_grad_close(loss, grad, ref_loss, ref_grad, RTOL[np.dtype(dtype)])


# --- statistics -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_statistics_match_reference(rng, dtype, shape):
    x = acts(rng, shape, dtype)
    got = selectivity_statistics(x)
    ref = reference.selectivity_statistics(x.astype(np.float64))
    assert isinstance(got, SelectivityStatistics)
    for name in ("mean", "variance", "sparsity", "sparsity_relaxed", "peak", "mean_abs",
                 "peak_to_average"):
        arr = getattr(got, name)
        assert arr.dtype == np.float64 and arr.shape == shape[1:], name
        np.testing.assert_allclose(arr, ref[name], rtol=1e-5 if dtype == F32 else 1e-12,
                                   atol=1e-300, err_msg=name)
    np.testing.assert_array_equal(got.argmax, ref["argmax"])
    np.testing.assert_array_equal(got.sparsity, ref["sparsity"])  # counts are exact


def test_statistics_keep_the_per_sample_shape(rng):
    x = acts(rng, (6, 2, 3, 4), F64)
    got = selectivity_statistics(x)
    ref = reference.selectivity_statistics(x)
    assert got.variance.shape == (2, 3, 4)
    np.testing.assert_allclose(got.variance.ravel(), ref["variance"], rtol=1e-12)


def test_variance_is_accurate_with_a_large_offset(rng):
    # Naive sum/sum-of-squares loses everything here (mean^2 / var = 1e12);
    # shifting by the first row keeps ~full float64 precision.
    x = acts(rng, (1000, 4), F64, scale=1.0, offset=1e6)
    got = selectivity_statistics(x).variance
    np.testing.assert_allclose(got, x.var(axis=0), rtol=1e-9)


def test_variance_of_a_first_row_outlier_is_accurate():
    x = np.zeros((4096, 3))
    x[0] = [1e6, -3e5, 1.0]
    got = selectivity_statistics(x).variance
    np.testing.assert_allclose(got, x.var(axis=0), rtol=1e-11)


def test_constant_columns_have_zero_variance_and_zero_gradient(rng):
    s = acts(rng, (37, 6), F64)
    s[:, 2] = 0.123456789
    s[:, 4] = -7e5
    t = acts(rng, (37, 6), F64, scale=0.5)
    stats = selectivity_statistics(s)
    assert stats.variance[2] == 0.0 and stats.variance[4] == 0.0
    _, grad = selectivity_loss(s, t, metric="variance")
    assert np.all(grad[:, [2, 4]] == 0.0)
    loss, grad = selectivity_loss(s, t)
    ref_loss, ref_grad = ref64(s, t, metric="variance")
    assert_loss_grad(loss, grad, ref_loss, ref_grad, F64)


def test_argmax_across_row_chunks():
    # 150 rows: chunks of 64, 64 and 22 rows; maxima in every chunk, and ties
    # across chunks (the first row wins).
    x = np.zeros((150, 5))
    x[149, 0] = 2.0
    x[64, 1] = 2.0
    x[[70, 130], 2] = 2.0
    x[[3, 100], 3] = 2.0
    x[:, 4] = -1.0
    assert kern.plan(150, 5)[1] == 64
    got = selectivity_statistics(x)
    np.testing.assert_array_equal(got.argmax, [149, 64, 70, 3, 0])
    _, grad = selectivity_loss(x, np.ones((150, 5)), metric="peak_to_average")
    _, ref_grad = ref64(x, np.ones((150, 5)), metric="peak_to_average")
    # (at a lone maximum the two terms of the derivative nearly cancel)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-10, atol=1e-10 * np.abs(ref_grad).max())


def test_statistics_ties_pick_the_first_row():
    x = np.array([[1.0, 2.0], [3.0, 2.0], [3.0, -1.0], [0.5, 2.0]])
    got = selectivity_statistics(x)
    np.testing.assert_array_equal(got.argmax, [1, 0])
    np.testing.assert_array_equal(got.peak, [3.0, 2.0])


# --- loss and gradient vs the reference -------------------------------------------

@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_loss_matches_reference(rng, metric, dtype, shape):
    s = acts(rng, shape, dtype)
    t = acts(rng, shape, dtype, scale=0.03)
    loss, grad = selectivity_loss(s, t, metric=metric)
    assert isinstance(loss, float)
    assert grad.dtype == dtype and grad.shape == shape and grad.flags.c_contiguous
    ref_loss, ref_grad = ref64(s, t, metric=metric)
    assert_loss_grad(loss, grad, ref_loss, ref_grad, dtype)


@pytest.mark.parametrize("metric", METRICS)
def test_options_are_used(rng, metric):
    s = acts(rng, (20, 7), F64, scale=0.5)
    t = acts(rng, (20, 7), F64, scale=0.8)
    kw = dict(threshold=0.3, sharpness=4.0, eps=1e-3)
    loss, grad = selectivity_loss(s, t, metric=metric, **kw)
    ref_loss, ref_grad = ref64(s, t, metric=metric, **kw)
    assert_loss_grad(loss, grad, ref_loss, ref_grad, F64)


@pytest.mark.parametrize("metric", METRICS)
def test_nchw_input_is_flattened_and_gradient_keeps_the_shape(rng, metric):
    s = acts(rng, (5, 3, 4, 2), F64)
    t = acts(rng, (5, 3, 4, 2), F64, scale=0.03)
    loss, grad = selectivity_loss(s, t, metric=metric)
    assert grad.shape == s.shape
    ref_loss, ref_grad = ref64(s.reshape(5, -1), t.reshape(5, -1), metric=metric)
    assert_loss_grad(loss, grad.reshape(5, -1), ref_loss, ref_grad, F64)


@pytest.mark.parametrize("metric", METRICS)
def test_weight_scales_loss_and_gradient(rng, metric):
    s = acts(rng, (8, 6), F64)
    t = acts(rng, (8, 6), F64, scale=0.03)
    loss, grad = selectivity_loss(s, t, metric=metric)
    wl, wg = selectivity_loss(s, t, metric=metric, weight=0.25)
    assert wl == pytest.approx(0.25 * loss, rel=1e-14)
    np.testing.assert_allclose(wg, 0.25 * grad, rtol=1e-14, atol=1e-300)
    zl, zg = selectivity_loss(s, t, metric=metric, weight=0)
    assert zl == 0.0 and not zg.any()


@pytest.mark.parametrize("metric", METRICS)
def test_identical_inputs_give_zero(rng, metric):
    s = acts(rng, (11, 4), F32)
    loss, grad = selectivity_loss(s, s.copy(), metric=metric)
    assert loss == 0.0
    assert not grad.any()


# --- finite differences (float64) ------------------------------------------------------

FD_SETTINGS = [
    # (metric, options, activation scale, step)
    ("variance", {}, 1.0, 1e-6),
    ("sparsity", {}, 0.012, 1e-8),  # default threshold 0.01, slope 1000: small steps
    ("sparsity", {"threshold": 0.5, "sharpness": 3.0}, 0.6, 1e-6),
    ("peak_to_average", {}, 1.0, 1e-6),
    ("peak_to_average", {"eps": 0.1}, 1.0, 1e-6),
]


@pytest.mark.parametrize("metric, options, scale, h", FD_SETTINGS)
def test_gradient_matches_finite_differences(rng, metric, options, scale, h):
    s = acts(rng, (6, 4), F64, scale=scale)
    t = acts(rng, (6, 4), F64, scale=1.3 * scale)
    # Peak-to-average is differentiable away from ties (continuous data has
    # none) and from |a| = 0; keep every value at least 20 steps from 0.
    s[np.abs(s) < 20 * h] = 0.37 * scale
    loss, grad = selectivity_loss(s, t, metric=metric, **options)
    fd = central_difference(
        lambda x: selectivity_loss(x, t, metric=metric, **options)[0], s.copy(), h)
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-6 * np.abs(fd).max())
    assert np.abs(grad).max() > 0


def test_peak_gradient_tie_rule_is_the_first_maximal_row():
    s = np.array([[0.5, -1.0], [2.0, 3.0], [2.0, 0.25], [-1.0, 3.0]])
    t = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.7, 0.8]])
    _, grad = selectivity_loss(s, t, metric="peak_to_average")
    # The tie limit from the first row's side: raise the first maximal row by a hair.
    nudged = s.copy()
    nudged[1, 0] += 1e-12
    nudged[1, 1] += 1e-12
    _, limit = selectivity_loss(nudged, t, metric="peak_to_average")
    np.testing.assert_allclose(grad, limit, rtol=1e-9)
    ref_loss, ref_grad = ref64(s, t, metric="peak_to_average")
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-12)
    # A later maximal row gets only the denominator's term, like any other
    # positive entry of its column.
    assert grad[2, 0] == grad[0, 0] and grad[3, 1] == grad[2, 1]
    assert grad[1, 0] != grad[2, 0] and grad[1, 1] != grad[3, 1]


def test_gradient_uses_sign_zero_at_zero():
    s = np.array([[0.0, 1.0], [0.5, 0.0], [-0.5, 2.0]])
    t = np.array([[0.2, 0.3], [0.1, 0.9], [0.4, -0.1]])
    for metric in ("sparsity", "peak_to_average"):
        _, grad = selectivity_loss(s, t, metric=metric)
        ref_loss, ref_grad = ref64(s, t, metric=metric)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-12, atol=1e-300)
    _, grad = selectivity_loss(s, t, metric="sparsity")
    assert grad[0, 0] == 0.0 and grad[1, 1] == 0.0


# --- PyTorch autograd of the same formula ------------------------------------------

@pytest.mark.parametrize("metric", METRICS)
def test_gradient_matches_torch_autograd(rng, metric):
    """Autograd of the PyTorch expression the benchmarks time
    (``reference.selectivity_loss_torch``), on (B, C, N) input with a zero."""
    torch = pytest.importorskip("torch")
    from kdnumba.reference.selectivity import selectivity_loss_torch
    s = acts(rng, (12, 5, 2), F64)
    t = acts(rng, (12, 5, 2), F64, scale=0.03)
    s[3, 1, 0] = 0.0  # sign(0) = 0, as torch.abs' gradient
    ts = torch.from_numpy(s.copy()).requires_grad_(True)
    tl = selectivity_loss_torch(ts, torch.from_numpy(t), metric=metric, weight=0.5)
    tl.backward()
    loss, grad = selectivity_loss(s, t, metric=metric, weight=0.5)
    assert loss == pytest.approx(tl.item(), rel=1e-10)
    np.testing.assert_allclose(grad, ts.grad.numpy(), rtol=1e-9,
                               atol=1e-12 * np.abs(grad).max())


# --- edge cases ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_of_one_variance_is_zero_with_zero_gradient(rng, dtype):
    s = acts(rng, (1, 6), dtype)
    t = acts(rng, (1, 6), dtype, scale=1.0)
    stats = selectivity_statistics(s)
    assert not stats.variance.any()
    loss, grad = selectivity_loss(s, t, metric="variance")
    assert loss == 0.0 and not grad.any()


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_of_one_other_metrics(rng, metric, dtype):
    s = acts(rng, (1, 6), dtype)
    t = acts(rng, (1, 6), dtype, scale=0.03)
    loss, grad = selectivity_loss(s, t, metric=metric)
    ref_loss, ref_grad = ref64(s, t, metric=metric)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    assert_loss_grad(loss, grad, ref_loss, ref_grad, dtype)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_zero_activations(rng, metric, dtype):
    s = np.zeros((9, 5), dtype)
    t = acts(rng, (9, 5), dtype)
    stats = selectivity_statistics(s)
    assert not stats.variance.any() and not stats.peak_to_average.any()
    np.testing.assert_array_equal(stats.sparsity, 1.0)
    np.testing.assert_allclose(stats.sparsity_relaxed, 1 / (1 + np.exp(-10.0)), rtol=1e-6)
    loss, grad = selectivity_loss(s, t, metric=metric)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    ref_loss, ref_grad = ref64(s, t, metric=metric)
    assert_loss_grad(loss, grad, ref_loss, ref_grad, dtype)
    if metric != "peak_to_average":
        assert not grad.any()  # var' = a - mean = 0; |a|' = sign(0) = 0
    zl, zg = selectivity_loss(s, s.copy(), metric=metric)
    assert zl == 0.0 and not zg.any()


@pytest.mark.parametrize("metric", METRICS)
def test_large_values_stay_finite(rng, metric):
    s = acts(rng, (16, 3), F32, scale=1e4)
    t = acts(rng, (16, 3), F32, scale=2e4)
    loss, grad = selectivity_loss(s, t, metric=metric)
    ref_loss, ref_grad = ref64(s, t, metric=metric)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    assert_loss_grad(loss, grad, ref_loss, ref_grad, F32)


def test_gradient_overflow_is_reported():
    s = np.array([[3e18, 0.0], [-3e18, 1.0]], np.float32)
    t = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match="gradient overflowed"):
        selectivity_loss(s, t, metric="variance")
    # float64 represents it.
    loss, grad = selectivity_loss(s.astype(F64), t.astype(F64), metric="variance")
    assert np.isfinite(grad).all() and loss > 0


@pytest.mark.parametrize("metric", ["sparsity", "peak_to_average"])
def test_gradient_overflow_is_reported_for_every_metric(rng, metric):
    s = acts(rng, (8, 3), F32)
    t = acts(rng, (8, 3), F32, scale=0.05)
    with pytest.raises(ValueError, match="gradient overflowed"):
        selectivity_loss(s, t, metric=metric, weight=1e38)
    loss, grad = selectivity_loss(s.astype(F64), t.astype(F64), metric=metric, weight=1e38)
    assert np.isfinite(grad).all()


# --- the sparsity relaxation ----------------------------------------------------------

def test_relaxed_sparsity_converges_to_the_hard_fraction(rng):
    x = acts(rng, (400, 6), F64, scale=0.02)
    x[np.abs(np.abs(x) - 0.01) < 1e-6] = 0.5  # no value at the threshold
    hard = selectivity_statistics(x).sparsity
    gaps = [np.abs(selectivity_statistics(x, sharpness=k).sparsity_relaxed - hard).max()
            for k in (1.0, 10.0, 100.0, 1e3, 1e4, 1e6)]
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps
    # sigmoid(-k * min| 1 - |a|/threshold |) bounds the gap; here min >= 1e-4.
    assert gaps[-1] < 1e-12


def test_hard_sparsity_compares_float32_values_exactly():
    # float32(0.01) = 0.0099999998 < 0.01: counted, although it equals the
    # threshold rounded to float32.
    x = np.array([[np.float32(0.01)], [np.nextafter(np.float32(0.01), np.float32(1))],
                  [-np.float32(0.01)], [0.0]], np.float32)
    assert float(x[0, 0]) < 0.01 < float(x[1, 0])
    got = selectivity_statistics(x)
    assert got.sparsity[0] == 0.75
    assert got.sparsity[0] == reference.selectivity_statistics(x.astype(np.float64))["sparsity"][0]


def test_relaxed_sparsity_counts_half_at_the_threshold():
    x = np.array([[0.01], [-0.01], [0.0], [1.0]])
    got = selectivity_statistics(x, sharpness=1e9)
    assert got.sparsity[0] == 0.25  # strict: |a| < threshold
    assert got.sparsity_relaxed[0] == pytest.approx((0.5 + 0.5 + 1.0) / 4)


def test_sparsity_large_sharpness_is_stable(rng):
    s = acts(rng, (20, 3), F32)
    t = acts(rng, (20, 3), F32, scale=0.05)
    loss, grad = selectivity_loss(s, t, metric="sparsity", sharpness=1e7)
    assert np.isfinite(loss) and np.isfinite(grad).all()


# --- determinism, blocking, inputs untouched -------------------------------------------

# (tests/test_contract.py checks the variance loss; these are the other metrics.)
@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")
@pytest.mark.parametrize("metric", ["sparsity", "peak_to_average"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bitwise_identical_for_1_and_2_threads(rng, metric, dtype):
    s = acts(rng, (300, 1100), dtype)  # 2 column blocks x 5 row chunks
    t = acts(rng, (300, 1100), dtype, scale=0.03)
    (r1, st1), (r2, st2) = one_and_two_threads(
        lambda: (selectivity_loss(s, t, metric=metric), selectivity_statistics(s)))
    assert_same_loss_and_grad(r1, r2)
    for a, b in zip(st1, st2):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_column_blocking_does_not_change_any_bit(rng, dtype):
    """Each column's partials are summed in row order whatever the block width."""
    x = acts(rng, (23, 45), dtype)
    y = acts(rng, (23, 45), dtype, scale=0.03)
    rows = 8
    n_ch = kern.n_chunks(23, rows)
    flags = kern.WANT_VARIANCE | kern.WANT_SPARSITY | kern.WANT_PEAK | kern.WANT_HARD
    scalar = dtype.type
    results = []
    for col_block in (45, 16, 7, 1):
        stats = np.empty((2, kern.N_STATS, 45))
        argmax = np.empty((2, 45), np.int64)
        kern.column_stats_grid(x, y, 2, flags, 0.01, scalar(10.0), scalar(1000.0), 1e-8,
                          col_block, rows, np.empty((2, n_ch, kern.N_PARTIALS, 45)),
                          np.empty((2, n_ch, 45), dtype), np.empty((2, n_ch, 45), np.int32),
                          stats, argmax)
        results.append((stats, argmax))
    for stats, argmax in results[1:]:
        np.testing.assert_array_equal(stats, results[0][0])
        np.testing.assert_array_equal(argmax, results[0][1])
    # The teacher's statistics do not depend on being computed with the student's.
    stats = np.empty((1, kern.N_STATS, 45))
    argmax = np.empty((1, 45), np.int64)
    kern.column_stats_grid(y, y, 1, flags, 0.01, scalar(10.0), scalar(1000.0), 1e-8,
                      16, rows, np.empty((1, n_ch, kern.N_PARTIALS, 45)),
                      np.empty((1, n_ch, 45), dtype), np.empty((1, n_ch, 45), np.int32),
                      stats, argmax)
    np.testing.assert_array_equal(stats[0], results[0][0][1])
    np.testing.assert_array_equal(argmax[0], results[0][1][1])


def test_plan_depends_on_the_shape_only():
    assert kern.plan(4096, 2048) == (1024, 128)
    assert kern.plan(10, 5) == (5, 10)
    assert kern.plan(1, 1) == (1, 1)
    col_block, rows = kern.plan(10**6, 4)
    assert col_block == 4 and kern.n_chunks(10**6, rows) == kern.TARGET_TASKS


def test_statistics_leave_their_input_untouched(rng):
    s = acts(rng, (10, 3, 2), F32)
    s_strided = acts(rng, (20, 6), F32)[::2]
    assert_inputs_untouched(lambda: (selectivity_statistics(s),
                                     selectivity_statistics(s_strided)), s, s_strided)


def test_accepts_lists_and_torch_tensors(rng):
    s = acts(rng, (4, 3), F64)
    t = acts(rng, (4, 3), F64)
    loss, grad = selectivity_loss(s.tolist(), list(t))
    ref_loss, ref_grad = ref64(s, t, metric="variance")
    assert_loss_grad(loss, grad, ref_loss, ref_grad, F64)
    torch = pytest.importorskip("torch")
    loss_t, grad_t = selectivity_loss(torch.from_numpy(s), torch.from_numpy(t))
    assert loss_t == loss and isinstance(grad_t, np.ndarray)


# --- bad input ------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.arange(6).reshape(3, 2), np.ones((3, 2), bool),
                                 np.ones((3, 2), np.float16), np.ones((3, 2), complex)])
def test_statistics_of_non_float_input_raise_type_error(bad):
    with pytest.raises(TypeError, match="acts"):
        selectivity_statistics(bad)


# (tests/test_contract.py checks the variance loss; the sigmoid and the maximum
# hide inf/NaN, so the other metrics detect them differently.)
@pytest.mark.parametrize("metric", ["sparsity", "peak_to_average"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["student_acts", "teacher_acts"])
def test_non_finite_input_raises(rng, metric, value, where):
    s = acts(rng, (6, 4), F32)
    t = acts(rng, (6, 4), F32)
    (s if where == "student_acts" else t)[2, 1] = value
    with pytest.raises(ValueError, match=f"{where} contains NaN or inf"):
        selectivity_loss(s, t, metric=metric)
    with pytest.raises(ValueError, match="NaN or inf"):
        selectivity_statistics(s if where == "student_acts" else t)


def test_statistics_shape_errors():
    with pytest.raises(ValueError, match=r"\(B, 1\)"):
        selectivity_statistics(np.ones(4))
    with pytest.raises(ValueError, match="empty"):
        selectivity_statistics(np.ones((0, 3)))
    with pytest.raises(ValueError, match="zero-length"):
        selectivity_statistics(np.ones((3, 0)))


def test_metric_parsing():
    assert SelectivityMetric.parse("variance") is SelectivityMetric.VARIANCE
    assert SelectivityMetric.parse("PEAK_TO_AVERAGE") is SelectivityMetric.PEAK_TO_AVERAGE
    assert SelectivityMetric.parse("PeakToAverage") is SelectivityMetric.PEAK_TO_AVERAGE
    assert SelectivityMetric.parse(SelectivityMetric.SPARSITY) is SelectivityMetric.SPARSITY
    assert SelectivityMetric.SPARSITY == "sparsity"
    assert {m.name for m in SelectivityMetric} == {"VARIANCE", "SPARSITY", "PEAK_TO_AVERAGE"}


@settings(max_examples=25, deadline=None)
@given(data=st.data(), metric=st.sampled_from(METRICS))
def test_random_inputs_match_reference(data, metric):
    shape = data.draw(hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=9))
    elems = st.floats(-3, 3, allow_nan=False, width=64)
    s = data.draw(hnp.arrays(np.float64, shape, elements=elems))
    t = data.draw(hnp.arrays(np.float64, shape, elements=elems))
    loss, grad = selectivity_loss(s, t, metric=metric, threshold=0.5, sharpness=3.0)
    ref_loss, ref_grad = ref64(s, t, metric=metric, threshold=0.5, sharpness=3.0)
    assert loss == pytest.approx(ref_loss, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-9,
                               atol=1e-12 * max(1, np.abs(ref_grad).max()))


# --- the strategy ------------------------------------------------------------------------

def layer_acts(rng, shape=(8, 3, 4)):
    s = acts(rng, shape, F32)
    t = acts(rng, shape, F32, scale=0.03)
    return (IntermediateActivations(conv3=s, fc=np.ones((shape[0], 2), np.float32)),
            IntermediateActivations(conv3=t, fc=np.ones((shape[0], 2), np.float32)))


def test_strategy_defaults_follow_the_spec():
    strategy = NeuronSelectivityDistillationStrategy()
    assert strategy.target_layer_name == "default"
    assert strategy.selectivity_weight == 0.5
    assert strategy.metric is SelectivityMetric.VARIANCE
    assert (strategy.temperature, strategy.alpha) == (3.0, 0.3)
    assert (strategy.threshold, strategy.sharpness, strategy.eps) == (0.01, 10.0, 1e-8)
    assert isinstance(strategy, IntermediateActivationStrategy)
    assert isinstance(strategy, kdnumba.DistillationStrategy)
    assert kdnumba.NeuronSelectivityDistillationStrategy is NeuronSelectivityDistillationStrategy
    assert kdnumba.SelectivityMetric is SelectivityMetric
    assert "VARIANCE" in repr(strategy)


def test_strategy_output_loss_is_kd_loss(rng):
    strategy = NeuronSelectivityDistillationStrategy("conv3", temperature=2.0, alpha=0.4)
    s, t = rng.standard_normal((2, 6, 5))
    y = rng.integers(0, 5, 6)
    loss, grad = strategy.loss_and_gradient(s, t, y)
    ref_loss, ref_grad = kd_loss(s, t, y, temperature=2.0, alpha=0.4)
    assert loss == ref_loss
    np.testing.assert_array_equal(grad, ref_grad)
    assert strategy.compute_loss(s, t, y) == ref_loss
    np.testing.assert_array_equal(strategy.compute_gradient(s, t, y), ref_grad)


@pytest.mark.parametrize("metric", METRICS + list(SelectivityMetric))
def test_strategy_intermediate_is_weighted_selectivity(rng, metric):
    student, teacher = layer_acts(rng)
    strategy = NeuronSelectivityDistillationStrategy("conv3", selectivity_weight=0.25,
                                                     metric=metric)
    loss, grads = strategy.intermediate_loss_and_gradient(student, teacher)
    ref_loss, ref_grad = ref64(student["conv3"], teacher["conv3"], metric=str(metric))
    assert isinstance(grads, IntermediateActivations) and list(grads) == ["conv3"]
    assert grads["conv3"].shape == (8, 3, 4) and grads["conv3"].dtype == F32
    assert loss == pytest.approx(0.25 * ref_loss, rel=2e-5)
    np.testing.assert_allclose(grads["conv3"], 0.25 * ref_grad, rtol=2e-5,
                               atol=2e-5 * 0.25 * np.abs(ref_grad).max())
    assert strategy.compute_intermediate_loss(student, teacher) == loss
    np.testing.assert_array_equal(
        strategy.compute_intermediate_gradient(student, teacher)["conv3"], grads["conv3"])
    unweighted = strategy.compute_selectivity_loss(student["conv3"], teacher["conv3"])
    assert unweighted == pytest.approx(ref_loss, rel=2e-5)
    assert loss == pytest.approx(0.25 * unweighted, rel=1e-12)


def test_strategy_accepts_plain_dicts(rng):
    student, teacher = layer_acts(rng)
    strategy = NeuronSelectivityDistillationStrategy("conv3")
    loss, grads = strategy.intermediate_loss_and_gradient(dict(student), dict(teacher))
    assert loss == strategy.compute_intermediate_loss(student, teacher)
    assert list(grads) == ["conv3"]


@pytest.mark.parametrize("missing_in", ["student", "teacher", "both"])
def test_strategy_missing_layer_raises_or_is_skipped(rng, missing_in):
    student, teacher = layer_acts(rng)
    if missing_in in ("student", "both"):
        del student["conv3"]
    if missing_in in ("teacher", "both"):
        del teacher["conv3"]
    side = "teacher_acts" if missing_in == "teacher" else "student_acts"
    strategy = NeuronSelectivityDistillationStrategy("conv3")
    with pytest.raises(ValueError, match=rf"'conv3' is missing from {side}.*present: .*'fc'"):
        strategy.intermediate_loss_and_gradient(student, teacher)
    with pytest.raises(ValueError, match="missing_layer='skip'"):
        strategy.compute_intermediate_loss(student, teacher)
    skipping = NeuronSelectivityDistillationStrategy("conv3", missing_layer="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, grads = skipping.intermediate_loss_and_gradient(student, teacher)
        assert skipping.compute_intermediate_loss(student, teacher) == 0.0
    assert loss == 0.0 and len(grads) == 0 and isinstance(grads, IntermediateActivations)


def test_strategy_present_layer_does_not_warn(rng):
    student, teacher = layer_acts(rng)
    strategy = NeuronSelectivityDistillationStrategy("conv3")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strategy.intermediate_loss_and_gradient(student, teacher)


def test_strategy_mismatches_raise_with_the_layer_name(rng):
    strategy = NeuronSelectivityDistillationStrategy("fc")
    student = {"fc": np.ones((4, 3), np.float32)}
    with pytest.raises(ValueError, match="'fc'.*neuron count mismatch.*project"):
        strategy.intermediate_loss_and_gradient(student, {"fc": np.ones((4, 7), np.float32)})
    with pytest.raises(ValueError, match="'fc'.*batch size mismatch"):
        strategy.intermediate_loss_and_gradient(student, {"fc": np.ones((5, 3), np.float32)})
    with pytest.raises(TypeError, match="'fc'.*float32 or float64"):
        strategy.intermediate_loss_and_gradient(student, {"fc": np.ones((4, 3), int)})
    with pytest.raises(TypeError, match="student_acts must be an IntermediateActivations"):
        strategy.intermediate_loss_and_gradient([np.ones((4, 3))], student)
    with pytest.raises(ValueError, match="neuron count mismatch"):
        strategy.compute_selectivity_loss(np.ones((4, 3)), np.ones((4, 2)))


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"selectivity_weight": -1.0}, ValueError, "selectivity_weight"),
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"alpha": 1.5}, ValueError, "alpha"),
    ({"metric": "peakiness"}, ValueError, "metric"),
    ({"threshold": 0.0}, ValueError, "threshold"),
    ({"sharpness": -2.0}, ValueError, "sharpness"),
    ({"eps": 0.0}, ValueError, "eps"),
    ({"target_layer_name": ""}, TypeError, "target_layer_name"),
    ({"device": "gpu"}, ValueError, "device"),
])
def test_strategy_bad_hyperparameters(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        NeuronSelectivityDistillationStrategy(**kwargs)
