"""CUDA tests: run under the Numba CUDA simulator, or on a real GPU.

These tests need ``numba.cuda`` configured *before* Numba is imported, so the
main test run does not collect them; ``tests/test_cuda_simulator.py`` runs
them in their own process with ``NUMBA_ENABLE_CUDASIM=1``::

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda -q

On a machine with a CUDA driver they are also collected by the main run and
then execute on the real GPU (set ``KDNUMBA_CUDA_TESTS=0`` to opt out, ``=1`` to force them on).
Shapes are tiny: the simulator runs every GPU thread as a Python thread
(about 0.15-0.4 s per 32-thread block).
"""

from __future__ import annotations

import ctypes.util
import os

import pytest

# cuda_support's asserts report their values like the tests' own.
pytest.register_assert_rewrite("cuda_support")


def _wanted() -> bool:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return True
    if os.environ.get("KDNUMBA_CUDA_TESTS") == "0":
        return False
    if os.environ.get("KDNUMBA_CUDA_TESTS") == "1":
        # Forced on: a driver mounted outside ldconfig's view (containers)
        # is invisible to find_library.
        return True
    # A CUDA driver library means a GPU machine (checked without importing
    # numba.cuda into the main test process).
    return ctypes.util.find_library("cuda") is not None


def pytest_ignore_collect(collection_path, config):
    if not _wanted():
        return True
    return None


@pytest.fixture(scope="session", autouse=True)
def _cuda_target_ready():
    """Fail loudly (not skip) if the CUDA target is unusable here."""
    from kdnumba import _dispatch
    reason = _dispatch.cuda_unavailable_reason()
    assert reason is None, reason
