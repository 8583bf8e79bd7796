"""The one place that decides how kdnumba compiles its Numba kernels.

Every CPU kernel is built with :func:`jit` (serial) or :func:`parallel_jit`
(``prange`` loops). Reading this file tells you the whole compilation policy:

* ``cache=True`` -- compiled machine code is stored on disk next to the module
  (or in ``NUMBA_CACHE_DIR``), so the 0.3-0.8 s first-call compile is paid once
  per machine, not once per process.
* ``fastmath=FASTMATH_FLAGS`` -- a *subset* of LLVM's fast-math flags:
  contraction (FMA), reciprocal and approximate-function rewrites, and
  ignoring the sign of zero. We do **not** allow ``nnan``/``ninf`` (LLVM may
  then delete NaN checks and mis-handle a log-sum-exp over ``-inf``), nor
  ``reassoc``: with it, a kernel freshly compiled and the same kernel loaded
  from the disk cache were measured to round sums differently, and it lets
  LLVM undo the split-ln2 range reduction of ``fastexp`` (30-200 ulp errors).
  Kernels that need a fast long sum write it with explicit lanes
  (``kernels/cpu/reductions.lane_sum``), which vectorise with a fixed order.
* ``error_model="numpy"`` -- division by zero gives inf/nan like NumPy instead
  of raising (and, importantly, lets LLVM vectorise divisions).
* ``nogil=True`` -- kernels release the GIL, so several Python threads can run
  them at once.
* ``boundscheck=False`` -- inputs are validated before any kernel is called.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import numba

FASTMATH_FLAGS = frozenset({"nsz", "arcp", "contract", "afn"})

_COMMON = dict(
    cache=True,
    fastmath=set(FASTMATH_FLAGS),
    error_model="numpy",
    nogil=True,
    boundscheck=False,
)


def jit(fn=None, **overrides):
    """Serial kernel: ``numba.njit`` with kdnumba's policy."""
    options = {**_COMMON, **overrides}
    if fn is None:
        return lambda f: numba.njit(**options)(f)
    return numba.njit(**options)(fn)


def parallel_jit(fn=None, **overrides):
    """Parallel kernel (``prange`` loops): :func:`jit` plus ``parallel=True``."""
    return jit(fn, parallel=True, **overrides)


# --- threading ---------------------------------------------------------------
# The ``workqueue`` threading layer (used when neither OpenMP nor TBB can be
# loaded) aborts the process if two Python threads launch parallel kernels at
# the same time. The ``omp`` and ``tbb`` layers are thread-safe. We therefore
# serialise kernel launches only when the active layer is ``workqueue`` (or not
# yet known, i.e. the very first launch).
_THREAD_SAFE_LAYERS = frozenset({"omp", "tbb"})
_launch_lock = threading.Lock()


def _active_threading_layer() -> str | None:
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return None


#: Below this many elements a parallel kernel runs on the calling thread only:
#: waking the pool costs more than the work (measured: a 32x10 kd_loss took
#: 23 us on 1 thread and up to 3.5 ms on 2 threads of a busy machine).
SERIAL_BELOW = 1 << 15


@contextmanager
def kernel_launch(work: int | None = None):
    """Context for launching a parallel kernel safely from any Python thread.

    ``work`` (element count) below :data:`SERIAL_BELOW` runs the kernel on one
    thread. Numba's thread count is per calling thread, so this never affects
    other threads, and kdnumba kernels give the same bits for any count.
    """
    serial = work is not None and work < SERIAL_BELOW
    previous = numba.get_num_threads()
    if serial and previous != 1:
        numba.set_num_threads(1)
    try:
        if _active_threading_layer() in _THREAD_SAFE_LAYERS:
            yield
        else:
            with _launch_lock:
                yield
    finally:
        if serial and previous != 1:
            numba.set_num_threads(previous)

