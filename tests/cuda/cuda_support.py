"""Helpers for the CUDA tests (GPU arrays of several kinds, host copies, the
comparison with the CPU path)."""

from __future__ import annotations

import numpy as np
import pytest


class CudaArrayLike:
    """A minimal third-party GPU array (think CuPy): it exposes only
    ``__cuda_array_interface__`` (v3) and no ``__array__``.

    Under the simulator its "device memory" is a NumPy buffer, so a test can
    look behind the interface; on a real GPU it wraps a Numba device array.
    """

    def __init__(self, data, strides=None):
        self._keep = data
        if hasattr(data, "__cuda_array_interface__"):  # a real GPU array
            cai = dict(data.__cuda_array_interface__)
        else:
            iface = data.__array_interface__
            cai = {"shape": data.shape, "typestr": iface["typestr"],
                   "data": iface["data"], "strides": iface["strides"], "version": 3}
        if strides is not None:
            cai["strides"] = strides
        cai["version"] = 3
        self.__cuda_array_interface__ = cai
        self.shape = tuple(cai["shape"])


def device(x, order="C"):
    """``x`` on the device: a Numba device array (C- or Fortran-ordered)."""
    from numba import cuda
    return cuda.to_device(np.array(x, copy=True, order=order))


def foreign(x, order="C"):
    """``x`` on the device behind a bare ``__cuda_array_interface__``.

    Under the simulator its memory is a private NumPy copy of ``x``; on a GPU
    a Numba device array. :func:`to_host` reads it back either way.
    ``order="F"`` gives a non-C-contiguous array (explicit strides).
    """
    from numba.core import config
    if config.ENABLE_CUDASIM:
        return CudaArrayLike(np.array(x, copy=True, order=order))
    return CudaArrayLike(device(x, order))


def to_host(x):
    """Host copy of whatever a CUDA call returned (or of a fake)."""
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, CudaArrayLike):
        return to_host(x._keep)
    return x.copy_to_host()


def assert_matches_cpu(got, ref, dtype, tol):
    """A CUDA-path ``(loss, grad)`` against the CPU path's ``ref``: the loss a
    Python float, the gradient (wherever it lives) of ``dtype`` and ``ref``'s
    shape, both within ``tol`` (``dict(rtol=..., atol=...)``)."""
    loss, grad = got
    assert isinstance(loss, float)
    assert loss == pytest.approx(ref[0], rel=tol["rtol"], abs=tol["atol"])
    grad = to_host(grad)
    assert grad.dtype == np.dtype(dtype) and grad.shape == ref[1].shape
    np.testing.assert_allclose(grad, ref[1], **tol)
