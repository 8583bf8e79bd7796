"""The CUDA backend: the device twin of :mod:`kdnumba._backend_host`.

:class:`CudaBackend` implements the host backend's interface on
``numba.cuda`` device arrays, so a functional body written once runs on
either device. It turns every input into a C-contiguous device array of the
compute dtype and the gradient into what the caller expects back:

* an input exposing ``__cuda_array_interface__`` (Numba device arrays, CuPy
  arrays, PyTorch CUDA tensors) is **adopted**: wrapped as a Numba device
  array over the same GPU memory (``numba.cuda.as_cuda_array``, no copy).
  Its dtype and shape are checked from the interface (``np.asarray`` cannot
  read GPU memory); a dtype cast or a non-contiguous layout is resolved by
  one gather kernel into a new device array; the caller's memory is only
  ever read;
* a host input (anything ``np.asarray`` accepts) is validated exactly as on
  the CPU path and copied to the device;
* the gradient lives where the student lives: a Numba device array on the
  GPU (wrap it with ``cupy.asarray``/``torch.as_tensor(..., device="cuda")``,
  zero-copy) when the student is a GPU array, a NumPy array copied back
  when the student is a host array.

Importing this module does not import ``numba.cuda``; the helpers do, on
first use (the CUDA path only). Under the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``) "device memory" is host memory; objects exposing
``__cuda_array_interface__`` are then viewed through their data pointer, so
the zero-copy path is exercised by the simulator tests as well.

Computations run on Numba's current CUDA device; with several GPUs, make the
inputs' device current first (``with numba.cuda.gpus[i]: ...``).
"""

from __future__ import annotations

import numpy as np

from kdnumba import _validation as v


def _cuda():
    from numba import cuda
    return cuda


def is_device_array(x) -> bool:
    """True for GPU arrays: ``__cuda_array_interface__`` or a Numba device array
    (the simulator's device arrays have no interface, only Numba's marker)."""
    return hasattr(x, "__cuda_array_interface__") or getattr(x, "__cuda_ndarray__", False) is True


def adopt(x):
    """A Numba device array over ``x``'s GPU memory (no copy)."""
    from kdnumba.kernels.cuda import is_simulator
    if getattr(x, "__cuda_ndarray__", False) is True:
        return x
    if is_simulator():
        return _simulated_view(x)
    return _cuda().as_cuda_array(x)


class _HostView:
    """``__array_interface__`` built from a ``__cuda_array_interface__`` (simulator)."""

    def __init__(self, owner):
        cai = owner.__cuda_array_interface__
        if cai.get("mask") is not None:
            raise TypeError("masked GPU arrays are not supported")
        self.owner = owner  # keeps the memory alive as long as the view
        self.__array_interface__ = {
            "data": (int(cai["data"][0]), bool(cai["data"][1])),
            "shape": tuple(cai["shape"]),
            "strides": None if cai.get("strides") is None else tuple(cai["strides"]),
            "typestr": cai["typestr"],
            "version": 3,
        }


def _simulated_view(x):
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
    return FakeCUDAArray(np.asarray(_HostView(x)))


# --- validation from metadata ------------------------------------------------------

def device_float_array(x, name: str, *, ndim: int | None = None,
                       min_ndim: int | None = None, dtype=None):
    """``x`` as a C-contiguous float32/float64 device array (the GPU twin of
    ``_validation.as_float_array``: same checks, same messages).

    A GPU array is adopted without a copy when it is already C-contiguous and
    of ``dtype`` (``None``: its own float dtype); a host array is validated on
    the host and copied in.
    """
    if not is_device_array(x):
        host = v.as_float_array(x, name, ndim=ndim, min_ndim=min_ndim, dtype=dtype)
        return _cuda().to_device(host)
    arr = adopt(x)
    v.check_float_meta(arr.dtype, arr.shape, name, ndim=ndim, min_ndim=min_ndim)
    return kernel_layout(arr, np.dtype(arr.dtype if dtype is None else dtype))


def device_labels(labels, name: str, n_rows: int, n_classes: int, dtype):
    """``(kind, device array or None)`` like ``_validation.as_labels``.

    Host labels are fully validated on the host and copied in. For GPU labels
    only dtype and shape are checked here; their *values* (index range,
    non-negative rows summing to 1, finiteness) are checked by the kernel,
    which marks a bad row with a NaN loss, and :func:`host_copy` +
    ``_validation.as_labels`` then name the problem on the error path.
    """
    if labels is None:
        return "none", None
    if not is_device_array(labels):
        kind, host = v.as_labels(labels, name, n_rows, n_classes, dtype)
        return kind, _cuda().to_device(host)
    arr = adopt(labels)
    ldt = np.dtype(arr.dtype)
    shape = tuple(arr.shape)
    if ldt.kind in "iu":
        v.check_index_labels(arr, name, n_rows, "the logits")
        return "index", kernel_layout(arr, np.dtype(np.int64))
    if ldt in v.FLOAT_DTYPES:
        if shape != (n_rows, n_classes):
            raise ValueError(
                f"float {name} must be one-hot or soft targets of shape "
                f"({n_rows}, {n_classes}), got shape {shape}")
        return "dense", kernel_layout(arr, np.dtype(dtype))
    raise TypeError(
        f"{name} must be None, integer class indices (B,), or float32/float64 targets "
        f"(B, C); got dtype {ldt.name}")


# --- layout and dtype on the device ------------------------------------------------

def kernel_layout(arr, dtype):
    """``arr`` (a Numba device array) as C-contiguous ``dtype``: itself when it
    already is, else a new device array filled by one gather kernel."""
    dtype = np.dtype(dtype)
    if np.dtype(arr.dtype) == dtype and arr.is_c_contiguous():
        return arr
    from kdnumba.kernels.cuda import layout
    ndim = len(arr.shape)
    if ndim > layout.MAX_NDIM:
        raise ValueError(
            f"GPU arrays with {ndim} dimensions must be C-contiguous and of dtype "
            f"{dtype.name}; got strides {arr.strides} and dtype {np.dtype(arr.dtype).name}")
    dst = _cuda().device_array(tuple(arr.shape), dtype=dtype)
    layout.gather(arr, dst)
    return dst


# --- outputs -------------------------------------------------------------------------

def _extent(arr) -> tuple[int, int]:
    """``[lo, hi)`` byte addresses spanned by a device array."""
    iface = (arr.__cuda_array_interface__ if hasattr(arr, "__cuda_array_interface__")
             else arr.__array_interface__)  # the simulator's arrays are NumPy inside
    ptr = int(iface["data"][0])
    lo = hi = ptr
    for n, st in zip(arr.shape, arr.strides):
        if n > 1:
            if st < 0:
                lo += (n - 1) * st
            else:
                hi += (n - 1) * st
    return lo, hi + np.dtype(arr.dtype).itemsize


def _overlaps(a, b) -> bool:
    lo_a, hi_a = _extent(a)
    lo_b, hi_b = _extent(b)
    return lo_a < hi_b and lo_b < hi_a


def gradient_buffer(out, shape, dtype, *, on_device: bool, inputs=(), host_inputs=()):
    """The device array the kernel writes the gradient into.

    ``out=None``: a new device array. A GPU ``out`` (student on the GPU) is
    adopted and written in place; a NumPy ``out`` (student on the host) gets
    the gradient copied into it by :func:`deliver`. ``out`` must be
    C-contiguous, of the student's shape and dtype, and must not overlap any
    of ``inputs`` (device arrays) or ``host_inputs`` (the caller's host arrays).
    """
    cuda = _cuda()
    dtype = np.dtype(dtype)
    shape = tuple(shape)
    if out is None:
        return cuda.device_array(shape, dtype=dtype)
    if on_device:
        if not is_device_array(out):
            raise TypeError(
                "out must be a GPU array (the student lives on the GPU), "
                f"got {type(out).__name__}")
        dev = adopt(out)
        if (tuple(dev.shape) != shape or np.dtype(dev.dtype) != dtype
                or not dev.is_c_contiguous()):
            raise ValueError(
                f"out must be a C-contiguous {dtype.name} array of shape {shape}, "
                f"got {np.dtype(dev.dtype).name} {tuple(dev.shape)}")
        if any(x is not None and _overlaps(dev, x) for x in inputs):
            raise ValueError("out must not share memory with the inputs")
        return dev
    v.check_out(out, shape, dtype, host_inputs)
    return cuda.device_array(shape, dtype=dtype)


def deliver(grad, out, *, on_device: bool):
    """The gradient as the caller gets it: ``out`` itself when given, else the
    device array (student on the GPU) or a host copy (student on the host)."""
    if on_device:
        return grad if out is None else out
    if out is None:
        return grad.copy_to_host()
    grad.copy_to_host(out)
    return out


def host_copy(arr):
    """A NumPy copy of a kernel-ready device array (error paths only)."""
    return None if arr is None else arr.copy_to_host()


# --- the backend ---------------------------------------------------------------------

class CudaBackend:
    """Device arrays and ``numba.cuda`` kernels (``kdnumba.kernels.cuda``).

    ``on_device``: the student is a GPU array, so the gradient stays on the
    GPU; otherwise it is copied back into a NumPy array.
    """

    device = "cuda"

    def __init__(self, *, on_device: bool):
        self.on_device = on_device

    def kernels(self, family: str):
        """The CUDA kernel module of ``family`` (``kdnumba.kernels.cuda.<family>``)."""
        import importlib
        try:
            return importlib.import_module(f"kdnumba.kernels.cuda.{family}")
        except ModuleNotFoundError as exc:
            if exc.name != f"kdnumba.kernels.cuda.{family}":
                raise
            raise RuntimeError(f"no CUDA implementation of {family!r} yet") from exc

    # --- inputs ------------------------------------------------------------------------
    def float_array(self, x, name: str, *, ndim=None, min_ndim=None, dtype=None):
        return device_float_array(x, name, ndim=ndim, min_ndim=min_ndim, dtype=dtype)

    def labels(self, labels, name: str, n_rows: int, n_classes: int, dtype):
        return device_labels(labels, name, n_rows, n_classes, dtype)

    def host_object(self, x):
        """``x`` readable by NumPy: GPU arrays are copied back (small inputs only)."""
        return adopt(x).copy_to_host() if is_device_array(x) else x

    # --- outputs -----------------------------------------------------------------------
    def gradient_buffer(self, out, like, inputs=()):
        """A device array for the gradient: ``out`` adopted (GPU student), or a new
        one (``deliver`` copies it into a NumPy ``out``). ``inputs`` may mix
        kernel-side device arrays and the caller's host arrays."""
        device = tuple(adopt(x) for x in inputs if x is not None and is_device_array(x))
        host = tuple(x for x in inputs if isinstance(x, np.ndarray))
        return gradient_buffer(out, like.shape, like.dtype, on_device=self.on_device,
                               inputs=(like, *device), host_inputs=host)

    def empty(self, shape, dtype):
        return _cuda().device_array(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        return _cuda().to_device(np.zeros(shape, dtype=dtype))

    def placeholder(self, ndim: int, dtype):
        # One element, not zero: some drivers reject zero-size allocations.
        return _cuda().device_array((1,) * ndim, dtype=dtype)

    def to_device(self, host_array):
        return _cuda().to_device(np.ascontiguousarray(host_array))

    def to_host(self, arr):
        return None if arr is None else (arr.copy_to_host() if is_device_array(arr) else arr)

    def deliver(self, grad, out):
        return deliver(grad, out, on_device=self.on_device)

    # --- running and reducing ------------------------------------------------------------
    def launch(self, work: int | None = None):
        from contextlib import nullcontext
        return nullcontext()

    def total(self, partials) -> float:
        """Deterministic float64 sum of a device vector (one block, fixed order)."""
        from kdnumba.kernels.cuda import reduce
        return reduce.total(partials)

    def check_finite(self, value: float, named_arrays, what: str = "the loss") -> None:
        if not np.isfinite(value):
            v.raise_non_finite([(name, self.to_host(arr)) for name, arr in named_arrays], what)
