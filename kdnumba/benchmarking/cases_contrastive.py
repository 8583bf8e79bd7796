"""Benchmark cases of contrastive distillation (``kdnumba.functional.nt_xent`` & co),
loss *and* gradient with respect to the student embeddings.

* kdnumba: the tiled functions (no ``B x B`` matrix);
* NumPy: :mod:`kdnumba.reference.contrastive` (dense similarity matrix in
  float64; ``None`` where it would not fit);
* PyTorch CPU, autograd of the dense formulation (``s`` a leaf tensor,
  ``s.grad`` reset to None each run)::

      nt_xent:    sn = F.normalize(s); tn = F.normalize(t)
                  loss = F.cross_entropy(sn @ cat(tn, qn).T / tau, arange(B))
      info_nce:   loss = F.cross_entropy(tn @ sn.T / tau, arange(B))
      supervised: log_p = F.log_softmax(sn @ tn.T / tau, 1)
                  loss = -((mask * log_p).sum(1) / mask.sum(1)).mean()
      triplet:    d = torch.cdist(s, s); hardest positive/negative by masked
                  max/min; relu(d_p - d_n + margin) over qualifying anchors

``flops`` counts the matrix products: ``4 B N D`` for the softmax modes (the
similarity GEMM and the gradient GEMM, ``N = B + K`` candidates) and
``2 B^2 D`` for the triplet selection; the report compares them with the
measured ``np.matmul`` peak. Embeddings are ``N(0, 1)``, the teacher's the
student's plus ``N(0, 1)`` noise (related, as in training).
"""

from __future__ import annotations

import numpy as np

from kdnumba.benchmarking import BenchCase, torch_backward
from kdnumba.functional import contrastive as functional_contrastive
from kdnumba.reference import contrastive as reference

TEMPERATURE = 0.07
MARGIN = 0.1
N_CLASSES = 100


def _make_inputs(n_rows: int, dim: int, dtype, n_queue: int):
    def make(rng) -> dict:
        student = rng.standard_normal((n_rows, dim)).astype(dtype)
        teacher = (student + rng.standard_normal((n_rows, dim))).astype(dtype)
        labels = rng.integers(0, N_CLASSES, n_rows, dtype=np.int64)
        queue = rng.standard_normal((n_queue, dim)).astype(dtype) if n_queue else None
        return {"student": student, "teacher": teacher, "labels": labels, "queue": queue}
    return make


def _runner(impl, mode):
    """``inputs -> result`` of ``mode`` with ``impl``: kdnumba's
    :mod:`kdnumba.functional.contrastive` or the NumPy reference module (same
    function names and keywords)."""
    def run(d):
        if mode == "nt_xent":
            return impl.nt_xent(d["student"], d["teacher"], temperature=TEMPERATURE,
                                negatives=d["queue"])
        if mode == "info_nce":
            return impl.info_nce(d["student"], d["teacher"], temperature=TEMPERATURE)
        if mode == "supervised":
            return impl.supervised_contrastive(d["student"], d["teacher"], d["labels"],
                                               temperature=TEMPERATURE, negatives=d["queue"])
        return impl.triplet_loss(d["student"], d["labels"], margin=MARGIN)
    return run


def _kdnumba(mode):
    return _runner(functional_contrastive, mode)


def _numpy(mode):
    return _runner(reference, mode)


def _torch(mode):
    def build(d):
        import torch
        import torch.nn.functional as F

        s = torch.from_numpy(d["student"].copy()).requires_grad_(True)
        t = torch.from_numpy(d["teacher"])
        y = torch.from_numpy(d["labels"])
        q = None if d["queue"] is None else torch.from_numpy(d["queue"])
        n = s.shape[0]
        target = torch.arange(n)

        def candidates():
            tn = F.normalize(t, dim=1)
            return tn if q is None else torch.cat([tn, F.normalize(q, dim=1)])

        if mode == "nt_xent":
            def loss_fn():
                sn = F.normalize(s, dim=1)
                return F.cross_entropy(sn @ candidates().T / TEMPERATURE, target)
        elif mode == "info_nce":
            def loss_fn():
                sn = F.normalize(s, dim=1)
                tn = F.normalize(t, dim=1)
                return F.cross_entropy(tn @ sn.T / TEMPERATURE, target)
        elif mode == "supervised":
            same = (y[:, None] == y[None, :]).to(s.dtype)
            if q is not None:
                same = torch.cat([same, torch.zeros(n, q.shape[0], dtype=s.dtype)], dim=1)
            counts = same.sum(1)

            def loss_fn():
                sn = F.normalize(s, dim=1)
                log_p = F.log_softmax(sn @ candidates().T / TEMPERATURE, dim=1)
                return -((same * log_p).sum(1) / counts).mean()
        else:
            same = y[:, None] == y[None, :]
            pos = same & ~torch.eye(n, dtype=torch.bool)
            neg = ~same
            keep = pos.any(1) & neg.any(1)

            def loss_fn():
                dist = torch.cdist(s, s)
                d_p = dist.masked_fill(~pos, float("-inf")).max(1).values
                d_n = dist.masked_fill(~neg, float("inf")).min(1).values
                return F.relu(d_p - d_n + MARGIN)[keep].mean()

        return torch_backward(s, loss_fn)
    return build


def _case(mode: str, n_rows: int, dim: int, dtype, *, n_queue: int = 0, quick: bool = False,
          numpy: bool = True, torch: bool = True, notes: str = "") -> BenchCase:
    dt = np.dtype(dtype)
    n_cand = n_rows + n_queue
    flops = 2 * n_rows * n_rows * dim if mode == "triplet" else 4 * n_rows * n_cand * dim
    queue = f"_K{n_queue}" if n_queue else ""
    return BenchCase(
        name=f"{mode}/B{n_rows}_D{dim}{queue}/{dt.name}",
        family="contrastive",
        make_inputs=_make_inputs(n_rows, dim, dt, n_queue),
        kdnumba=_kdnumba(mode),
        numpy=_numpy(mode) if numpy else None,
        torch=_torch(mode) if torch else None,
        flops=flops,
        quick=quick,
        notes=notes,
        compile_group=f"contrastive/{'triplet' if mode == 'triplet' else 'softmax'}/{dt.name}",
    )


CASES = [
    _case("nt_xent", 4096, 128, np.float32, quick=True,
          notes="headline: student-anchored NT-Xent, tau=0.07, loss+grad, tiled"),
    _case("nt_xent", 4096, 128, np.float32, n_queue=1024,
          notes="with a queue of 1024 teacher negatives"),
    _case("info_nce", 4096, 128, np.float32,
          notes="teacher-anchored: candidate-side gradient accumulated over tiles"),
    _case("supervised", 4096, 128, np.float32, notes="100 classes"),
    _case("triplet", 4096, 128, np.float32,
          notes="batch-hard, 100 classes; selection from a tiled Gram matrix"),
    _case("nt_xent", 4096, 128, np.float64, notes="float64"),
    _case("nt_xent", 256, 128, np.float32, quick=True, notes="small call: per-call overhead"),
    _case("nt_xent", 32768, 128, np.float32, numpy=False, torch=False,
          notes="dense would hold a 4 GiB B x B matrix (x3 with softmax and its gradient); "
                "tiled: < 100 MiB extra"),
]


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

from kdnumba.benchmarking import cases_contrastive as cc
make = cc._make_inputs(n, dim, np.float32, 0)
warm = cc._make_inputs(64, dim, np.float32, 0)(np.random.default_rng(1))
if impl == "kdnumba":
    run_of = lambda d: (lambda: cc._kdnumba(mode)(d))
else:
    import torch
    torch.set_num_threads(int(sys.argv[6]))
    run_of = lambda d: cc._torch(mode)(d)
run_of(warm)()  # compile / load kernels, allocate BLAS buffers
d = make(np.random.default_rng(0))
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
