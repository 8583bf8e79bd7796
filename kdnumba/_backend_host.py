"""The host (CPU) backend: how a functional body allocates, validates, launches
and reduces when its kernels run on the CPU.

Every functional loss is written once against the interface below; its CUDA
twin, :class:`kdnumba._backend_cuda.CudaBackend`, implements the same methods
on device arrays. :func:`kdnumba._dispatch.backend` picks one per call.
Kernel modules of a family (``kernels/cpu/<family>.py`` and
``kernels/cuda/<family>.py``) export the same launch functions with the same
arguments, writing into outputs the body allocated here, so the body never
asks which device it is on.
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType

import numpy as np

from kdnumba import _policy
from kdnumba import _validation as v
from kdnumba._output_pool import POOL
from kdnumba.kernels.cpu.reductions import ordered_sum


class HostBackend:
    """NumPy arrays and ``@njit`` kernels (``kdnumba.kernels.cpu``)."""

    device = "cpu"

    def __init__(self):
        self._modules: dict[str, ModuleType] = {}
        self._placeholders: dict = {}

    def kernels(self, family: str) -> ModuleType:
        """The CPU kernel module of ``family`` (``kdnumba.kernels.cpu.<family>``)."""
        module = self._modules.get(family)
        if module is None:  # imported once; later calls skip importlib (~2 us)
            module = importlib.import_module(f"kdnumba.kernels.cpu.{family}")
            self._modules[family] = module
        return module

    # --- inputs ------------------------------------------------------------------------
    # The methods that only forward to a function are that function (one Python
    # call less each; a small call makes a dozen of them, issue #16).

    #: ``float_array(x, name, *, ndim=None, min_ndim=None, dtype=None)``: ``x``
    #: validated and kernel-ready (``_validation.as_float_array``).
    float_array = staticmethod(v.as_float_array)

    #: ``labels(labels, name, n_rows, n_classes, dtype)``: ``(kind, array or None)``
    #: (``_validation.as_labels``).
    labels = staticmethod(v.as_labels)

    def host_object(self, x):
        """``x`` readable by NumPy: itself on the host (small integer inputs such
        as class labels, whose bookkeeping is host work on any device)."""
        return x

    # --- outputs -----------------------------------------------------------------------
    def gradient_buffer(self, out, like: np.ndarray, inputs=()) -> np.ndarray:
        """``out`` checked, or a new array like ``like``; ``inputs`` are the caller's
        arrays ``out`` must not overlap."""
        if out is None:  # the common case, without a call into _validation
            return POOL.empty_like(like)
        return v.gradient_buffer(out, like, inputs)

    #: ``empty(shape, dtype)``: ``np.empty``'s contract; blocks of 32 MiB or more
    #: come from :mod:`kdnumba._output_pool` (pages already faulted in).
    empty = staticmethod(POOL.empty)
    #: ``zeros(shape, dtype)``: NumPy's.
    zeros = staticmethod(np.zeros)

    def placeholder(self, ndim: int, dtype) -> np.ndarray:
        """A typed stand-in for a kernel argument the call does not read (one
        shared empty array per rank and dtype: having no element, it cannot be
        written)."""
        key = (ndim, dtype)
        arr = self._placeholders.get(key)
        if arr is None:
            arr = self._placeholders[key] = np.zeros((0,) * ndim, dtype=dtype)
        return arr

    def to_device(self, host_array: np.ndarray) -> np.ndarray:
        return host_array

    def to_host(self, arr):
        """A NumPy view or copy of a kernel-side array (``None`` stays ``None``)."""
        return arr

    def deliver(self, grad, out):
        """The gradient as the caller gets it (``out`` when given)."""
        return grad if out is None else out

    # --- running and reducing ------------------------------------------------------------
    #: ``launch(work=None)``: the context around a kernel launch
    #: (``_policy.kernel_launch`` itself, no wrapper call in between).
    launch = staticmethod(_policy.kernel_launch)

    def total(self, partials) -> float:
        """Sum of a float64 vector of partials in index order (deterministic)."""
        return float(ordered_sum(partials))

    def check_finite(self, value: float, named_arrays, what: str = "the loss") -> None:
        """Raise ``ValueError`` naming the first non-finite input when ``value``
        (a kernel's total) is not finite; inputs are only read on that path."""
        if not math.isfinite(value):
            v.raise_non_finite([(name, self.to_host(arr)) for name, arr in named_arrays], what)


HOST = HostBackend()
