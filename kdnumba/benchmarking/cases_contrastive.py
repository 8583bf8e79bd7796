"""The contrastive benchmark that is not a registry workload: NT-Xent's scaling
with the batch size ``B`` (time and extra peak memory, one fresh process per
point, up to ``B = 65536`` where the dense ``B x B`` matrix would need 16 GiB).

The per-loss cases (NT-Xent, InfoNCE, supervised, triplet, with their NumPy and
PyTorch comparisons and FLOP counts) are the ``workloads`` of the loss specs in
:mod:`kdnumba.functional.contrastive`.
"""

from __future__ import annotations

#: No fixed cases here: they come from the registry.
CASES: list = []

# --- scaling with B: time and extra peak memory, one fresh process per point ---------

_SCALING_SCRIPT = r"""
import json, sys, time
import numpy as np
impl, mode = sys.argv[1], sys.argv[2]
n, dim, repeats = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

from kdnumba import registry
from kdnumba.benchmarking.registry_cases import torch_closure
import kdnumba.functional
spec = registry.get(mode)
options = {"temperature": 0.07} if mode != "triplet_loss" else {}
make = lambda rng, rows: spec.make_inputs(rng, np.dtype(np.float32), rows=rows, dim=dim,
                                          classes=100)
warm = make(np.random.default_rng(1), 64)
if impl == "kdnumba":
    run_of = lambda d: (lambda: spec.function(**d, **options))
else:
    import torch
    torch.set_num_threads(int(sys.argv[6]))
    run_of = lambda d: torch_closure(spec, d, options)
run_of(warm)()  # compile / load kernels, allocate BLAS buffers
d = make(np.random.default_rng(0), n)
run = run_of(d)
before = status("VmRSS")
try:
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
except OSError:
    pass
times = []
for _ in range(repeats):
    t0 = time.perf_counter(); run(); times.append(time.perf_counter() - t0)
print(json.dumps({"impl": impl, "mode": mode, "B": n, "D": dim, "min_s": min(times),
                  "extra_peak_bytes": status("VmHWM") - before}))
"""


def measure_scaling(sizes=(1024, 2048, 4096, 8192, 16384, 32768, 65536), dim=128,
                    mode="nt_xent", torch_max=16384, threads=None) -> list[dict]:
    """Time and extra peak RSS of one loss+gradient call (float32) for each ``B``.

    Each point runs in a fresh process: after a warm-up call at ``B = 64`` and
    building the inputs, ``VmHWM`` is reset to ``VmRSS`` and the extra peak is
    ``VmHWM - VmRSS`` after the timed calls (this sees Numba's and BLAS's
    allocations, which ``tracemalloc`` does not). PyTorch (the dense
    formulation) is measured up to ``torch_max``.
    """
    import json
    import subprocess
    import sys

    import numba

    threads = threads or numba.get_num_threads()
    results = []
    for impl in ("kdnumba", "torch"):
        for n in sizes:
            if impl == "torch" and n > torch_max:
                continue
            repeats = 3 if n <= 8192 else 1
            out = subprocess.run(
                [sys.executable, "-c", _SCALING_SCRIPT, impl, mode, str(n), str(dim),
                 str(repeats), str(threads)], capture_output=True, text=True, check=True)
            point = json.loads(out.stdout.strip().splitlines()[-1])
            point["dense_matrix_bytes"] = 4 * n * n
            point["gflops"] = 4 * n * n * dim / point["min_s"] / 1e9
            results.append(point)
            print(f"{impl:8s} B={n:6d}: {point['min_s']:8.3f} s, extra peak "
                  f"{point['extra_peak_bytes'] / 2**20:8.1f} MiB "
                  f"(dense B x B float32: {4 * n * n / 2**20:8.0f} MiB), "
                  f"{point['gflops']:6.1f} GFLOP/s", file=sys.stderr)
    return results


def plot_scaling(results: list[dict], path: str) -> None:
    """Log-log plot of time and extra peak memory against ``B`` (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for impl, style in (("kdnumba", "o-"), ("torch", "s--")):
        pts = [r for r in results if r["impl"] == impl]
        if not pts:
            continue
        b = [r["B"] for r in pts]
        label = "kdnumba (tiled)" if impl == "kdnumba" else "PyTorch CPU (dense)"
        ax_t.plot(b, [r["min_s"] for r in pts], style, label=label)
        ax_m.plot(b, [r["extra_peak_bytes"] / 2**20 for r in pts], style, label=label)
    b_all = sorted({r["B"] for r in results})
    ax_m.plot(b_all, [4 * n * n / 2**20 for n in b_all], ":", color="gray",
              label="one dense B x B float32")
    ax_m.plot(b_all, [4 * n * n / 8 / 2**20 for n in b_all], "-.", color="gray",
              label="1/8 of it")
    for ax, title, unit in ((ax_t, "loss + gradient time", "seconds"),
                            (ax_m, "extra peak memory (VmHWM)", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B (D = 128, float32)")
        ax.set_ylabel(unit)
        ax.set_title(f"NT-Xent: {title}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    """``python -m kdnumba.benchmarking.cases_contrastive [--plot PATH] [--json PATH]``."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--sizes", type=int, nargs="+",
                        default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--torch-max", type=int, default=16384)
    parser.add_argument("--plot", help="write the plot here (PNG)")
    parser.add_argument("--json", help="write the points here")
    args = parser.parse_args(argv)
    results = measure_scaling(args.sizes, torch_max=args.torch_max)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.plot:
        plot_scaling(results, args.plot)


if __name__ == "__main__":
    main()
