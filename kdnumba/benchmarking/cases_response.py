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

from kdnumba.benchmarking import BenchCase
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


def _kdnumba(d):
    return kd_loss(d["student"], d["teacher"], d["labels"],
                   temperature=TEMPERATURE, alpha=ALPHA)


def _kdnumba_out(d):
    return kd_loss(d["student"], d["teacher"], d["labels"],
                   temperature=TEMPERATURE, alpha=ALPHA, out=d["out"])


def _numpy(d):
    return kd_loss_reference(d["student"], d["teacher"], d["labels"],
                             temperature=TEMPERATURE, alpha=ALPHA)


def _torch(d):
    import torch
    import torch.nn.functional as F

    s = torch.from_numpy(d["student"].copy()).requires_grad_(True)
    t = torch.from_numpy(d["teacher"])
    y = torch.from_numpy(d["labels"])
    soft_weight = TEMPERATURE * TEMPERATURE * (1.0 - ALPHA)

    def run():
        s.grad = None
        loss = (F.kl_div(F.log_softmax(s / TEMPERATURE, dim=1),
                         F.log_softmax(t / TEMPERATURE, dim=1),
                         log_target=True, reduction="batchmean") * soft_weight
                + ALPHA * F.cross_entropy(s, y))
        loss.backward()
        return loss.detach(), s.grad

    return run


def _case(n_rows: int, n_classes: int, dtype, *, quick: bool, notes: str) -> BenchCase:
    dt = np.dtype(dtype)
    return BenchCase(
        name=f"kd_loss/B{n_rows}_C{n_classes}/{dt.name}",
        family="response",
        make_inputs=_make_inputs(n_rows, n_classes, dt),
        kdnumba=_kdnumba,
        numpy=_numpy,
        torch=_torch,
        bytes_moved=3 * n_rows * n_classes * dt.itemsize + 8 * n_rows,
        quick=quick,
        notes=notes,
        variants=(("out=", _kdnumba_out),),
        compile_group=f"kd_loss/{dt.name}/index-labels",
    )


CASES = [
    _case(4096, 1000, np.float32, quick=True,
          notes="headline: loss+grad, int labels, T=3, alpha=0.3"),
    _case(4096, 1000, np.float64, quick=False, notes="float64"),
    _case(256, 10, np.float32, quick=True, notes="small call: per-call overhead"),
    _case(64, 32_000, np.float32, quick=False, notes="LLM-sized vocabulary"),
]
