"""Benchmark cases of response-based KD (``kdnumba.functional.kd_loss``).

Every case computes loss *and* gradient with integer labels, ``alpha = 0.3``,
``T = 3``:

* kdnumba: ``kd_loss(s, t, y)`` (headline; allocates the gradient) and the
  ``out=`` variant writing into a preallocated buffer (no fresh 16 MB
  allocation, hence no page faults, per call);
* NumPy: :func:`kdnumba.reference.kd_loss`, what a NumPy user would write;
* PyTorch CPU::

      loss = F.kl_div(F.log_softmax(s/T), F.log_softmax(t/T), log_target=True,
                      reduction="batchmean") * T*T*(1-alpha)
             + alpha * F.cross_entropy(s, y)
      loss.backward()      # s: a leaf tensor, s.grad reset to None each run

``bytes_moved`` is what must cross memory at the least: student and teacher
read, gradient written, labels read.
"""

from __future__ import annotations

import numpy as np

from kdnumba.benchmarking import BenchCase, torch_backward
from kdnumba.functional import kd_loss
from kdnumba.reference import kd_loss as kd_loss_reference

TEMPERATURE = 3.0
ALPHA = 0.3


def _make_inputs(n_rows: int, n_classes: int, dtype):
    def make(rng) -> dict:
        # Teacher = student + noise: the two distributions are related, as in
        # training; values do not change the work (the exp is branch-free).
        student = (2.0 * rng.standard_normal((n_rows, n_classes))).astype(dtype)
        teacher = (student + rng.standard_normal((n_rows, n_classes))).astype(dtype)
        labels = rng.integers(0, n_classes, n_rows, dtype=np.int64)
        return {"student": student, "teacher": teacher, "labels": labels,
                "out": np.empty_like(student)}
    return make


def _runner(loss_fn, *, out: bool = False):
    """``inputs -> loss_fn(student, teacher, labels, temperature=T, alpha=alpha)``,
    with ``out=`` the preallocated gradient buffer if ``out``."""
    if out:
        return lambda d: loss_fn(d["student"], d["teacher"], d["labels"],
                                 temperature=TEMPERATURE, alpha=ALPHA, out=d["out"])
    return lambda d: loss_fn(d["student"], d["teacher"], d["labels"],
                             temperature=TEMPERATURE, alpha=ALPHA)


def pytorch_kd(temperature: float = TEMPERATURE, alpha: float = ALPHA):
    """``(s, t, y) -> 0-d tensor``: the loss ``kd_loss`` computes, in PyTorch::

        T^2 (1 - alpha) KL(softmax(t/T) || softmax(s/T)) (batch mean) + alpha CE(s, y)

    Shared by the benchmark's PyTorch column and ``bench/test_bench_bridges.py``.
    """
    import torch.nn.functional as F

    soft_weight = temperature * temperature * (1.0 - alpha)

    def loss(s, t, y):
        return (F.kl_div(F.log_softmax(s / temperature, dim=1),
                         F.log_softmax(t / temperature, dim=1),
                         log_target=True, reduction="batchmean") * soft_weight
                + alpha * F.cross_entropy(s, y))

    return loss


def _torch(d):
    import torch

    s = torch.from_numpy(d["student"].copy()).requires_grad_(True)
    t = torch.from_numpy(d["teacher"])
    y = torch.from_numpy(d["labels"])
    kd = pytorch_kd()
    return torch_backward(s, lambda: kd(s, t, y))


def _case(n_rows: int, n_classes: int, dtype, *, quick: bool, notes: str) -> BenchCase:
    dt = np.dtype(dtype)
    return BenchCase(
        name=f"kd_loss/B{n_rows}_C{n_classes}/{dt.name}",
        family="response",
        make_inputs=_make_inputs(n_rows, n_classes, dt),
        kdnumba=_runner(kd_loss),
        numpy=_runner(kd_loss_reference),
        torch=_torch,
        bytes_moved=3 * n_rows * n_classes * dt.itemsize + 8 * n_rows,
        quick=quick,
        notes=notes,
        variants=(("out=", _runner(kd_loss, out=True)),),
        compile_group=f"kd_loss/{dt.name}/index-labels",
    )


CASES = [
    _case(4096, 1000, np.float32, quick=True,
          notes="headline: loss+grad, int labels, T=3, alpha=0.3"),
    _case(4096, 1000, np.float64, quick=False, notes="float64"),
    _case(256, 10, np.float32, quick=True, notes="small call: per-call overhead"),
    _case(64, 32_000, np.float32, quick=False, notes="LLM-sized vocabulary"),
]
