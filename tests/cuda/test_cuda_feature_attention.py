"""Feature and attention losses on the CUDA path against the CPU kernels."""

from __future__ import annotations

import numpy as np
import pytest
from cuda_support import assert_matches_cpu, device, foreign

from kdnumba.functional import attention_map_loss, attention_transfer, feature_loss

DTYPES = [np.float32, np.float64]
TOL = {np.float32: dict(rtol=3e-5, atol=1e-7), np.float64: dict(rtol=1e-11, atol=1e-15)}


def _check(got, ref, dtype):
    assert_matches_cpu(got, ref, dtype, TOL[dtype])


# --- feature -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_feature_loss_matches_cpu(rng, dtype, monkeypatch):
    from kdnumba.kernels.cuda import feature as kf
    monkeypatch.setattr(kf, "CHUNK", 16)  # several partials
    s = rng.standard_normal((3, 5, 4)).astype(dtype)
    t = rng.standard_normal((3, 5, 4)).astype(dtype)
    got = feature_loss(foreign(s), foreign(t.astype(np.float64)), device="cuda")
    assert not isinstance(got[1], np.ndarray)
    _check(got, feature_loss(s, t.astype(np.float64), device="cpu"), dtype)
    host = feature_loss(s, t, device="cuda")
    assert isinstance(host[1], np.ndarray)
    _check(host, feature_loss(s, t, device="cpu"), dtype)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_feature_loss_errors_match_cpu(rng):
    s = rng.standard_normal((3, 4))
    bad = s.copy()
    bad[2, 1] = np.inf
    for a, b, exc, match in [(s, s[:2], ValueError, "batch size mismatch"),
                             (s, s[:, :3], ValueError, "shape mismatch"),
                             (s, bad, ValueError, "teacher_feats contains NaN or inf"),
                             (s.astype(bool), s, TypeError, "float32 or float64")]:
        with pytest.raises(exc, match=match):
            feature_loss(a, b, device="cpu")
        with pytest.raises(exc, match=match):
            feature_loss(device(a), device(b), device="cuda")


# --- attention transfer ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant,p", [("repdistiller", 2), ("paper", 3), ("repdistiller", 1)])
def test_attention_transfer_matches_cpu(rng, dtype, variant, p):
    s = rng.standard_normal((2, 3, 3, 4)).astype(dtype)
    t = rng.standard_normal((2, 5, 3, 4)).astype(dtype)  # channel counts may differ
    s[1, :, 0, 0] = 0.0  # sign(0) = 0 in the paper variant
    got = attention_transfer(foreign(s), foreign(t), p=p, variant=variant, device="cuda")
    assert not isinstance(got[1], np.ndarray)
    ref = attention_transfer(s, t, p=p, variant=variant, device="cpu")
    _check(got, ref, dtype)


def test_attention_transfer_zero_map_out_and_errors(rng):
    s = np.zeros((2, 2, 5))
    t = rng.standard_normal((2, 2, 5))
    _check(attention_transfer(s, t, device="cuda"), attention_transfer(s, t, device="cpu"),
           np.float64)
    s = rng.standard_normal((2, 2, 5))
    out = device(np.full_like(s, np.nan))
    loss, grad = attention_transfer(device(s), t, device="cuda", out=out)
    assert grad is out
    _check((loss, grad), attention_transfer(s, t, device="cpu"), np.float64)
    with pytest.raises(ValueError, match="batch size mismatch"):
        attention_transfer(s, t[:1], device="cuda")
    with pytest.raises(ValueError, match="spatial size mismatch"):
        attention_transfer(s, t[:, :, :4], device="cuda")
    with pytest.raises(NotImplementedError, match="pool"):
        attention_transfer(np.zeros((2, 2, 4)), np.zeros((2, 2, 2)), pool=True, device="cuda")
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        attention_transfer(s[0], t[0], device="cuda")
    with pytest.raises(ValueError, match="student_feats contains NaN"):
        attention_transfer(np.full_like(s, np.nan), t, device="cuda")


# --- attention maps ----------------------------------------------------------------------

def _probs(rng, shape, dtype):
    x = rng.random(shape) + 0.05
    return (x / x.sum(axis=-1, keepdims=True)).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_map_losses_match_cpu(rng, dtype):
    shape = (2, 2, 3, 5)
    s, t = _probs(rng, shape, dtype), _probs(rng, shape, dtype)
    t[0, 1, 2, 3] = 0.0  # 0 log 0 = 0
    t[0, 1, 2] /= t[0, 1, 2].sum()
    for kind, inputs in (("mse", "probs"), ("kl", "probs"), ("kl", "logits")):
        got = attention_map_loss(foreign(s), foreign(t), kind=kind, inputs=inputs,
                                 device="cuda")
        assert not isinstance(got[1], np.ndarray)
        ref = attention_map_loss(s, t, kind=kind, inputs=inputs, device="cpu")
        _check(got, ref, dtype)
        out = np.full_like(s, np.nan)  # a host student's gradient copied into out
        loss, grad = attention_map_loss(s, t, kind=kind, inputs=inputs, device="cuda", out=out)
        assert grad is out
        _check((loss, grad), ref, dtype)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_attention_map_errors_match_cpu(rng):
    shape = (2, 3, 4)
    s, t = _probs(rng, shape, np.float64), _probs(rng, shape, np.float64)
    negative = s.copy()
    negative[1, 2, 0] = -0.1
    off = t.copy()
    off[0, 1] *= 1.5
    nan = s.copy()
    nan[0, 0, 0] = np.nan
    for a, b, inputs, match in [(negative, t, "probs", "student_attn .* negative entry"),
                                (s, off, "probs", "teacher_attn rows must be probability"),
                                (nan, t, "probs", "student_attn contains NaN"),
                                (nan, t, "logits", "student_attn contains NaN")]:
        with pytest.raises(ValueError, match=match) as cpu_error:
            attention_map_loss(a, b, kind="kl", inputs=inputs, device="cpu")
        with pytest.raises(ValueError, match=match) as gpu_error:
            attention_map_loss(device(a), device(b), kind="kl", inputs=inputs, device="cuda")
        assert str(gpu_error.value) == str(cpu_error.value)


def test_public_api_routes_to_cuda(rng):
    s = rng.standard_normal((2, 3, 4))
    t = rng.standard_normal((2, 3, 4))
    _check(feature_loss(foreign(s), foreign(t)), feature_loss(s, t, device="cpu"), np.float64)
    _check(attention_transfer(foreign(s), foreign(t)), attention_transfer(s, t, device="cpu"),
           np.float64)
    _check(attention_map_loss(foreign(s), foreign(t)), attention_map_loss(s, t, device="cpu"),
           np.float64)
