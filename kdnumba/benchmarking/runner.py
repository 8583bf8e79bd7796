"""``kdnumba bench``: every benchmark case, side by side, in one process.

For each selected :class:`~kdnumba.benchmarking.BenchCase` the runner builds
the inputs once (seeded) and times, in interleaved rounds (:mod:`.timing`):

* the kdnumba call (headline) and its variants (e.g. ``out=``),
* the NumPy reference,
* the PyTorch CPU equivalent (forward + ``backward()``), when ``import torch``
  works; torch uses as many threads as Numba.

It also measures, once per run, the machine's bounds (:mod:`.bounds`): the
memory-copy bound at each case's size (cache-hot) and from DRAM (>= 1 GiB),
and the ``np.matmul`` peak for cases that declare ``flops``; and, once per
``compile_group``, the first-call cost of the kdnumba kernel in a fresh
process with an empty cache and with a warm one (:mod:`.compile_probe`) --
or, with ``--quick``, of the first call in this process (a compilation on a
fresh machine, a cache load otherwise), so that a first ``--quick`` run
compiles each kernel once, not twice.

Results are one JSON-able document (``--json``), rendered by :mod:`.report`
as a terminal table or as Markdown (``--markdown``). Before timing, the
losses and gradients of the three implementations are compared on the same
inputs; a disagreement is flagged in the table, not hidden.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np

from kdnumba._policy import ParallelKernel
from kdnumba.benchmarking import FAMILIES, BenchCase, all_cases
from kdnumba.benchmarking import bounds as _bounds
from kdnumba.benchmarking.compile_probe import measure_compile
from kdnumba.benchmarking.machine import machine_info
from kdnumba.benchmarking.report import format_markdown, format_text, ratio
from kdnumba.benchmarking.timing import FULL, QUICK, TimingPolicy, time_interleaved

SCHEMA = "kdnumba.bench/1"

#: Relative tolerance above which implementations are flagged as disagreeing
#: (float32 sums over 1000s of terms in different orders differ by ~1e-6).
AGREEMENT_RTOL = 1e-3


# --- selection ---------------------------------------------------------------

def select_cases(families=None, patterns=None, quick=False, *, errors=None
                 ) -> list[BenchCase]:
    """Cases of ``families`` (all by default) whose name contains one of
    ``patterns`` (all by default); only ``quick`` ones if ``quick``.

    With an ``errors`` dict, a family whose cases module fails to import is
    recorded there (``family -> message``) and skipped instead of raising.
    """
    cases: list[BenchCase] = []
    for family in (tuple(families) if families else FAMILIES):
        try:
            cases.extend(all_cases((family,)))
        except Exception as exc:
            if errors is None:
                raise
            errors[family] = f"{type(exc).__name__}: {exc}"
    if patterns:
        cases = [c for c in cases if any(p in c.name for p in patterns)]
    if quick:
        cases = [c for c in cases if c.quick]
    return cases


# --- agreement ---------------------------------------------------------------

def loss_and_grad(result):
    """Best-effort ``(loss: float | None, grad: ndarray | None)`` of a result."""
    loss, grad = result, None
    if isinstance(result, (tuple, list)) and result:
        loss = result[0]
        if len(result) > 1:
            grad = result[1]
    try:
        loss = float(loss)
    except (TypeError, ValueError):
        loss = None
    if grad is not None:
        try:
            grad = np.asarray(grad, dtype=np.float64)
        except (TypeError, ValueError, RuntimeError):
            grad = None
    return loss, grad


def agreement(ref, other) -> dict:
    ref_loss, ref_grad = loss_and_grad(ref)
    loss, grad = loss_and_grad(other)
    out = {}
    if ref_loss is not None and loss is not None:
        out["loss_rel"] = abs(loss - ref_loss) / max(abs(ref_loss), 1e-30)
    if ref_grad is not None and grad is not None and grad.shape == ref_grad.shape:
        scale = max(float(np.max(np.abs(ref_grad))), 1e-30)
        out["grad_rel"] = float(np.max(np.abs(grad - ref_grad))) / scale
    return out


# --- one case ----------------------------------------------------------------

def kernel_cache_stats() -> tuple[int, int]:
    """``(cache hits, cache misses)`` summed over kdnumba's Numba kernels.

    A miss means a kernel was compiled; a hit, that it was loaded from the
    on-disk cache. Read before and after a first call, they tell which of
    the two that call paid for.
    """
    from numba.core.registry import CPUDispatcher

    hits = misses = 0
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("kdnumba."):
            continue
        for obj in list(vars(module).values()):
            # A parallel kernel is a ParallelKernel holding a parallel and a serial build.
            for build in obj.builds if isinstance(obj, ParallelKernel) else (obj,):
                if isinstance(build, CPUDispatcher):
                    hits += sum(build.stats.cache_hits.values())
                    misses += sum(build.stats.cache_misses.values())
    return hits, misses


def _dtype_of(case: BenchCase, inputs: dict):
    if case.dtype is not None:
        return np.dtype(case.dtype)
    for value in inputs.values():
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            return value.dtype
    return np.dtype(np.float64)


def run_case(case: BenchCase, *, policy: TimingPolicy, torch_ok: bool, dram: dict | None,
             gemm: dict, compile_info: dict | None) -> dict:
    """Time one case; the per-case record of the JSON document."""
    inputs = case.make_inputs(np.random.default_rng(0))
    errors: dict[str, str] = {}

    impls = {"kdnumba": lambda: case.kdnumba(inputs)}
    for label, fn in case.variants:
        impls[f"variant:{label}"] = (lambda f=fn: f(inputs))
    if case.numpy is not None:
        impls["numpy"] = lambda: case.numpy(inputs)
    if case.torch is not None and torch_ok:
        try:
            impls["torch"] = case.torch(inputs)
        except Exception as exc:  # a broken torch install must not stop the table
            errors["torch"] = f"{type(exc).__name__}: {exc}"

    # Every first call (in-process compilation or cache load, lazy set-up) is
    # timed here on its own, and the results are compared on the same inputs.
    first_call: dict[str, float] = {}
    hits0, misses0 = kernel_cache_stats()
    t0 = time.perf_counter()
    reference = case.kdnumba(inputs)
    first_call["kdnumba"] = time.perf_counter() - t0
    hits1, misses1 = kernel_cache_stats()
    first = {"s": first_call["kdnumba"], "compiled": misses1 > misses0,
             "from_cache": hits1 > hits0 and misses1 == misses0}
    agreements = {}
    for label, fn in impls.items():
        if label == "kdnumba":
            continue
        try:
            t0 = time.perf_counter()
            result = fn()
            first_call[label] = time.perf_counter() - t0
            agreements[label.removeprefix("variant:")] = agreement(reference, result)
        except Exception as exc:
            errors[label] = f"{type(exc).__name__}: {exc}"
    for label in [k for k in impls if k in errors]:
        del impls[label]
    disagrees = any(v > AGREEMENT_RTOL for a in agreements.values() for v in a.values())

    # The cache-hot copy bound is timed in the same rounds, under the same load.
    bound_bytes = None
    bytes_moved = case.bytes_for(inputs)
    flops = case.flops_for(inputs)
    if bytes_moved:
        impls["bound:copy-hot"], bound_bytes = _bounds.stream_kernel(bytes_moved)

    timings = {k: t.as_dict() for k, t in time_interleaved(impls, policy).items()}
    for label, seconds in first_call.items():
        timings[label]["first_call_s"] = seconds
    hot = timings.pop("bound:copy-hot", None)
    kd = timings["kdnumba"]
    variants = {k.removeprefix("variant:"): v for k, v in timings.items()
                if k.startswith("variant:")}

    def ratios(other):
        if other is None:
            return None
        return {"min": ratio(other["min_s"], kd["min_s"]),
                "median": ratio(other["median_s"], kd["median_s"])}

    record = {
        "name": case.name, "family": case.family, "notes": case.notes,
        "quick": case.quick, "bytes_moved": bytes_moved, "flops": flops,
        "kdnumba": kd, "variants": variants,
        "numpy": timings.get("numpy"), "torch": timings.get("torch"),
        "ratios": {"numpy/kdnumba": ratios(timings.get("numpy")),
                   "torch/kdnumba": ratios(timings.get("torch"))},
        "memory_bound": None, "gemm_bound": None, "compile": compile_info,
        "first_call": first,
        "agreement": agreements, "disagrees": disagrees, "errors": errors,
    }

    if hot is not None:
        dram_s = bytes_moved / (dram["gbps"] * 1e9) if dram else None
        record["memory_bound"] = {
            "bytes_moved": bytes_moved,
            "cache_hot_s": hot["min_s"], "cache_hot_median_s": hot["median_s"],
            "cache_hot_gbps": bound_bytes / hot["min_s"] / 1e9,
            "dram_s": dram_s,
            "kdnumba/cache_hot": ratio(kd["min_s"], hot["min_s"]),
            "kdnumba/dram": ratio(kd["min_s"], dram_s),
            "variants": {k: {"kdnumba/cache_hot": ratio(v["min_s"], hot["min_s"]),
                             "kdnumba/dram": ratio(v["min_s"], dram_s)}
                         for k, v in variants.items()},
        }
    if flops:
        peak = gemm.get(_dtype_of(case, inputs).name)
        if peak:
            bound_s = flops / (peak["gflops"] * 1e9)
            record["gemm_bound"] = {"gflops_peak": peak["gflops"], "bound_s": bound_s,
                                    "kdnumba/gemm": ratio(kd["min_s"], bound_s)}
    return record


# --- the whole run -----------------------------------------------------------

def _load_average() -> float | None:
    """1-minute load average: how busy the machine was (other processes)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _import_torch(threads: int):
    try:
        import torch
    except Exception as exc:  # ImportError, or a broken install
        return None, f"{type(exc).__name__}: {exc}"
    torch.set_num_threads(threads)
    return torch, None


def run(cases: list[BenchCase], *, quick: bool = False, use_torch: bool = True,
        compile_probes: bool | None = None, policy: TimingPolicy | None = None,
        progress=None) -> dict:
    """Benchmark ``cases``; returns the JSON document (see module docstring).

    ``compile_probes`` (default: not ``quick``) measures each compile group's
    first call in fresh processes, from an empty cache and from a warm one.
    Without probes, the compile columns come from the first call in this
    process, reported as a compilation or a cache load as Numba's dispatcher
    statistics say (``--quick`` on a fresh machine compiles each kernel once,
    not twice).
    """
    import numba

    started = time.perf_counter()
    load_before = _load_average()
    policy = policy or (QUICK if quick else FULL)
    say = progress or (lambda msg: None)
    threads = numba.get_num_threads()
    if compile_probes is None:
        compile_probes = not quick

    torch = None
    torch_note = "disabled (--no-torch)"
    if use_torch and any(c.torch is not None for c in cases):
        torch, err = _import_torch(threads)
        torch_note = err or "ok"

    compile_by_group: dict[str, dict] = {}
    if compile_probes:
        for case in cases:
            group = case.compile_group or case.name
            if group in compile_by_group:
                continue
            say(f"compile time of {group} (fresh processes, empty cache) ...")
            try:
                info = measure_compile(case.name, family=case.family, threads=threads)
            except Exception as exc:
                info = {"error": f"{type(exc).__name__}: {exc}"}
            compile_by_group[group] = {"group": group, "method": "fresh processes", **info}

    dram = None
    if any(c.bytes_moved for c in cases):
        say("DRAM copy bandwidth (>= 1 GiB) ...")
        dram = _bounds.dram_bandwidth(policy)
    gemm = {}
    if any(c.flops for c in cases):
        for dtype in sorted({(c.dtype or _dtype_of(c, c.make_inputs(np.random.default_rng(0))).name)
                             for c in cases if c.flops}):
            say(f"np.matmul peak ({dtype}) ...")
            gemm[dtype] = _bounds.gemm_peak(np.dtype(dtype))

    records = []
    for k, case in enumerate(cases, 1):
        say(f"[{k}/{len(cases)}] {case.name} ...")
        group = case.compile_group or case.name
        record = run_case(case, policy=policy, torch_ok=torch is not None,
                          dram=dram, gemm=gemm, compile_info=compile_by_group.get(group))
        first = record["first_call"]
        if group not in compile_by_group and (first["compiled"] or first["from_cache"]):
            compile_by_group[group] = {
                "group": group, "method": "first call in this process",
                "cold_s": first["s"] if first["compiled"] else None,
                "cached_s": first["s"] if first["from_cache"] else None}
        if record["compile"] is None:
            record["compile"] = compile_by_group.get(group)
        records.append(record)

    machine = machine_info(torch_version=getattr(torch, "__version__", None))
    machine["load_average"] = {"before": load_before, "after": _load_average()}
    return {
        "schema": SCHEMA,
        "machine": machine,
        "settings": {
            "quick": quick, "families": sorted({c.family for c in cases},
                                               key=FAMILIES.index),
            "min_repeats": policy.min_repeats, "min_time_s": policy.min_time_s,
            "max_time_s": policy.max_time_s, "rounds": policy.rounds,
            "torch": torch_note, "torch_threads": torch.get_num_threads() if torch else None,
            "compile_method": "fresh processes" if compile_probes
                              else "first call in this process",
        },
        "bounds": {"dram": dram, "gemm": gemm},
        "cases": records,
        "elapsed_s": time.perf_counter() - started,
    }


# --- command line ------------------------------------------------------------

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``kdnumba bench``."""
    parser.add_argument("--quick", action="store_true",
                        help="only the cases marked quick, few repeats, compile cost from the "
                             "first call in this process")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true",
                     help="print the results as JSON on stdout (progress goes to stderr)")
    out.add_argument("--markdown", action="store_true",
                     help="print a Markdown table for docs/benchmarks.md")
    parser.add_argument("--family", action="append", choices=FAMILIES, metavar="NAME",
                        help=f"only this kernel family (repeatable): {', '.join(FAMILIES)}")
    parser.add_argument("--case", action="append", metavar="TEXT",
                        help="only cases whose name contains TEXT (repeatable)")
    parser.add_argument("--threads", type=_positive_int, metavar="N",
                        help="Numba (and torch) threads; default: Numba's default")
    parser.add_argument("--repeats", type=_positive_int, metavar="N",
                        help="at least N timed repeats per implementation")
    parser.add_argument("--min-time", type=_positive_float, metavar="SECONDS",
                        help="at least this much timed time per implementation")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch even if installed")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the compile-time measurement in fresh processes "
                             "(--quick always does; it reports the first call in-process)")
    parser.add_argument("--compile-only", action="store_true",
                        help="only the time to first result: every loss's first call per "
                             "dtype with an empty and a warm cache, in fresh processes")
    parser.add_argument("--save", metavar="FILE.json",
                        help="also write the results as JSON to this file")
    parser.add_argument("--load", metavar="FILE.json",
                        help="do not measure: render the results saved by --save "
                             "(with --markdown, or as the table)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point of ``kdnumba bench`` once arguments are parsed."""
    import numba

    def fail(msg: str) -> int:
        print(f"kdnumba bench: error: {msg}", file=sys.stderr)
        return 2

    if args.load:
        try:
            with open(args.load, encoding="utf-8") as fh:
                doc = json.load(fh)
        except (OSError, ValueError) as exc:
            return fail(f"cannot read --load {args.load!r}: {exc}")
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            return fail(f"--load {args.load!r} is not a 'kdnumba bench --save' file "
                        f"(expected schema {SCHEMA!r})")
        try:
            _emit(doc, args)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            return fail(f"--load {args.load!r} is damaged or incomplete "
                        f"({type(exc).__name__}: {exc})")
        return 0

    if args.threads is not None:
        limit = numba.config.NUMBA_NUM_THREADS
        if args.threads > limit:
            return fail(f"--threads must be at most {limit} (NUMBA_NUM_THREADS), "
                        f"got {args.threads}")
        numba.set_num_threads(args.threads)

    if args.compile_only:
        return _compile_only(args)

    load_errors: dict[str, str] = {}
    cases = select_cases(args.family, args.case, args.quick, errors=load_errors)
    for family, msg in load_errors.items():
        print(f"kdnumba bench: error: the {family!r} cases could not be loaded: {msg}",
              file=sys.stderr)
    if not cases:
        available = sorted({c.family for c in select_cases(errors={})}, key=FAMILIES.index)
        what = []
        if args.family:
            what.append(f"family {', '.join(args.family)}")
        if args.case:
            what.append(f"names containing {' or '.join(map(repr, args.case))}")
        if args.quick:
            what.append("--quick")
        return fail(f"no benchmark cases match {' and '.join(what) or 'the selection'} "
                    f"(families with cases: {', '.join(available) or 'none'})")

    if args.save and not os.path.isdir(os.path.dirname(os.path.abspath(args.save))):
        return fail(f"--save {args.save!r}: its folder does not exist")

    base = QUICK if args.quick else FULL
    policy = dataclasses.replace(
        base,
        min_repeats=args.repeats or base.min_repeats,
        min_time_s=args.min_time if args.min_time is not None else base.min_time_s,
        max_time_s=max(base.max_time_s, 2 * (args.min_time or 0)))

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"kdnumba bench: {msg}", file=sys.stderr, flush=True)

    doc = run(cases, quick=args.quick, use_torch=not args.no_torch,
              compile_probes=False if (args.no_compile or args.quick) else None,
              policy=policy, progress=progress)
    doc["load_errors"] = load_errors
    if args.save:
        try:
            with open(args.save, "w", encoding="utf-8") as fh:
                json.dump(doc, fh, indent=2, allow_nan=False)
        except OSError as exc:
            _emit(doc, args)
            return fail(f"cannot write --save {args.save!r}: {exc}")
    _emit(doc, args)
    # A family that does not even import is a broken installation: say so in
    # the exit status too, after printing what could be measured.
    return 1 if load_errors else 0


def _compile_only(args: argparse.Namespace) -> int:
    """``kdnumba bench --compile-only``: the cold-compile table."""
    from kdnumba.benchmarking import compile_table

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"kdnumba bench: {msg}", file=sys.stderr, flush=True)

    table = compile_table.measure(args.family, threads=args.threads, progress=progress)
    table["machine"] = machine_info()
    if args.json:
        print(json.dumps(table, indent=2, allow_nan=False))
    elif args.markdown:
        print(compile_table.format_markdown(table))
    else:
        print(compile_table.format_text(table))
    return 1 if any("error" in r for r in table["rows"]) else 0


def _emit(doc: dict, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(doc, indent=2, allow_nan=False))
    elif args.markdown:
        print(format_markdown(doc))
    else:
        print(format_text(doc))
