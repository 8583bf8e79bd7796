"""Benchmark cases of neuron-selectivity distillation
(``kdnumba.functional.selectivity_loss``), loss *and* gradient, one per metric.

* kdnumba: ``selectivity_loss(s, t, metric=...)`` (headline; allocates the
  gradient) and the ``out=`` variant writing into a preallocated buffer (no
  fresh 32 MB allocation, hence no page faults, per call);
* NumPy: :func:`kdnumba.reference.selectivity_loss`;
* PyTorch CPU, autograd of the same formula (``s`` a leaf tensor,
  ``s.grad`` reset to None each run)::

      variance:        ((s.var(0, unbiased=False) - t.var(0, unbiased=False))**2).mean()
      sparsity:        sel(a) = sigmoid(sharpness * (1 - a.abs() / threshold)).mean(0)
                       ((sel(s) - sel(t))**2).mean()
      peak_to_average: sel(a) = a.max(0).values / (a.abs().mean(0) + eps)
                       ((sel(s) - sel(t))**2).mean()

``bytes_moved`` is what must cross memory at the least: student and teacher
read, gradient written. Activations are ``0.02 * N(0, 1)`` (student) and
``0.03 * N(0, 1)`` (teacher), so that the default sparsity threshold 0.01
splits them and every statistic differs between the two.
"""

from __future__ import annotations

import numpy as np

from kdnumba.benchmarking import BenchCase, torch_backward
from kdnumba.functional.selectivity import (
    DEFAULT_EPS,
    DEFAULT_SHARPNESS,
    DEFAULT_THRESHOLD,
    selectivity_loss,
)
from kdnumba.reference import selectivity_loss as selectivity_loss_reference

METRICS = ("variance", "sparsity", "peak_to_average")


def _make_inputs(n_rows: int, n_cols: int, dtype):
    def make(rng) -> dict:
        student = (0.02 * rng.standard_normal((n_rows, n_cols))).astype(dtype)
        teacher = (0.03 * rng.standard_normal((n_rows, n_cols))).astype(dtype)
        return {"student": student, "teacher": teacher, "out": np.empty_like(student)}
    return make


def _runner(loss_fn, metric, *, out: bool = False):
    """``inputs -> loss_fn(student, teacher, metric=metric)``, with ``out=`` the
    preallocated gradient buffer if ``out``."""
    if out:
        return lambda d: loss_fn(d["student"], d["teacher"], metric=metric, out=d["out"])
    return lambda d: loss_fn(d["student"], d["teacher"], metric=metric)


def _torch(metric):
    def build(d):
        import torch

        s = torch.from_numpy(d["student"].copy()).requires_grad_(True)
        t = torch.from_numpy(d["teacher"])

        if metric == "variance":
            def sel(a):
                return a.var(0, unbiased=False)
        elif metric == "sparsity":
            def sel(a):
                return torch.sigmoid(DEFAULT_SHARPNESS * (1 - a.abs() / DEFAULT_THRESHOLD)).mean(0)
        else:
            def sel(a):
                return a.max(0).values / (a.abs().mean(0) + DEFAULT_EPS)

        return torch_backward(s, lambda: ((sel(s) - sel(t)) ** 2).mean())
    return build


def _case(metric: str, n_rows: int, n_cols: int, dtype, *, quick: bool,
          notes: str) -> BenchCase:
    dt = np.dtype(dtype)
    return BenchCase(
        name=f"selectivity_loss/{metric}/B{n_rows}_N{n_cols}/{dt.name}",
        family="selectivity",
        make_inputs=_make_inputs(n_rows, n_cols, dt),
        kdnumba=_runner(selectivity_loss, metric),
        numpy=_runner(selectivity_loss_reference, metric),
        torch=_torch(metric),
        bytes_moved=3 * n_rows * n_cols * dt.itemsize,
        quick=quick,
        notes=notes,
        variants=(("out=", _runner(selectivity_loss, metric, out=True)),),
        compile_group=f"selectivity_loss/{metric}/{dt.name}",
    )


CASES = [
    _case("variance", 4096, 2048, np.float32, quick=True,
          notes="headline: population-variance matching, loss+grad"),
    _case("sparsity", 4096, 2048, np.float32, quick=False,
          notes="sigmoid-relaxed fraction |a| < 0.01, sharpness 10 (3 exp per element pair)"),
    _case("peak_to_average", 4096, 2048, np.float32, quick=False,
          notes="max / (mean|a| + 1e-8), first-max tie rule"),
    _case("variance", 4096, 2048, np.float64, quick=False, notes="float64"),
    _case("variance", 256, 64, np.float32, quick=True, notes="small call: per-call overhead"),
]
