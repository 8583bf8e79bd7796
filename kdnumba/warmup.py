"""``kdnumba warmup``: compile every CPU kernel for float32 and float64 ahead of time.

For container images and CI caches: run it once where the package is
installed (or with ``KDNUMBA_CACHE_DIR`` / ``NUMBA_CACHE_DIR`` pointing at
the cache to fill) and later processes load machine code from disk instead
of compiling on their first call. The work list comes from the loss
registry: every registered loss, every variant the contract suite checks
(so every option path its kernels take), both float dtypes, run on tiny
inputs. Jobs are spread over worker processes (``spawn``), one loss and dtype
each, with a progress bar; the compilation cache is safe to fill from
several processes at once (see ``docs/reliability.md``).

CUDA kernels are compiled on their first use on a GPU machine; this command
does not need or touch a GPU.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class WarmupResult:
    """One job: a loss in one dtype, how long its first calls took, any error."""

    loss: str
    dtype: str
    seconds: float
    error: str | None = None


def jobs(only=None) -> list[tuple[str, str]]:
    """``(loss name, dtype)`` for every registered loss (or the ``only`` names)."""
    from kdnumba import functional

    names = [spec.name for spec in functional.specs()]
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ValueError(f"unknown loss name(s) {unknown}; registered: {names}")
        names = [n for n in names if n in set(only)]
    return [(name, dtype) for name in names for dtype in DTYPES]


def compile_one(name: str, dtype: str) -> WarmupResult:
    """Call loss ``name`` once per variant on tiny ``dtype`` inputs (in this process)."""
    import numpy as np

    from kdnumba import functional, registry

    functional.specs()  # the registry is complete once functional is imported
    spec = registry.get(name)
    started = time.perf_counter()
    try:
        for variant in spec.variants:
            args = spec.make_inputs(np.random.default_rng(0), np.dtype(dtype), **variant.inputs)
            spec.function(**args, **variant.options, device="cpu")
            if spec.medium:  # the parallel path of kernels that run small calls serially
                args = spec.make_inputs(np.random.default_rng(0), np.dtype(dtype),
                                        **{**variant.inputs, **spec.medium})
                spec.function(**args, **variant.options, device="cpu")
    except Exception as exc:  # reported, not raised: the other jobs go on
        return WarmupResult(name, dtype, time.perf_counter() - started,
                            f"{type(exc).__name__}: {exc}")
    return WarmupResult(name, dtype, time.perf_counter() - started)


def run(*, only=None, workers: int | None = None, progress=None) -> list[WarmupResult]:
    """Compile every job in ``workers`` processes (default: the CPU count);
    ``progress(done, total, result)`` is called as each job finishes."""
    work = jobs(only)
    workers = max(1, min(workers or os.cpu_count() or 1, len(work)))
    results: list[WarmupResult] = []
    if workers == 1:
        for k, job in enumerate(work, 1):
            results.append(compile_one(*job))
            if progress:
                progress(k, len(work), results[-1])
        return results
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [pool.submit(compile_one, *job) for job in work]
        for k, future in enumerate(as_completed(futures), 1):
            results.append(future.result())
            if progress:
                progress(k, len(work), results[-1])
    order = {job: i for i, job in enumerate(work)}
    return sorted(results, key=lambda r: order[(r.loss, r.dtype)])


def add_arguments(parser) -> None:
    parser.add_argument("--jobs", "-j", type=int, default=None, metavar="N",
                        help="worker processes (default: the number of CPUs)")
    parser.add_argument("--only", action="append", metavar="LOSS",
                        help="only this loss (repeatable), e.g. --only kd_loss")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_from_args(args) -> int:
    if args.jobs is not None and args.jobs < 1:
        print("kdnumba warmup: error: --jobs must be >= 1", file=sys.stderr)
        return 2
    try:
        total = len(jobs(args.only))
    except ValueError as exc:
        print(f"kdnumba warmup: error: {exc}", file=sys.stderr)
        return 2
    bar = None if args.quiet else _progress_bar(total)
    started = time.perf_counter()

    def progress(done, total, result):
        if bar is not None:
            bar(done, total, result)

    results = run(only=args.only, workers=args.jobs, progress=progress)
    failed = [r for r in results if r.error]
    wall = time.perf_counter() - started
    print(f"kdnumba warmup: {len(results) - len(failed)}/{len(results)} loss x dtype jobs "
          f"compiled in {wall:.1f} s", file=sys.stderr)
    for r in failed:
        print(f"  failed: {r.loss} {r.dtype}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


def _progress_bar(total: int):
    """A tqdm bar when tqdm is installed, else one line per job on stderr."""
    try:
        from tqdm import tqdm
    except ImportError:
        def line(done, total, result):
            print(f"[{done}/{total}] {result.loss} {result.dtype} "
                  f"{result.seconds:.1f} s{' FAILED' if result.error else ''}",
                  file=sys.stderr)
        return line
    bar = tqdm(total=total, unit="job", desc="compiling", file=sys.stderr)

    def update(done, total, result):
        bar.set_postfix_str(f"{result.loss} {result.dtype}")
        bar.update(1)
        if done == total:
            bar.close()
    return update
