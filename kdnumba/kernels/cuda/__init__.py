"""CUDA kernels (``numba.cuda``), one family per module, mirroring ``kernels.cpu``.

Importing this package imports ``numba.cuda``; only :mod:`kdnumba._dispatch`
does so, and only when a CUDA computation is requested.

The policy every CUDA kernel here follows (the GPU counterpart of
:mod:`kdnumba._policy`):

* **Explicit signatures, compiled on first use.** Each kernel is a plain
  Python function compiled by :func:`compile_kernel` with one explicit
  ``numba.cuda`` signature per float dtype (``float32``/``float64``, C-contiguous
  arrays), the first time that dtype is launched. Nothing compiles at import,
  and a float32 launch never silently runs a float64 specialisation.
  ``cache=True`` keeps the compiled kernels on disk like the CPU ones.
* **No fast-math.** ``numba.cuda``'s ``fastmath=True`` grants LLVM ``nnan``/``ninf``,
  which would delete the NaN propagation the callers rely on to detect bad
  input (see :mod:`kdnumba._policy`). The kernels are memory-bound anyway.
* **Deterministic.** A row (or column block) is reduced by one thread block:
  every thread accumulates a float64 partial over a fixed strided set of
  elements, then the block combines the partials with a shared-memory tree
  whose shape depends only on the block size, which depends only on the
  problem shape. No atomics: the same inputs give the same bits every run.
* **Power-of-two blocks** chosen by :func:`block_size` from the row length.
  Under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) blocks are capped at
  :data:`SIMULATOR_MAX_BLOCK` threads, because the simulator runs every
  thread as a Python thread.
"""

from __future__ import annotations

import numpy as np
from numba import cuda
from numba.core import config

#: Largest block the kernels use on a GPU (512 threads x 6 float64 partials
#: = 24 KiB of shared memory, well under the 48 KiB a block gets by default).
MAX_BLOCK = 512

#: Block sizes under the simulator (a 32-thread block takes ~0.1-0.4 s).
SIMULATOR_MIN_BLOCK = 8
SIMULATOR_MAX_BLOCK = 32

#: Largest grid (blocks) under the simulator: kernels loop over their rows with
#: a grid stride, so two blocks still exercise the multi-block logic.
SIMULATOR_MAX_GRID = 2

#: Elements each thread should own before the block grows: enough loads in
#: flight per thread to saturate memory without leaving threads idle.
ITEMS_PER_THREAD = 16

#: Most blocks of an :func:`item_launch` (kernels grid-stride beyond it).
MAX_ITEM_BLOCKS = 65535

_FLOAT_TYPES = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}


def is_simulator() -> bool:
    """True when ``numba.cuda`` is the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``)."""
    return bool(config.ENABLE_CUDASIM)


def shared_alignment_supported() -> bool:
    """True when ``cuda.shared.array`` takes an ``alignment=`` argument: the
    numba-cuda package (>= 0.20) on a GPU. Numba's built-in CUDA target rejects
    the keyword and the simulator accepts only ``None``."""
    if is_simulator():
        return False
    try:
        import numba_cuda  # noqa: F401  (its presence redirects numba.cuda)
    except ImportError:
        return False
    return True


def block_size(n_items: int, items_per_thread: int = ITEMS_PER_THREAD) -> int:
    """Threads per block for ``n_items`` elements per block: a power of two in
    ``[32, MAX_BLOCK]`` (``[SIMULATOR_MIN_BLOCK, SIMULATOR_MAX_BLOCK]`` under the
    simulator, where each thread is a Python thread and each barrier costs)."""
    if is_simulator():
        size, cap = SIMULATOR_MIN_BLOCK, SIMULATOR_MAX_BLOCK
    else:
        size, cap = 32, MAX_BLOCK
    want = -(-n_items // items_per_thread)
    while size < want and size < cap:
        size *= 2
    return size


def grid_size(n_blocks: int) -> int:
    """Blocks to launch for ``n_blocks`` units of work (rows...) handled with a
    grid-stride loop: all of them on a GPU, at most :data:`SIMULATOR_MAX_GRID`
    under the simulator (where every block costs Python threads)."""
    n_blocks = max(1, int(n_blocks))
    return min(n_blocks, SIMULATOR_MAX_GRID) if is_simulator() else n_blocks


def item_launch(n_items: int, max_blocks: int = MAX_ITEM_BLOCKS) -> tuple[int, int]:
    """``(blocks, threads)`` for a kernel that gives each of ``n_items`` items
    to one thread and grid-strides over them: one item per thread, at most
    ``max_blocks`` blocks (the stride covers the rest). No thread combines
    items, so the results do not depend on the grid."""
    threads = block_size(n_items, items_per_thread=1)
    return grid_size(min(-(-n_items // threads), max_blocks)), threads


def float_name(dtype) -> str:
    """``"float32"``/``"float64"`` for a kernel dtype (``KeyError`` otherwise)."""
    return _FLOAT_TYPES[np.dtype(dtype)]


_COMPILED: dict = {}


def compile_kernel(pyfunc, signature: str, dtype=None):
    """``cuda.jit(signature)(pyfunc)``, compiled once per process and signature.

    ``signature`` is a Numba signature string. A kernel with one
    specialisation per float dtype writes it with ``{F}`` for the float type
    and passes ``dtype`` (the arrays' float32/float64 dtype) to fill it in.
    """
    if dtype is not None:
        signature = signature.format(F=float_name(dtype))
    key = (pyfunc, signature)
    kernel = _COMPILED.get(key)
    if kernel is None:
        kernel = cuda.jit(signature, cache=not is_simulator())(pyfunc)
        _COMPILED[key] = kernel
    return kernel


def _tree_sum(sh, n_quantities, tid, n_threads):
    """Sum ``n_quantities`` shared-memory rows of ``n_threads`` partials each.

    ``sh[q * n_threads + k]`` holds thread ``k``'s partial of quantity ``q``;
    afterwards ``sh[q * n_threads]`` holds the total. A halving tree: the
    order of additions depends only on ``n_threads`` (a power of two), so the
    result is deterministic. Every thread of the block must call it.
    """
    stride = n_threads // 2
    while stride > 0:
        if tid < stride:
            for q in range(n_quantities):
                sh[q * n_threads + tid] += sh[q * n_threads + tid + stride]
        cuda.syncthreads()
        stride //= 2


def _tree_max(sh, n_quantities, tid, n_threads):
    """Like :func:`_tree_sum` with ``max``; a NaN partial wins (it must reach
    the caller, who detects bad input from it)."""
    stride = n_threads // 2
    while stride > 0:
        if tid < stride:
            for q in range(n_quantities):
                a = sh[q * n_threads + tid]
                b = sh[q * n_threads + tid + stride]
                if (b > a or b != b) and a == a:
                    sh[q * n_threads + tid] = b
        cuda.syncthreads()
        stride //= 2


def block_reductions(module_globals: dict):
    """``(tree_sum, tree_max)`` block-wide reductions as device functions whose
    Python code runs in the calling kernel module's namespace.

    Pass ``globals()``. Why not one shared pair: the CUDA simulator rebinds the
    ``cuda`` global of a device function's *module* on every call and restores
    it on exit; a helper living in another module than the kernel would have
    ``cuda`` restored under the feet of the block's other threads. Bound to the
    kernel's own module, whose ``cuda`` the simulator swaps once per launch,
    they are safe. On a GPU this changes nothing.
    """
    import types as pytypes

    def bind(py):
        return cuda.jit(device=True)(
            pytypes.FunctionType(py.__code__, module_globals, py.__name__))

    return bind(_tree_sum), bind(_tree_max)
