"""Fixtures shared by the test files (generic ones only)."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    """A freshly seeded generator: every test sees the same numbers on every run."""
    return np.random.default_rng(20240521)
