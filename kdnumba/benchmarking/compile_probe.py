"""First-call cost of a case's kdnumba kernel, measured in a fresh process.

``python -m kdnumba.benchmarking.compile_probe CASE_NAME... [--threads N]``
imports kdnumba, builds each case's inputs, times the first and the second
call of ``case.kdnumba`` (case after case, in one process) and prints one
JSON line with the sums. :func:`measure_compile` runs it twice against one
new, empty ``NUMBA_CACHE_DIR``:

* ``cold_s``: first call with an empty cache -- type inference, LLVM
  compilation of every kernel the call reaches, writing the cache, one run;
* ``cached_s``: first call in a new process once that cache exists -- loading
  the machine code from disk, one run (what every later process pays).

Neither includes ``import kdnumba``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _find(case_name: str, family: str | None):
    from kdnumba.benchmarking import FAMILIES, all_cases
    from kdnumba.benchmarking.registry_cases import FIRST_CALL_PREFIX, first_call_cases

    families = (family,) if family else FAMILIES
    pool = (first_call_cases(families) if case_name.startswith(FIRST_CALL_PREFIX + "/")
            else all_cases(families))
    for case in pool:
        if case.name == case_name:
            return case
    raise SystemExit(f"unknown benchmark case {case_name!r}")


def _probe(case_names: list[str], family: str | None, threads: int | None) -> dict:
    import numpy as np

    if threads:
        import numba
        numba.set_num_threads(threads)
    first = second = 0.0
    for case in [_find(name, family) for name in case_names]:
        inputs = case.make_inputs(np.random.default_rng(0))
        t0 = time.perf_counter()
        case.kdnumba(inputs)
        first += time.perf_counter() - t0
        t0 = time.perf_counter()
        case.kdnumba(inputs)
        second += time.perf_counter() - t0
    return {"first_call_s": first, "second_call_s": second}


def _run_probe(case_names: list[str], family: str | None, cache_dir: str, threads: int | None,
               timeout_s: float) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    cmd = [sys.executable, "-m", "kdnumba.benchmarking.compile_probe", *case_names]
    if family:
        cmd += ["--family", family]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"compile probe failed (exit {proc.returncode}): {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_compile(case_name: str | list[str], *, family: str | None = None,
                    threads: int | None = None, timeout_s: float = 600.0) -> dict:
    """``{"cold_s", "cached_s"}`` for one case, or for several called one
    after the other in the same processes (see module doc)."""
    names = [case_name] if isinstance(case_name, str) else list(case_name)
    with tempfile.TemporaryDirectory(prefix="kdnumba-bench-cache-") as cache_dir:
        cold = _run_probe(names, family, cache_dir, threads, timeout_s)
        warm = _run_probe(names, family, cache_dir, threads, timeout_s)
    return {"cold_s": cold["first_call_s"], "cached_s": warm["first_call_s"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdnumba.benchmarking.compile_probe")
    parser.add_argument("case", nargs="+")
    parser.add_argument("--family", default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    print(json.dumps(_probe(args.case, args.family, args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
