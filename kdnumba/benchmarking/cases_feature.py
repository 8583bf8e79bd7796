"""Benchmark cases of FitNets feature matching (``kdnumba.functional.feature_loss``).

Loss *and* gradient of ``mean (s - t)^2`` over a CNN feature map:

* kdnumba: ``feature_loss(s, t)`` (one fused pass);
* NumPy: :func:`kdnumba.reference.feature_loss`;
* PyTorch CPU: ``F.mse_loss(s, t).backward()`` (RepDistiller ``HintLoss``),
  ``s`` a leaf tensor, ``s.grad`` reset to None each run.

``bytes_moved``: student and teacher read, gradient written.
"""

from __future__ import annotations

import math

import numpy as np

from kdnumba.benchmarking import BenchCase, torch_backward
from kdnumba.functional import feature_loss
from kdnumba.reference import feature_loss as feature_loss_reference


def _make_inputs(shape, dtype):
    def make(rng) -> dict:
        student = rng.standard_normal(shape).astype(dtype)
        teacher = (student + rng.standard_normal(shape)).astype(dtype)
        return {"student": student, "teacher": teacher}
    return make


def _kdnumba(d):
    return feature_loss(d["student"], d["teacher"])


def _numpy(d):
    return feature_loss_reference(d["student"], d["teacher"])


def _torch(d):
    import torch
    import torch.nn.functional as F

    s = torch.from_numpy(d["student"].copy()).requires_grad_(True)
    t = torch.from_numpy(d["teacher"])
    return torch_backward(s, lambda: F.mse_loss(s, t))


def _case(shape, dtype, *, quick: bool, notes: str) -> BenchCase:
    dt = np.dtype(dtype)
    return BenchCase(
        name=f"feature_loss/{'x'.join(map(str, shape))}/{dt.name}",
        family="feature",
        make_inputs=_make_inputs(shape, dt),
        kdnumba=_kdnumba,
        numpy=_numpy,
        torch=_torch,
        bytes_moved=3 * math.prod(shape) * dt.itemsize,
        quick=quick,
        notes=notes,
        compile_group=f"feature_loss/{dt.name}",
    )


CASES = [
    _case((256, 256, 16, 16), np.float32, quick=False,
          notes="FitNets hint on a (B, C, H, W) map, 64 MiB per input"),
    _case((256, 768), np.float32, quick=False, notes="small call: per-call overhead"),
]
