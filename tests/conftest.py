"""Fixtures shared by the test files (generic ones only)."""

from __future__ import annotations

import numpy as np
import pytest

# The shared helpers' asserts report their values like the tests' own.
pytest.register_assert_rewrite("testkit")


@pytest.fixture
def rng() -> np.random.Generator:
    """A freshly seeded generator: every test sees the same numbers on every run."""
    return np.random.default_rng(20240521)


@pytest.fixture
def loss_cases(rng) -> dict:
    """Small float64 inputs for every functional loss: ``name -> (args, kwargs)``.

    Used by the framework-bridge tests; a registered loss missing here fails
    with a KeyError, so a new loss cannot go untested.
    """
    b, d = 6, 4
    e = lambda *shape: rng.standard_normal(shape)  # noqa: E731
    y = np.array([0, 1, 0, 1, 2, 2])
    return {
        "kd_loss": ((e(b, 5), e(b, 5), y), {"temperature": 2.0}),
        "selectivity_loss": ((e(b, d), e(b, d)), {}),
        "nt_xent": ((e(b, d), e(b, d)), {"temperature": 0.5}),
        "info_nce": ((e(b, d), e(b, d)), {"temperature": 0.5}),
        "supervised_contrastive": ((e(b, d), e(b, d), y), {"temperature": 0.5}),
        "triplet_loss": ((e(b, d), y), {"margin": 0.5}),
        "feature_loss": ((e(b, d), e(b, d)), {}),
        "attention_transfer": ((e(b, 3, 2, 2), e(b, 3, 2, 2)), {}),
        "rkd_loss": ((e(b, d), e(b, d)), {}),
        "attention_map_loss": ((e(b, 2, 3, 3), e(b, 2, 3, 3)), {"inputs": "logits"}),
    }
