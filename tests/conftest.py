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
    """Small float64 inputs for every registered loss: ``name -> (args, kwargs)``,
    the arrays positional (student first) and the options as keywords; from each
    loss's registry declaration (its first variant). Used by the bridge tests."""
    from kdnumba import functional

    cases = {}
    for spec in functional.specs():
        variant = spec.variants[0]
        made = spec.make_inputs(rng, np.dtype(np.float64), **variant.inputs)
        args = tuple(made.get(k) for k in spec.array_params)
        options = {k: val for k, val in made.items() if k not in spec.array_params}
        cases[spec.name] = (args, {**options, **variant.options})
    return cases


# --- Hypothesis profiles -------------------------------------------------------------------
# ``ci`` (default): few examples, no deadline (Numba compiles on first use), derandomized
# so every CI run sees the same examples. ``dev``: many random examples, for local bug
# hunting. Select with KDNUMBA_HYPOTHESIS_PROFILE=dev (or pytest's --hypothesis-profile).
# Tests that set max_examples themselves keep it; see tests/test_properties.py.
import os  # noqa: E402

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=8, deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "dev", max_examples=300, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("KDNUMBA_HYPOTHESIS_PROFILE", "ci"))
