"""Per-call overhead of small calls (issue #16): the Python side of a loss.

    python3 bench/small_calls.py [--losses kd_loss,nt_xent] [--dtype float32]
                                 [--threads 1] [--rounds 100] [--profile LOSS:SIZE]

For each loss and size (``B*C`` = 320, 1k, 4k, 16k, 32k) it prints:

* ``call``: the public function (``kdnumba.functional.<loss>``), arguments
  already NumPy arrays of the right dtype (the common case);
* ``kernel``: every Numba dispatcher that call runs (kernels, and the ordered
  sums of their partials) and every BLAS product (``np.matmul``, the
  contrastive kernels'), replayed back to back with the same arguments and
  the same builds (the serial twin of a ``ParallelKernel`` where the call used
  it) -- compiled work plus Numba's own argument typing, nothing of kdnumba's
  Python;
* ``overhead`` = call - kernel: validation, dispatch, allocation, launch
  contexts, Python glue. Issue #16 asks for <= 20 us.

The dispatchers a call runs are found by recording: every dispatcher bound to
a name in a ``kdnumba`` module is wrapped for one call, so the replay follows
the kernels' current signatures without this file knowing them. Times are
minima over ``--rounds`` rounds; each round takes two samples of every call
and every replay of every case in turn (a sample is the mean of enough
back-to-back calls to last >= 0.2 ms), so the samples of one case are spread
over the whole run and a burst of load from another process spoils some
rounds of every case rather than one case; Numba and BLAS run
``--threads`` threads (default 1: the figures are per-call costs, not
parallel speed; an OPENBLAS_NUM_THREADS already set is kept).

``--profile kd_loss:320`` prints a cProfile of many calls of one case instead.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import sys
import time

if __name__ == "__main__":  # BLAS threads as Numba's (before NumPy loads its BLAS)
    _threads = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv else "1"
    for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, _threads)

import numpy as np  # noqa: E402

SIZES = (320, 1_000, 4_000, 16_000, 32_000)


def _shape(loss: str, size: int) -> tuple[int, int]:
    """``(B, C)`` with ``B*C = size``: 10 columns (classes / neurons / features)
    and ``size/10`` rows, except the contrastive and relational losses
    (quadratic or cubic in B): 32 rows and ``size/32`` columns.
    ``attention_transfer`` gets ``(size/40, 10, 2, 2)`` feature maps.
    A loss written ``selectivity_loss@sparsity`` runs that metric."""
    if loss in ("nt_xent", "info_nce", "rkd_loss"):
        return 32, size // 32
    return size // 10, 10


def _inputs(loss: str, size: int, dtype) -> tuple[tuple, dict]:
    loss, _, metric = loss.partition("@")
    rng = np.random.default_rng(0)
    rows, cols = _shape(loss, size)
    s = rng.standard_normal((rows, cols)).astype(dtype)
    t = (s + rng.standard_normal((rows, cols))).astype(dtype)
    if loss == "kd_loss":
        y = rng.integers(0, cols, rows, dtype=np.int64)
        return (s, t, y), {"temperature": 3.0, "alpha": 0.3}
    if loss == "attention_transfer":
        maps = (rows // 4, cols, 2, 2)
        return (s.reshape(maps), t.reshape(maps)), {}
    return (s, t), ({"metric": metric} if metric else {})


# --- recording the dispatchers a call runs ---------------------------------------------

def _is_dispatcher(obj) -> bool:
    from numba.core.dispatcher import Dispatcher

    from kdnumba._policy import ParallelKernel
    return isinstance(obj, (Dispatcher, ParallelKernel))


class _Recorder:
    """Stands in for one dispatcher while a call is recorded."""

    def __init__(self, target, log):
        self.target = target
        self.log = log

    def __call__(self, *args):
        from kdnumba._policy import ParallelKernel
        target = self.target
        if not isinstance(target, ParallelKernel):
            self.log.append((target, args))
            return target(*args)
        used = []
        real = target.parallel

        def parallel(*a):
            used.append(True)
            return real(*a)

        target.parallel = parallel  # instance attribute: see which build runs
        try:
            result = target(*args)
        finally:
            target.parallel = real
        self.log.append((real if used else target.serial, args))
        return result

    def __getattr__(self, name):
        return getattr(self.target, name)


class _MatmulRecorder:
    """Stands in for ``np.matmul`` (the BLAS products of some CPU kernels)."""

    def __init__(self, log):
        self.log = log
        self.real = np.matmul

    def __call__(self, *args, **kwargs):
        real = self.real
        self.log.append((lambda *a, _k=kwargs: real(*a, **_k), args))
        return real(*args, **kwargs)


def record(fn, args, kwargs) -> list:
    """``[(callable, args)]``: the Numba dispatchers and BLAS products (``np.matmul``)
    run by ``fn(*args, **kwargs)`` (already compiled)."""
    log: list = []
    patched = [(np, "matmul", np.matmul)]
    np.matmul = _MatmulRecorder(log)
    for name, module in list(sys.modules.items()):
        if not name.startswith("kdnumba") or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if _is_dispatcher(value):
                setattr(module, attr, _Recorder(value, log))
                patched.append((module, attr, value))
    try:
        fn(*args, **kwargs)
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)
    return log


# --- timing ------------------------------------------------------------------------------

def _number(fn, sample_s: float = 2e-4) -> int:
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t0 >= sample_s or n >= 100_000:
            return n
        n *= 2


def _sample(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def interleaved_minima(fns, rounds: int, per_round: int = 2) -> list[float]:
    """Minimum seconds per call of each of ``fns``, sampled round by round."""
    numbers = [_number(f) for f in fns]
    best = [float("inf")] * len(fns)
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            for i, (f, n) in enumerate(zip(fns, numbers)):
                for _ in range(per_round):
                    best[i] = min(best[i], _sample(f, n))
    finally:
        if gc_was:
            gc.enable()
    return best


def prepare(loss: str, size: int, dtype) -> tuple:
    """``(public, kernels, n_kernels)``: the call of one case, and the replay of the
    dispatchers and BLAS products it runs (compiled, and checked to repeat bit for bit)."""
    import kdnumba.functional as F

    fn = getattr(F, loss.partition("@")[0])
    args, kwargs = _inputs(loss, size, dtype)
    reference = fn(*args, **kwargs)
    fn(*args, **kwargs)
    calls = record(fn, args, kwargs)

    def public():
        fn(*args, **kwargs)

    def kernels():
        for dispatcher, a in calls:
            dispatcher(*a)

    kernels()
    again = fn(*args, **kwargs)
    assert again[0] == reference[0] and np.array_equal(again[1], reference[1])
    return public, kernels, len(calls)


def measure(cases: list[tuple[str, int]], dtype, rounds: int) -> list[dict]:
    """Time every case. Each round samples every case (call and kernel in turn),
    so each case's samples are spread over the whole run and a burst of load
    from another process spoils some rounds of every case rather than all the
    rounds of one."""
    prepared = [prepare(loss, size, dtype) for loss, size in cases]
    fns = [f for public, kernels, _ in prepared for f in (public, kernels)]
    best = interleaved_minima(fns, rounds)
    return [{"loss": loss, "size": size, "shape": _shape(loss, size),
             "call_us": best[2 * i] * 1e6, "kernel_us": best[2 * i + 1] * 1e6,
             "overhead_us": (best[2 * i] - best[2 * i + 1]) * 1e6, "kernels": prepared[i][2]}
            for i, (loss, size) in enumerate(cases)]


def profile(loss: str, size: int, dtype, calls: int = 20_000) -> None:
    import kdnumba.functional as F

    fn = getattr(F, loss.partition("@")[0])
    args, kwargs = _inputs(loss, size, dtype)
    fn(*args, **kwargs)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn(*args, **kwargs)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--losses", default="kd_loss,selectivity_loss,feature_loss,nt_xent")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--profile", default=None, metavar="LOSS:SIZE")
    opts = parser.parse_args(argv)

    import numba

    import kdnumba
    from kdnumba.benchmarking.machine import cpu_model, usable_cores

    numba.set_num_threads(min(opts.threads, numba.config.NUMBA_NUM_THREADS))
    dtype = np.dtype(opts.dtype)
    if opts.profile:
        loss, size = opts.profile.split(":")
        profile(loss, int(size), dtype)
        return
    print(f"# kdnumba {kdnumba.__version__} ({os.path.dirname(kdnumba.__file__)}), "
          f"{cpu_model()}, {usable_cores()} cores, "
          f"{numba.get_num_threads()} Numba thread(s), {dtype.name}; minima of "
          f"{opts.rounds} rounds; us per call")
    print("| loss | B*C | shape | call | kernel | overhead | kernels |")
    print("|---|---:|---|---:|---:|---:|---:|")
    cases = [(loss, size) for loss in opts.losses.split(",")
             for size in map(int, opts.sizes.split(","))]
    for r in measure(cases, dtype, opts.rounds):
        print(f"| {r['loss']} | {r['size']} | {r['shape'][0]}x{r['shape'][1]} "
              f"| {r['call_us']:.1f} | {r['kernel_us']:.1f} | {r['overhead_us']:.1f} "
              f"| {r['kernels']} |")


if __name__ == "__main__":
    main()
