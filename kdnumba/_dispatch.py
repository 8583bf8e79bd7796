"""Choose where a computation runs: the backend of one call.

``device`` is one of ``"cpu"``, ``"cuda"``, ``"auto"``. ``"auto"`` picks CUDA
when any input exposes ``__cuda_array_interface__`` (Numba device arrays, CuPy,
PyTorch CUDA tensors), else CPU. :func:`backend` returns the object a
functional body runs on (:class:`kdnumba._backend_host.HostBackend` or
:class:`kdnumba._backend_cuda.CudaBackend`, one interface); kernel families
are modules named alike under ``kdnumba.kernels.cpu`` and
``kdnumba.kernels.cuda``. CUDA modules are imported only when a CUDA
computation is requested, so the CPU path never imports ``numba.cuda``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import numpy as np

from kdnumba._backend_host import HOST

DEVICES = ("cpu", "cuda", "auto")


def check_device(device) -> str:
    """Validate a ``device`` argument (``ValueError`` lists the valid ones)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    return device


def is_cuda_array(x) -> bool:
    """True for objects that live on a CUDA device."""
    return (hasattr(x, "__cuda_array_interface__")
            or getattr(x, "__cuda_ndarray__", False) is True)  # Numba (incl. simulator) arrays


def resolve_device(device: str, *arrays) -> str:
    """The concrete device (``"cpu"`` or ``"cuda"``) for these inputs."""
    check_device(device)
    if device == "auto":
        return "cuda" if any(is_cuda_array(a) for a in arrays if a is not None) else "cpu"
    return device


def cuda_unavailable_reason() -> str | None:
    """Why CUDA cannot be used here, or ``None`` if it can."""
    try:
        from numba import cuda
    except ImportError:
        return ("device='cuda' needs the numba-cuda package: pip install 'kdnumba[cuda]'")
    try:
        if not cuda.is_available():
            return "device='cuda' was requested but no usable CUDA GPU/driver was found"
    except Exception as exc:  # pragma: no cover - driver-specific failures
        return f"device='cuda' was requested but CUDA failed to initialise: {exc}"
    return _cuda_toolchain_problem()


def _cuda_toolchain_problem() -> str | None:
    """Why numba-cuda cannot compile here although a GPU is usable, or ``None``.

    Seen on the H200 machine of 2026-12-04: numba-cuda 0.30.4 registers
    ``np.row_stack``, which NumPy 2.5 removed, so its first kernel compile
    died with a bare ``AttributeError``. Importing the module that does it
    (what the first compile does anyway) turns that into a message that says
    what to change.
    """
    try:
        import numba_cuda
    except ImportError:  # Numba's built-in CUDA target
        return None
    try:
        importlib.import_module("numba.cuda.np.arrayobj")
    except AttributeError as exc:
        version = getattr(numba_cuda, "__version__", "?")
        return (f"device='cuda' was requested but numba-cuda {version} cannot compile "
                f"with NumPy {np.__version__} ({exc}); install a NumPy release that "
                f"numba-cuda {version} supports (e.g. numpy<2.5) or a newer numba-cuda")
    return None


def kernels(family: str, device: str) -> ModuleType:
    """The kernel module implementing ``family`` on ``device``."""
    if device == "cpu":
        return importlib.import_module(f"kdnumba.kernels.cpu.{family}")
    if device == "cuda":
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        try:
            return importlib.import_module(f"kdnumba.kernels.cuda.{family}")
        except ModuleNotFoundError as exc:
            raise RuntimeError(f"no CUDA implementation of {family!r} yet") from exc
    raise ValueError(f"device must be 'cpu' or 'cuda' here, got {device!r}")


_HOST_TYPES = (np.ndarray, type(None))


def _all_host(arrays) -> bool:
    """Whether every one of ``arrays`` is ``None`` or an exact ``np.ndarray``
    (never a device array): the common case, answered by type identity."""
    for a in arrays:
        if type(a) not in _HOST_TYPES:
            return False
    return True


def backend(device: str, *arrays):
    """The backend one call runs on, for its ``device`` argument and its array
    arguments (student first: a GPU student gets its gradient on the GPU).

    ``"cuda"`` without a usable GPU raises ``RuntimeError`` saying why, before
    anything is copied.
    """
    if type(device) is str and (device == "cpu" or (device == "auto" and _all_host(arrays))):
        return HOST
    if resolve_device(device, *arrays) == "cpu":
        return HOST
    reason = cuda_unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    from kdnumba._backend_cuda import CudaBackend  # imports numba.cuda lazily
    return CudaBackend(on_device=is_cuda_array(arrays[0]))
