"""Benchmark cases of relational KD (``kdnumba.functional.rkd_loss``), loss *and* gradient.

* kdnumba: ``rkd_loss(s, t)`` (distance + angle terms, weights 25 and 50):
  O(B^2 D + B^3) work, O(B^2) memory;
* NumPy: :func:`kdnumba.reference.rkd_loss`, a port of RepDistiller that
  materialises ``B x B x D`` differences and ``B^3`` angles (small B only);
* PyTorch CPU: autograd of RepDistiller's ``RKDLoss.forward`` (``pdist``,
  ``F.normalize``, ``torch.bmm``, ``F.smooth_l1_loss``), the student a leaf
  tensor with ``grad`` reset to None each run.

The work is compute-bound (``B^3`` angle entries), so no ``bytes_moved``.
At ``B = 2048`` the reference formula needs 32 GiB per ``B^3`` float32
tensor: no NumPy or PyTorch row; the case shows kdnumba's bounded memory
(about ``5 B^2`` float64 values, 160 MiB).
"""

from __future__ import annotations

import numpy as np

from kdnumba.benchmarking import BenchCase, torch_backward
from kdnumba.functional import rkd_loss
from kdnumba.reference import rkd_loss as rkd_loss_reference

DISTANCE_WEIGHT = 25.0
ANGLE_WEIGHT = 50.0


def _make_inputs(n_rows: int, d_s: int, d_t: int, dtype):
    def make(rng) -> dict:
        return {"student": rng.standard_normal((n_rows, d_s)).astype(dtype),
                "teacher": rng.standard_normal((n_rows, d_t)).astype(dtype)}
    return make


def _kdnumba(d):
    return rkd_loss(d["student"], d["teacher"], distance_weight=DISTANCE_WEIGHT,
                    angle_weight=ANGLE_WEIGHT)


def _numpy(d):
    return rkd_loss_reference(d["student"], d["teacher"], distance_weight=DISTANCE_WEIGHT,
                              angle_weight=ANGLE_WEIGHT)


def repdistiller_rkd(student, teacher, distance_weight=DISTANCE_WEIGHT,
                     angle_weight=ANGLE_WEIGHT):
    """RepDistiller's ``RKDLoss.forward``, verbatim in formula (PyTorch tensors).

    ``student`` is a tensor with ``requires_grad``; the teacher terms are
    computed without gradient, as in RepDistiller. Returns the loss tensor.
    Shared by the benchmark's PyTorch column and the tests' autograd check.
    """
    import torch
    import torch.nn.functional as F

    def pdist(e, eps=1e-12):
        e_square = e.pow(2).sum(dim=1)
        prod = e @ e.t()
        res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps).sqrt()
        res = res.clone()
        res[range(len(e)), range(len(e))] = 0
        return res

    with torch.no_grad():
        t_d = pdist(teacher)
        t_d = t_d / t_d[t_d > 0].mean()
    dist = pdist(student)
    dist = dist / dist[dist > 0].mean()
    loss_d = F.smooth_l1_loss(dist, t_d)
    with torch.no_grad():
        td = teacher.unsqueeze(0) - teacher.unsqueeze(1)
        norm_td = F.normalize(td, p=2, dim=2)
        t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
    sd = student.unsqueeze(0) - student.unsqueeze(1)
    norm_sd = F.normalize(sd, p=2, dim=2)
    s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
    return distance_weight * loss_d + angle_weight * F.smooth_l1_loss(s_angle, t_angle)


def _torch(d):
    import torch

    s = torch.from_numpy(d["student"].copy()).requires_grad_(True)
    teacher = torch.from_numpy(d["teacher"])
    return torch_backward(s, lambda: repdistiller_rkd(s, teacher))


def _case(n_rows, d_s, d_t, dtype, *, numpy: bool, torch: bool, quick: bool,
          notes: str) -> BenchCase:
    dt = np.dtype(dtype)
    return BenchCase(
        name=f"rkd_loss/B{n_rows}_D{d_s}/{dt.name}",
        family="relational",
        make_inputs=_make_inputs(n_rows, d_s, d_t, dt),
        kdnumba=_kdnumba,
        numpy=_numpy if numpy else None,
        torch=_torch if torch else None,
        quick=quick,
        notes=notes,
        compile_group=f"rkd_loss/{dt.name}",
    )


CASES = [
    _case(512, 128, 128, np.float32, numpy=False, torch=True, quick=True,
          notes="headline: RepDistiller RKD, w_d=25, w_a=50"),
    _case(128, 64, 256, np.float64, numpy=True, torch=True, quick=False,
          notes="small batch, teacher 4x wider"),
    _case(2048, 128, 128, np.float32, numpy=False, torch=False, quick=False,
          notes="bounded memory: the reference needs 32 GiB per B^3 tensor"),
]
