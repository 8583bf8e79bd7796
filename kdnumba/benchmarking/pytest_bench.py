"""pytest-benchmark tests generated from the benchmark cases of a family.

``bench/test_bench_losses.py`` is two lines::

    from kdnumba.benchmarking.pytest_bench import make_tests
    globals().update(make_tests())

which defines, parametrised over every case of every registered loss (``benchmark.group`` =
the case name, so pytest-benchmark prints the implementations of one case
side by side):

* ``test_kdnumba``: the headline kdnumba call;
* ``test_kdnumba_variant``: each variant (e.g. ``out=``);
* ``test_numpy``: the NumPy reference;
* ``test_torch``: the PyTorch CPU equivalent (skipped without torch).

Every test first checks that its implementation's loss agrees with
kdnumba's on the same inputs, then times it; first calls (compilation,
cache loading) happen before timing. Run them with
``python -m pytest bench --benchmark-enable`` (the project's default pytest
options disable benchmarks and collect only ``tests/``).
"""

from __future__ import annotations

import numpy as np
import pytest

from kdnumba.benchmarking import all_cases
from kdnumba.benchmarking.runner import AGREEMENT_RTOL, agreement, loss_and_grad

_INPUTS: dict[str, dict] = {}


def inputs_of(case) -> dict:
    """The case's inputs, built once per session (seed 0, as ``kdnumba bench``)."""
    if case.name not in _INPUTS:
        _INPUTS[case.name] = case.make_inputs(np.random.default_rng(0))
    return _INPUTS[case.name]


def _check_agrees(case, inputs, result) -> None:
    measured = agreement(case.kdnumba(inputs), result)
    assert measured, f"{case.name}: result has no comparable loss/gradient"
    for what, rel in measured.items():
        assert rel <= AGREEMENT_RTOL, f"{case.name}: {what} differs from kdnumba by {rel:.2e}"


def _torch_threads():
    torch = pytest.importorskip("torch")
    import numba
    torch.set_num_threads(numba.get_num_threads())
    return torch


def make_tests(family: str | None = None) -> dict:
    """``{"test_kdnumba": ..., ...}`` for the cases of ``family`` (all by default)."""
    cases = all_cases(None if family is None else (family,))
    ids = [c.name for c in cases]
    variants = [(c, label, fn) for c in cases for label, fn in c.variants]

    @pytest.mark.parametrize("case", cases, ids=ids)
    def test_kdnumba(benchmark, case):
        inputs = inputs_of(case)
        benchmark.group = case.name
        benchmark.extra_info["bytes_moved"] = case.bytes_for(inputs)
        first = case.kdnumba(inputs)  # compile or load from cache, untimed
        loss, _ = loss_and_grad(first)
        assert loss is not None and np.isfinite(loss)
        benchmark(case.kdnumba, inputs)

    @pytest.mark.parametrize("case, label, fn", variants,
                             ids=[f"{c.name}-{label}" for c, label, _ in variants])
    def test_kdnumba_variant(benchmark, case, label, fn):
        inputs = inputs_of(case)
        benchmark.group = case.name
        _check_agrees(case, inputs, fn(inputs))
        benchmark(fn, inputs)

    @pytest.mark.parametrize("case", cases, ids=ids)
    def test_numpy(benchmark, case):
        if case.numpy is None:
            pytest.skip(f"{case.name} has no NumPy reference")
        inputs = inputs_of(case)
        benchmark.group = case.name
        _check_agrees(case, inputs, case.numpy(inputs))
        benchmark(case.numpy, inputs)

    @pytest.mark.parametrize("case", cases, ids=ids)
    def test_torch(benchmark, case):
        if case.torch is None:
            pytest.skip(f"{case.name} has no PyTorch equivalent")
        _torch_threads()
        inputs = inputs_of(case)
        benchmark.group = case.name
        run = case.torch(inputs)
        _check_agrees(case, inputs, run())
        benchmark(run)

    return {"test_kdnumba": test_kdnumba, "test_kdnumba_variant": test_kdnumba_variant,
            "test_numpy": test_numpy, "test_torch": test_torch}

