"""Selectivity loss and statistics on the CUDA path against the CPU kernels."""

from __future__ import annotations

import numpy as np
import pytest
from cuda_support import assert_matches_cpu, device, foreign, to_host

from kdnumba.functional import selectivity_loss, selectivity_statistics

DTYPES = [np.float32, np.float64]
METRICS = ["variance", "sparsity", "peak_to_average"]
TOL = {np.float32: dict(rtol=3e-5, atol=1e-7), np.float64: dict(rtol=1e-11, atol=1e-15)}
PARAMS = dict(threshold=0.3, sharpness=4.0, eps=1e-8, weight=1.5)


def _acts(rng, dtype, shape=(6, 3, 3)):
    s = rng.standard_normal(shape).astype(dtype)
    t = (0.7 * rng.standard_normal(shape) + 0.2).astype(dtype)
    flat = s.reshape(shape[0], -1)
    if shape[0] >= 5:
        flat[2, 0] = flat[4, 0] = s.max() + 1  # a tied maximum: the first row wins
    flat[0, -1] = 0  # sign(0) = 0
    return s, t


def _cuda(s, t, metric, out=None):
    return selectivity_loss(s, t, metric=metric, out=out, device="cuda", **PARAMS)


def _cpu(s, t, metric):
    return selectivity_loss(s, t, metric=metric, device="cpu", **PARAMS)


def _check(got, ref, dtype):
    assert_matches_cpu(got, ref, dtype, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", METRICS)
def test_host_inputs_match_cpu(rng, dtype, metric):
    s, t = _acts(rng, dtype)
    s0 = s.copy()
    loss, grad = _cuda(s, t, metric)
    assert isinstance(grad, np.ndarray)
    _check((loss, grad), _cpu(s, t, metric), dtype)
    np.testing.assert_array_equal(s, s0)


@pytest.mark.parametrize("metric", METRICS)
def test_device_inputs_give_device_gradient(rng, metric):
    s, t = _acts(rng, np.float32, shape=(5, 7))
    got = _cuda(foreign(s), device(t.astype(np.float64)), metric)
    assert not isinstance(got[1], np.ndarray)
    _check(got, _cpu(s, t.astype(np.float64), metric), np.float32)


def test_many_rows_use_several_chunks_and_lanes(rng, monkeypatch):
    from kdnumba.kernels.cuda import selectivity as ks
    monkeypatch.setattr(ks, "MIN_ROWS_PER_CHUNK", 4)
    monkeypatch.setattr(ks, "TARGET_BLOCKS", 3)
    s, t = _acts(rng, np.float64, shape=(11, 5))
    s[9, 2] = s[3, 2] = s[:, 2].max() + 1  # tie across chunks: row 3 wins
    assert ks.n_chunks(11, ks.plan(11, 5)) == 3
    for metric in METRICS:
        _check(_cuda(s, t, metric), _cpu(s, t, metric), np.float64)


def test_single_sample_and_constant_columns(rng):
    s, t = _acts(rng, np.float64, shape=(1, 4))
    for metric in METRICS:
        _check(_cuda(s, t, metric), _cpu(s, t, metric), np.float64)
    const = np.ones((3, 4))
    _check(_cuda(const, t[:1].repeat(3, 0), "variance"),
           _cpu(const, t[:1].repeat(3, 0), "variance"), np.float64)


def test_statistics_match_cpu(rng):
    s, _ = _acts(rng, np.float32)
    got = selectivity_statistics(foreign(s), threshold=0.3, sharpness=4.0, eps=1e-8,
                                 device="cuda")
    ref = selectivity_statistics(s, threshold=0.3, sharpness=4.0, eps=1e-8, device="cpu")
    for name in ref._fields:
        a, b = getattr(got, name), getattr(ref, name)
        assert isinstance(a, np.ndarray) and a.shape == b.shape, name
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9, err_msg=name)
    np.testing.assert_array_equal(got.argmax, ref.argmax)
    np.testing.assert_array_equal(got.sparsity, ref.sparsity)  # counts are exact


def test_hard_sparsity_compares_float32_values_exactly():
    # float32(0.01) < 0.01: counted on both devices (threshold compared in float64).
    x = np.array([[np.float32(0.01)], [np.nextafter(np.float32(0.01), np.float32(1))],
                  [-np.float32(0.01)], [0.0]], np.float32)
    got = selectivity_statistics(device(x), device="cuda")
    assert got.sparsity[0] == 0.75 == selectivity_statistics(x, device="cpu").sparsity[0]


def test_out_buffer_on_device(rng):
    s, t = _acts(rng, np.float64, shape=(4, 6))
    out = foreign(np.zeros_like(s))
    loss, grad = _cuda(foreign(s), foreign(t), "variance", out=out)
    assert grad is out
    np.testing.assert_allclose(to_host(out), _cpu(s, t, "variance")[1], **TOL[np.float64])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_inputs_are_named(rng, metric, bad):
    s, t = _acts(rng, np.float64, shape=(4, 3))
    t[2, 1] = bad
    with pytest.raises(ValueError, match="teacher_acts contains NaN or inf"):
        _cpu(s, t, metric)
    with pytest.raises(ValueError, match="teacher_acts contains NaN or inf"):
        _cuda(device(s), device(t), metric)


def test_shape_errors_match_cpu(rng):
    s = rng.standard_normal((4, 6))
    cases = [(s[:, 0], s[:, 0], ValueError, r"must have shape \(B, N\)"),
             (s, s[:3], ValueError, "batch size mismatch"),
             (s, s[:, :5], ValueError, "neuron count mismatch"),
             (s.reshape(4, 2, 3), s.reshape(4, 3, 2), ValueError, "layout mismatch"),
             (s.astype(np.int64), s, TypeError, "float32 or float64")]
    for a, b, exc, match in cases:
        with pytest.raises(exc, match=match):
            _cpu(a, b, "variance")
        with pytest.raises(exc, match=match):
            _cuda(foreign(a), foreign(b), "variance")


def test_public_api_routes_to_cuda(rng):
    s, t = _acts(rng, np.float64, shape=(4, 5))
    loss, grad = selectivity_loss(foreign(s), foreign(t), metric="sparsity", **PARAMS)
    assert not isinstance(grad, np.ndarray)
    _check((loss, grad), _cpu(s, t, "sparsity"), np.float64)
    stats = selectivity_statistics(foreign(s))
    np.testing.assert_allclose(stats.variance, selectivity_statistics(s).variance)
