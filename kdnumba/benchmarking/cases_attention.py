"""Benchmark cases of attention distillation (``kdnumba.functional.attention_transfer``
and ``attention_map_loss``), loss *and* gradient.

* attention transfer, RepDistiller ``AT.py`` with ``p = 2``:
  kdnumba ``attention_transfer(s, t)`` vs NumPy
  :func:`kdnumba.reference.attention_transfer` (small case only: it forms a
  ``S x S`` Jacobian per sample) vs PyTorch CPU autograd of::

      at = lambda f: F.normalize(f.pow(2).mean(1).view(f.size(0), -1))
      (at(s) - at(t)).pow(2).mean().backward()

* attention maps ``(B, heads, L, L)``, KL over rows of probabilities:
  kdnumba ``attention_map_loss(s, t, kind="kl")`` vs NumPy reference vs::

      (F.kl_div(s.clamp_min(1e-12).log(), t, reduction="sum") / (B heads L)).backward()

``s`` is a leaf tensor, ``s.grad`` reset to None each run. ``bytes_moved``:
student and teacher read, gradient written.
"""

from __future__ import annotations

import math

import numpy as np

from kdnumba.benchmarking import BenchCase, torch_backward
from kdnumba.functional import attention_map_loss, attention_transfer
from kdnumba.reference import attention_map_loss as attention_map_loss_reference
from kdnumba.reference import attention_transfer as attention_transfer_reference

EPS = 1e-12


def _make_features(s_shape, t_shape, dtype):
    def make(rng) -> dict:
        return {"student": rng.standard_normal(s_shape).astype(dtype),
                "teacher": rng.standard_normal(t_shape).astype(dtype)}
    return make


def _make_maps(shape, dtype):
    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    def make(rng) -> dict:
        return {"student": softmax(rng.standard_normal(shape)).astype(dtype),
                "teacher": softmax(2 * rng.standard_normal(shape)).astype(dtype)}
    return make


def _at_kdnumba(d):
    return attention_transfer(d["student"], d["teacher"])


def _at_numpy(d):
    return attention_transfer_reference(d["student"], d["teacher"])


def _at_torch(d):
    import torch
    import torch.nn.functional as F

    s = torch.from_numpy(d["student"].copy()).requires_grad_(True)
    t = torch.from_numpy(d["teacher"])

    def at(f):
        return F.normalize(f.pow(2).mean(1).view(f.size(0), -1))

    return torch_backward(s, lambda: (at(s) - at(t)).pow(2).mean())


def _kl_kdnumba(d):
    return attention_map_loss(d["student"], d["teacher"], kind="kl")


def _kl_numpy(d):
    return attention_map_loss_reference(d["student"], d["teacher"], kind="kl")


def _kl_torch(d):
    import torch
    import torch.nn.functional as F

    s = torch.from_numpy(d["student"].copy()).requires_grad_(True)
    t = torch.from_numpy(d["teacher"])
    n_rows = math.prod(s.shape[:-1])
    return torch_backward(
        s, lambda: F.kl_div(s.clamp_min(EPS).log(), t, reduction="sum") / n_rows)


def _at_case(s_shape, t_shape, dtype, *, numpy: bool, quick: bool, notes: str) -> BenchCase:
    dt = np.dtype(dtype)
    return BenchCase(
        name=f"attention_transfer/{'x'.join(map(str, s_shape))}/{dt.name}",
        family="attention",
        make_inputs=_make_features(s_shape, t_shape, dt),
        kdnumba=_at_kdnumba,
        numpy=_at_numpy if numpy else None,
        torch=_at_torch,
        bytes_moved=(2 * math.prod(s_shape) + math.prod(t_shape)) * dt.itemsize,
        quick=quick,
        notes=notes,
        compile_group=f"attention_transfer/{dt.name}/p2",
    )


def _kl_case(shape, dtype, *, quick: bool, notes: str) -> BenchCase:
    dt = np.dtype(dtype)
    return BenchCase(
        name=f"attention_map_kl/{'x'.join(map(str, shape))}/{dt.name}",
        family="attention",
        make_inputs=_make_maps(shape, dt),
        kdnumba=_kl_kdnumba,
        numpy=_kl_numpy,
        torch=_kl_torch,
        bytes_moved=3 * math.prod(shape) * dt.itemsize,
        quick=quick,
        notes=notes,
        compile_group=f"attention_map_kl/{dt.name}",
    )


CASES = [
    _at_case((256, 256, 16, 16), (256, 256, 16, 16), np.float32, numpy=False, quick=True,
             notes="headline: RepDistiller AT, p=2, 64 MiB per input"),
    _at_case((256, 256, 16, 16), (256, 256, 16, 16), np.float64, numpy=False, quick=False,
             notes="float64"),
    _at_case((64, 32, 8, 8), (64, 64, 8, 8), np.float32, numpy=True, quick=False,
             notes="small call; teacher has twice the channels"),
    _kl_case((32, 12, 128, 128), np.float32, quick=False,
             notes="BERT-base attention probabilities, KL over rows"),
]
