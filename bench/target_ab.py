"""A/B of Numba CPU targets on one machine: the same cases built for the host's
own CPU and for another target (default ``haswell``: AVX2, no AVX-512), timed
in alternating fresh processes so that drift in the machine's speed hits both.

    python bench/target_ab.py                          # host vs haswell
    python bench/target_ab.py --threads 2,16 --rounds 3
    python bench/target_ab.py --case kd_loss/B4096_C1000/float32 --targets host,haswell,x86-64-v3

Why: issue 16 asks for kernels near the limit on AVX2 *and* no regression on
AVX-512; on an AVX-512 machine ``NUMBA_CPU_NAME=haswell`` is the AVX2 build of
the same code. Each target compiles into its own Numba cache folder, once;
the timed rounds load from it. A case name must match exactly (as
``kdnumba bench`` prints it). Prints min and median per target, round and thread
count, and the min-over-rounds ratio to the first target.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

DEFAULT_CASES = ("kd_loss/B4096_C1000/float32",
                 "selectivity_loss/variance/B4096_N2048/float32",
                 "nt_xent/B4096_D128/float32")

_CHILD = r"""
import json, sys, time
import numpy as np
from kdnumba.benchmarking import all_cases
names, repeats = json.loads(sys.argv[1]), int(sys.argv[2])
cases = {c.name: c for c in all_cases()}
out = {}
for name in names:
    case = cases[name]
    inputs = case.make_inputs(np.random.default_rng(0))
    case.kdnumba(inputs)  # compile or load from the cache; warm the pages
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        case.kdnumba(inputs)
        times.append(time.perf_counter() - t0)
    out[name] = sorted(times)
print("RESULT" + json.dumps(out))
"""


def _run(target: str, threads: int, cases, repeats: int, cache_root: str) -> dict:
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads),
               NUMBA_CACHE_DIR=os.path.join(cache_root, target))
    env.pop("NUMBA_CPU_NAME", None)
    env.pop("NUMBA_CPU_FEATURES", None)
    if target != "host":
        env["NUMBA_CPU_NAME"] = target
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(list(cases)), str(repeats)],
                          env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"target {target}, {threads} threads failed:\n{done.stderr[-3000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.3f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="host,haswell",
                        help="comma-separated: 'host' or a Numba CPU name (default host,haswell)")
    parser.add_argument("--threads", default=str(os.cpu_count() or 1),
                        help="comma-separated thread counts (default: all cores)")
    parser.add_argument("--case", action="append", help="exact case name (repeatable)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations (default 3)")
    parser.add_argument("--repeats", type=int, default=100, help="timed calls per process")
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    thread_counts = [int(t) for t in args.threads.split(",")]
    cases = args.case or list(DEFAULT_CASES)

    cache_root = tempfile.mkdtemp(prefix="kdnumba-target-ab-")
    for target in targets:  # compile once per target, untimed
        _run(target, thread_counts[0], cases, 1, cache_root)

    best: dict = {}
    print(f"{'case':48s} {'threads':>7s} {'target':>10s} {'round':>5s} {'min ms':>8s} {'median':>8s}")
    for threads in thread_counts:
        for rnd in range(args.rounds):
            for target in (targets if rnd % 2 == 0 else targets[::-1]):
                result = _run(target, threads, cases, args.repeats, cache_root)
                for name, times in result.items():
                    key = (name, threads, target)
                    best[key] = min(best.get(key, float("inf")), times[0])
                    print(f"{name:48s} {threads:7d} {target:>10s} {rnd:5d} "
                          f"{_ms(times[0])} {_ms(times[len(times) // 2])}", flush=True)
    print("\nmin over rounds, and the ratio to the first target (>1: slower than it)")
    for name in cases:
        for threads in thread_counts:
            base = best[(name, threads, targets[0])]
            cells = "  ".join(f"{t}: {_ms(best[(name, threads, t)]).strip()} ms "
                              f"({best[(name, threads, t)] / base:.2f}x)" for t in targets)
            print(f"{name:48s} {threads:3d} threads  {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
