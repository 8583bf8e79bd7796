"""Logit standardisation helper against an independent PyTorch autograd statement
of the peer's ``normalize`` (sunshangquan/logit-standardization-KD:
``(z - z.mean(-1)) / (1e-7 + z.std(-1))``, torch.std unbiased)."""

from __future__ import annotations

import numpy as np
import pytest

from kdnumba import functional as F
from kdnumba.functional.standardize import standardize_logits, standardize_logits_backward

torch = pytest.importorskip("torch")


def _peer(z, g):
    zt = torch.tensor(np.asarray(z, np.float64), requires_grad=True)
    y = (zt - zt.mean(dim=-1, keepdim=True)) / (1e-7 + zt.std(dim=-1, keepdim=True))
    y.backward(torch.tensor(np.asarray(g, np.float64)))
    return y.detach().numpy(), zt.grad.numpy()


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
def test_matches_peer_forward_and_backward(rng, dtype, tol):
    z = (3.0 * rng.standard_normal((5, 9)) + 2.0).astype(dtype)
    g = rng.standard_normal((5, 9)).astype(dtype)
    y_ref, gz_ref = _peer(z, g)
    y = standardize_logits(z)
    gz = standardize_logits_backward(g, z)
    assert y.dtype == dtype and gz.dtype == dtype
    np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(gz, gz_ref, rtol=tol, atol=tol * np.abs(gz_ref).max())


def test_exports_and_out_and_inputs_untouched(rng):
    assert F.standardize_logits is standardize_logits
    z = rng.standard_normal((4, 6))
    keep = z.copy()
    out = np.empty_like(z)
    assert standardize_logits(z, out=out) is out
    g = rng.standard_normal((4, 6))
    out2 = np.empty_like(z)
    assert standardize_logits_backward(g, z, out=out2) is out2
    np.testing.assert_array_equal(z, keep)


def test_constant_row_and_large_logits(rng):
    z = np.vstack([np.full(5, 3.0), 1e4 * rng.standard_normal(5)])
    g = rng.standard_normal((2, 5))
    y = standardize_logits(z)
    gz = standardize_logits_backward(g, z)
    assert np.all(y[0] == 0) and np.all(np.isfinite(gz))
    # constant row: only the mean/scale term, (g - mean g) / eps
    np.testing.assert_allclose(gz[0], (g[0] - g[0].mean()) / 1e-7)


def test_errors(rng):
    with pytest.raises(ValueError, match="logits must have at least 2 columns"):
        standardize_logits(np.zeros((3, 1)))
    with pytest.raises(ValueError, match="logits contains NaN"):
        standardize_logits(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="grad_output contains NaN"):
        standardize_logits_backward(np.array([[1.0, np.nan]]), np.array([[1.0, 2.0]]))
    with pytest.raises(TypeError, match="logits"):
        standardize_logits(np.zeros((2, 3), int))
