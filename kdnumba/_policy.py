"""The one place that decides how kdnumba compiles and runs its Numba kernels.

Every CPU kernel is built with :func:`jit` (serial) or :func:`parallel_jit`
(``prange`` loops), and every helper that only kernels call with
:func:`callee` (no Python wrappers). Reading this file tells you the whole compilation policy:

* ``cache=True`` -- compiled machine code is stored on disk, so the 0.3-0.8 s
  first-call compile is paid once per machine, not once per process. Unlike
  ``numba.njit(cache=True)``, where the cache goes is decided at the first
  compile, not at import, and caching can never make kdnumba fail (see
  "Caching" below and ``docs/reliability.md``).
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

Caching
-------
A kernel's cache is looked up, at its first compile, in these directories
(each with Numba's own file names, so caches are interchangeable with
``numba.njit(cache=True)``):

1. ``$KDNUMBA_CACHE_DIR/<package dir>_<hash>/``
2. ``$NUMBA_CACHE_DIR/<package dir>_<hash>/``
3. ``__pycache__/`` next to the kernel's module
4. Numba's user-wide cache (``~/.cache/numba/...``)

Compiled code is *saved* to the first of them that is writable, and *loaded*
from the first one, up to that one, that holds it: a warm cache that is not
writable (a read-only install, a shared NUMBA_CACHE_DIR) is used, not ignored,
and setting KDNUMBA_CACHE_DIR to a writable directory fills that directory. When none is writable, or saving fails, kernels
are compiled in memory and one :class:`KdnumbaCacheWarning` per process says
how to enable caching. Saves are serialised across processes by a lock file in
the cache directory, the data file is written before the index that points to
it, and a loaded entry is checked against the signature asked for, so two
processes filling one cache at once both get correct kernels.

Threading layer and fork
------------------------
Numba's ``omp`` layer with GNU OpenMP kills a ``fork``ed child
("fork() called from a process already using GNU OpenMP") once the parent ran
a parallel kernel. Unless the user chose a layer (``NUMBA_THREADING_LAYER``,
``NUMBA_THREADING_LAYER_PRIORITY``, ``.numba_config.yaml`` or
``numba.config``), kdnumba therefore makes Numba prefer the fork-safe layers:
``tbb``, then ``workqueue``, then ``omp`` (measured no slower than ``omp``
for kd_loss and selectivity_loss; see ``docs/reliability.md``). If the ``omp``
layer is active anyway (chosen by the user, or started by another library
before kdnumba), a kernel launched in a forked child raises a
:class:`RuntimeError` that explains the fix instead of being killed.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import tempfile
import threading
import warnings

import numba
from numba.core import caching as _caching
from numba.core import compiler as _compiler
from numba.core import config as _config
from numba.core import sigutils as _sigutils
from numba.core.runtime import nrt as _nrt
from numba.core.dispatcher import Dispatcher as _Dispatcher
from numba.misc.appdirs import AppDirs as _AppDirs
from numba.np.ufunc import parallel as _parallel

FASTMATH_FLAGS = frozenset({"nsz", "arcp", "contract", "afn"})

_COMMON = dict(
    cache=True,
    fastmath=set(FASTMATH_FLAGS),
    error_model="numpy",
    nogil=True,
    boundscheck=False,
)


def jit(fn=None, **overrides):
    """Serial kernel: ``numba.njit`` with kdnumba's policy.

    ``cache=True`` (the default) attaches kdnumba's own disk cache
    (:class:`_KernelCache`) instead of Numba's, which would pick its directory
    at import time and raise there when none is writable.
    """
    options = {**_COMMON, **overrides}
    cache = options.pop("cache", False)
    parallel = bool(options.get("parallel", False))

    def compiled(f, opts, variant=""):
        dispatcher = numba.njit(**opts)(f)
        if cache and isinstance(dispatcher, _Dispatcher):  # not NUMBA_DISABLE_JIT
            dispatcher._cache = _KernelCache(f, parallel=opts.get("parallel", False),
                                             variant=variant)
        return dispatcher

    def build(f):
        if not parallel:
            return compiled(f, options)
        serial_options = {**options, "parallel": False}
        return ParallelKernel(compiled(f, options),
                              lambda: compiled(f, serial_options, variant="serial"))

    if fn is None:
        return build
    return build(fn)


def callee(fn=None, **overrides):
    """Helper kernel called only from other kernels: :func:`jit` without the
    CPython and cfunc wrappers.

    Numba builds those wrappers at every compile, whoever the caller; for a
    helper they are dead code that still passes through LLVM (issue 16; the
    saving measured on a first call was within the noise of a 2-core VM).
    Never call one from Python: without its wrapper, the call crashes the
    interpreter. ``tests/test_architecture.py`` checks that no
    Python code outside a kernel names one.
    """
    return jit(fn, no_cpython_wrapper=True, no_cfunc_wrapper=True, **overrides)


def parallel_jit(fn=None, **overrides):
    """Parallel kernel (``prange`` loops): :func:`jit` plus ``parallel=True``.

    Returns a :class:`ParallelKernel`: inside ``kernel_launch(work)`` with
    ``work`` below :data:`SERIAL_BELOW` it runs a serial build of the same
    function, which never touches the threading layer.
    """
    return jit(fn, parallel=True, **overrides)


def _once(owner, attribute: str, lock, build):
    """``owner.attribute``, set to ``build()`` by the first caller (thread-safe:
    double-checked under ``lock``, so concurrent first calls build once)."""
    value = getattr(owner, attribute)
    if value is None:
        with lock:
            value = getattr(owner, attribute)
            if value is None:
                value = build()
                setattr(owner, attribute, value)
    return value


class ParallelKernel:
    """A ``prange`` kernel with a serial twin for small calls.

    Waking a thread pool costs more than a small kernel's work: on the
    ``workqueue`` layer (kdnumba's fork-safe default) a 256x10 ``kd_loss`` took
    about 200 us through the parallel build even on one thread, against about
    10 us for the serial build of the same code. :func:`kernel_launch` marks
    small launches on the calling thread; calls made then go to the serial
    build, compiled (and cached, under its own file name) on first use.
    Everything else -- ``signatures``, ``compile``, ``py_func``... -- is the
    parallel dispatcher's. Both builds compute each row with the same code in
    the same order; a given input size always takes the same build, so results
    stay the same run to run and for any thread count.
    """

    def __init__(self, parallel_dispatcher, build_serial):
        self.parallel = parallel_dispatcher
        self._build_serial = build_serial
        self._serial = None
        self._serial_lock = threading.Lock()
        functools.update_wrapper(self, parallel_dispatcher.py_func)

    @property
    def serial(self):
        """The serial build (built on first use)."""
        return _once(self, "_serial", self._serial_lock, self._build_serial)

    @property
    def builds(self) -> tuple:
        """The dispatchers built so far: the parallel one, and the serial one once used."""
        return (self.parallel,) if self._serial is None else (self.parallel, self._serial)

    def __call__(self, *args):
        if _launch_state.serial:
            serial = self._serial
            return (serial if serial is not None else self.serial)(*args)
        return self.parallel(*args)

    def __getattr__(self, name):
        return getattr(self.parallel, name)

    def __repr__(self):
        return f"<ParallelKernel {self.parallel.py_func.__qualname__}>"


# --- caching -----------------------------------------------------------------

#: Environment variable naming kdnumba's cache directory (before NUMBA_CACHE_DIR).
CACHE_DIR_ENV = "KDNUMBA_CACHE_DIR"


class KdnumbaCacheWarning(UserWarning):
    """Compiled kernels cannot be stored on disk; they are compiled in memory."""


_warned_no_cache = False
_warn_lock = threading.Lock()


def _warn_no_cache(reason: str) -> None:
    """Say once per process that kernels are not cached, and how to fix it."""
    global _warned_no_cache
    with _warn_lock:
        if _warned_no_cache:
            return
        _warned_no_cache = True
    warnings.warn(
        f"kdnumba cannot cache its compiled kernels ({reason}); they are compiled "
        f"in memory, which costs 0.3-0.8 s per kernel in every process. To cache "
        f"them, set {CACHE_DIR_ENV} (or NUMBA_CACHE_DIR) to a writable directory.",
        KdnumbaCacheWarning,
        stacklevel=2,
    )


@functools.lru_cache(maxsize=None)
def _writable_dir(path: str) -> bool:
    """Whether ``path`` exists or can be created, and a file can be written in it.

    Tested by writing, like Numba's locators: ``os.access`` says yes for root on
    a read-only tree and cannot see read-only mounts' quirks.
    """
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


def _cache_dirs(py_file: str) -> list[str]:
    """Candidate cache directories for a kernel defined in ``py_file``, best first."""
    subpath = _caching._CacheLocator.get_suitable_cache_subpath(py_file)
    dirs = []
    for root in (os.environ.get(CACHE_DIR_ENV), _config.CACHE_DIR):
        if root:
            dirs.append(os.path.join(os.path.abspath(os.path.expanduser(root)), subpath))
    dirs.append(os.path.join(os.path.dirname(os.path.abspath(py_file)), "__pycache__"))
    user_wide = _AppDirs(appname="numba", appauthor=False).user_cache_dir
    dirs.append(os.path.join(user_wide, subpath))
    return list(dict.fromkeys(dirs))  # keep order, drop repeats


class _CacheFile(_caching.IndexDataCacheFile):
    """Numba's index + data files, saved safely when processes race.

    Saves of one directory are serialised by ``flock`` on a lock file, and the
    data file is written before the index entry that points to it, so a reader
    never follows an index entry to a file that is missing or belongs to
    another signature.
    """

    _LOCK_NAME = ".kdnumba-cache.lock"

    @contextlib.contextmanager
    def _locked(self):
        try:
            import fcntl
        except ImportError:  # Windows: os.replace keeps each file whole
            yield
            return
        fd = os.open(os.path.join(self._cache_path, self._LOCK_NAME),
                     os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def save(self, key, data):
        with self._locked():
            overloads = self._load_index()
            data_name = overloads.get(key)
            if data_name is None:
                used = set(overloads.values())
                number = 1
                while self._data_name(number) in used:
                    number += 1
                data_name = self._data_name(number)
            self._save_data(data_name, data)
            if overloads.get(key) != data_name:
                overloads[key] = data_name
                self._save_index(overloads)


class _KernelCache(_caching._Cache):
    """A dispatcher's disk cache whose directories are chosen at first compile.

    Loads from every candidate directory that exists (writable or not), saves
    to the first writable one, and never raises: a failed load is a miss, a
    failed save is one :class:`KdnumbaCacheWarning` per process.
    """

    def __init__(self, py_func, parallel: bool = False, variant: str = ""):
        self._py_func = py_func
        self._parallel = parallel
        self._py_file = inspect.getfile(py_func)
        qualname = getattr(py_func, "__qualname__", py_func.__name__)
        if variant:  # another build of the same function: its own cache files
            qualname = f"{qualname}.{variant}"
        modname = os.path.splitext(os.path.basename(self._py_file))[0]
        fullname = f"{modname}.{qualname}".replace("<", "").replace(">", "")
        # Numba's own file names (CacheImpl.get_filename_base).
        self._filename_base = "%s-%s.py%d%d%s" % (
            fullname, py_func.__code__.co_firstlineno,
            sys.version_info[0], sys.version_info[1], getattr(sys, "abiflags", ""))
        self._resolved = None  # (read files, write file or None), at first use
        self._resolve_lock = threading.Lock()
        self._enabled = True

    def __repr__(self):
        return f"<{type(self).__name__} py_func={self._py_func!r}>"

    def _files(self):
        return _once(self, "_resolved", self._resolve_lock, self._resolve)

    def _resolve(self):
        _config.reload_config()  # NUMBA_CACHE_DIR as the environment says now
        try:
            st = os.stat(self._py_file)
        except OSError:  # source not on disk (frozen app, zip): memory only
            return [], None
        stamp = _caching._hash_source_file(self._py_file, st.st_mtime, st.st_size)
        dirs = _cache_dirs(self._py_file)
        write = next((d for d in dirs if _writable_dir(d)), None)
        if write is not None:  # directories after the one we write to are not read
            dirs = dirs[:dirs.index(write) + 1]
        files = {d: _CacheFile(d, self._filename_base, stamp)
                 for d in dirs if d == write or os.path.isdir(d)}
        return list(files.values()), files.get(write)

    @property
    def cache_path(self):
        read, write = self._files()
        if write is not None:
            return write._cache_path
        return read[0]._cache_path if read else None

    def enable(self):
        self._enabled = True

    def disable(self):
        self._enabled = False

    def flush(self):
        write = self._files()[1]
        if write is not None:
            with contextlib.suppress(OSError):
                write.flush()

    def _index_key(self, sig, codegen):
        # Numba's key: signature, CPU, bytecode and closure hashes.
        return _caching.Cache._index_key(self, sig, codegen)

    def load_overload(self, sig, target_context):
        if self._parallel:
            start_threading_layer()
        # Machine code loaded from disk needs only Numba's runtime (NRT: the
        # allocator np.empty calls) set up; Numba's own Cache calls
        # target_context.refresh() here, which imports and installs every
        # typing and lowering registry (numba.np.arraymath imports
        # scipy.linalg when SciPy is installed): 0.2-0.5 s of a cached first
        # call, measured, for nothing the loaded code uses. A compile, in
        # this process, still refreshes first (numba.core.compiler does).
        _nrt.rtsys.initialize(target_context)
        if not self._enabled:
            return None
        key = self._index_key(sig, target_context.codegen())
        args = tuple(_sigutils.normalize_signature(sig)[0])
        for cache_file in self._files()[0]:
            try:
                payload = cache_file.load(key)
                if payload is None or tuple(payload[3].args) != args:
                    continue
                return _compiler.CompileResult._rebuild(target_context, *payload)
            except Exception as exc:  # unreadable or corrupt entry: a miss
                _caching._cache_log("[cache] kdnumba: cannot load from %r: %r",
                                    cache_file._cache_path, exc)
        return None

    def save_overload(self, sig, data):
        if not self._enabled:
            return
        write = self._files()[1]
        if write is None:
            _warn_no_cache("no writable cache directory")
            return
        if not self._cachable(data):
            return
        try:
            key = self._index_key(sig, data.codegen)
            write.save(key, data._reduce())
        except Exception as exc:  # full disk, directory made read-only, ...
            _warn_no_cache(f"saving to {write._cache_path} failed: {exc}")

    def _cachable(self, cres) -> bool:
        # As CompileResultCacheImpl.check_cachable (kdnumba kernels always are).
        if any(not x.can_cache for x in cres.lifted) or cres.library.has_dynamic_globals:
            warnings.warn(f"kdnumba kernel {self._py_func.__qualname__!r} cannot be "
                          f"cached (lifted code or dynamic globals)", KdnumbaCacheWarning)
            return False
        return True


# --- threading ---------------------------------------------------------------
# Layer choice. Numba picks its threading layer once per process, at the first
# parallel kernel, from config.THREADING_LAYER / THREADING_LAYER_PRIORITY
# (default: tbb, omp, workqueue). We put workqueue before omp unless the user
# chose, and start the layer ourselves before the first parallel kernel runs,
# so that a later reload of Numba's config cannot undo the choice.
FORK_SAFE_PRIORITY = ("tbb", "workqueue", "omp")
_NUMBA_DEFAULT_PRIORITY = ("tbb", "omp", "workqueue")
_LAYER_ENV = ("NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY")


def user_chose_threading_layer() -> bool:
    """Whether the user, not kdnumba, decides Numba's threading layer."""
    if any(name in os.environ for name in _LAYER_ENV):
        return True
    if str(_config.THREADING_LAYER).lower() != "default":
        return True
    return tuple(_config.THREADING_LAYER_PRIORITY) not in (
        _NUMBA_DEFAULT_PRIORITY, FORK_SAFE_PRIORITY)


def _prefer_fork_safe_layer() -> None:
    if _parallel._is_initialized or user_chose_threading_layer():
        return
    _config.THREADING_LAYER_PRIORITY = list(FORK_SAFE_PRIORITY)


_layer_started = False
_layer_lock = threading.Lock()


def start_threading_layer() -> str:
    """Start Numba's threading layer now (fork-safe first, see above); return its name."""
    global _layer_started
    if not _layer_started:
        with _layer_lock:
            if not _parallel._is_initialized:
                _config.reload_config()  # so the compiler's own reload keeps ours
                _prefer_fork_safe_layer()
                _parallel._launch_threads()
            _layer_started = True
    return _parallel._threading_layer


_prefer_fork_safe_layer()  # at import, before any parallel kernel can run

# Fork. A child forked after the parent started the ``omp`` layer (GNU
# OpenMP) would be killed by Numba at its first parallel kernel; kernel_launch
# raises this error there instead.
_FORKED_FROM_OMP_MESSAGE = (
    "kdnumba: this process was forked from one that had already used Numba's 'omp' "
    "threading layer (GNU OpenMP), which cannot run parallel kernels after fork(); "
    "Numba would kill the process. Fix: use multiprocessing's 'spawn' or 'forkserver' "
    "start method, or let kdnumba choose a fork-safe layer (unset "
    "NUMBA_THREADING_LAYER / NUMBA_THREADING_LAYER_PRIORITY, or set "
    "NUMBA_THREADING_LAYER=workqueue or tbb) in the parent before any kernel runs.")
_forked_from_omp = False


def _gnu_openmp_layer_active() -> bool:
    if not _parallel._is_initialized or _parallel._threading_layer != "omp":
        return False
    try:
        from numba.np.ufunc import omppool
    except ImportError:
        return True
    return getattr(omppool, "openmp_vendor", "GNU") == "GNU"


def _after_fork_in_child() -> None:
    # Locks held by other threads of the parent at fork() stay held forever in
    # the child: replace ours. Then note whether the child may use the pool.
    global _launch_lock, _warn_lock, _layer_lock, _forked_from_omp
    _launch_lock = threading.Lock()
    _warn_lock = threading.Lock()
    _layer_lock = threading.Lock()
    _forked_from_omp = _forked_from_omp or _gnu_openmp_layer_active()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# Thread safety. The ``workqueue`` layer aborts the process if two Python
# threads launch parallel kernels at the same time. The ``omp`` and ``tbb``
# layers are thread-safe. We therefore serialise kernel launches only when the
# active layer is ``workqueue``.
_THREAD_SAFE_LAYERS = frozenset({"omp", "tbb"})
_launch_lock = threading.Lock()


def _active_threading_layer() -> str | None:
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return None


#: Below this much work (elements, in units of ``kd_loss``'s ~1.5 ns per
#: element and thread) a parallel kernel runs on the calling thread only:
#: waking the pool costs more than the work. On the ``workqueue`` layer a
#: trivial parallel launch costs 34 us at best and 90 us typically (``omp``:
#: 2 us), measured on the 2-core Zen 3 VM; two threads halve the work, so
#: the serial build wins up to ~100-200 us of work: ``rkd_loss`` at 32 x 10
#: took 372-398 us through the parallel angle kernel and 182 us serial, at
#: 48 x 64 1032 us against 539-653 us (issue 16). Was 1 << 15 (a 32x10
#: kd_loss took 23 us on 1 thread and up to 3.5 ms on 2 threads of a busy
#: machine through the parallel build).
SERIAL_BELOW = 1 << 17


class _LaunchState(threading.local):
    """Per Python thread: whether kernels launched now run their serial build
    (a class attribute default, so reading it never needs ``getattr``)."""

    serial = False


_launch_state = _LaunchState()


class kernel_launch:  # lower case: used like a function, ``with kernel_launch(work):``
    """Context for launching a parallel kernel safely from any Python thread.

    ``work`` (element count) below :data:`SERIAL_BELOW` runs the kernel on one
    thread. Numba's thread count is per calling thread, so this never affects
    other threads, and kdnumba kernels give the same bits for any count.

    Starts the threading layer (fork-safe first) on first use, and raises
    :class:`RuntimeError` in a child forked from a process that used the GNU
    OpenMP layer, where Numba would kill the process.

    A class rather than a ``contextmanager`` generator: a small call enters
    one per kernel, and a generator context costs about a microsecond more
    (issue #16).
    """

    __slots__ = ("serial", "outer", "lock")

    def __init__(self, work: int | None = None):
        self.serial = work is not None and work < SERIAL_BELOW
        self.lock = None

    def __enter__(self):
        if _forked_from_omp:
            raise RuntimeError(_FORKED_FROM_OMP_MESSAGE)
        if self.serial:
            # Serial builds (ParallelKernel.serial): no pool, no lock needed.
            self.outer = _launch_state.serial
            _launch_state.serial = True
            return None
        start_threading_layer()
        if _active_threading_layer() not in _THREAD_SAFE_LAYERS:
            lock = _launch_lock  # the current one (a forked child replaces it)
            lock.acquire()
            self.lock = lock
        self.outer = _launch_state.serial
        _launch_state.serial = False
        return None

    def __exit__(self, *exc_info):
        _launch_state.serial = self.outer
        lock = self.lock
        if lock is not None:
            self.lock = None
            lock.release()
        return False
