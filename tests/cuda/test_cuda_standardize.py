"""Logit standardisation on the CUDA path against the CPU kernels."""

from __future__ import annotations

import numpy as np
import pytest
from cuda_support import foreign

from kdnumba.functional import standardize_logits, standardize_logits_backward

TOL = {np.float32: 3e-6, np.float64: 1e-12}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_standardize_matches_cpu(rng, dtype):
    z = (2.0 * rng.standard_normal((3, 37)) + 1.0).astype(dtype)
    g = rng.standard_normal((3, 37)).astype(dtype)
    y = standardize_logits(foreign(z), device="cuda")
    assert not isinstance(y, np.ndarray)
    np.testing.assert_allclose(y.copy_to_host(), standardize_logits(z, device="cpu"),
                               rtol=TOL[dtype], atol=TOL[dtype])
    got = standardize_logits_backward(g, z, device="cuda")
    ref = standardize_logits_backward(g, z, device="cpu")
    np.testing.assert_allclose(got, ref, rtol=TOL[dtype], atol=TOL[dtype] * np.abs(ref).max())
