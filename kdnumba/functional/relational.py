"""Relational KD as a pure function: :func:`rkd_loss`."""

from __future__ import annotations

import math

import numpy as np

from kdnumba import _dispatch
from kdnumba import _validation as v
from kdnumba._constants import NORM_EPS
from kdnumba.registry import BadInput, LossSpec, Variant, Workload, register


def rkd_loss(student_emb, teacher_emb, *, distance_weight=25.0, angle_weight=50.0,
             device="auto", out=None):
    r"""Relational KD (Park et al. 2019), RepDistiller ``RKDLoss``, with its exact gradient.

    Rows are flattened to ``(B, D)`` (``D_s`` and ``D_t`` may differ: only
    relations between rows are compared). ``sl1`` is ``F.smooth_l1_loss``
    (``beta = 1``: ``x^2/2`` if ``|x| < 1`` else ``|x| - 1/2``)::

        d_ij  = sqrt(max(||e_i - e_j||^2, 1e-12)) (i != j),  d_ii = 0
        mu    = mean_{i != j} d_ij                   (RepDistiller: mean of d > 0)
        L_d   = 1/B^2   sum_{i,j}   sl1(d^s_ij / mu_s - d^t_ij / mu_t)
        u_ab  = (e_b - e_a) / ||e_b - e_a||   (0 when ||e_b - e_a|| <= 1e-12)
        L_a   = 1/B^3   sum_{a,b,c} sl1(u^s_ab . u^s_ac - u^t_ab . u^t_ac)
        loss  = distance_weight * L_d + angle_weight * L_a

    The teacher side is a constant (``torch.no_grad`` in RepDistiller). The
    gradient is the exact derivative of this loss, row by row (derivation in
    ``docs/relational.md``). Cost: O(B^2 D + B^3) work, O(B^2 + B D) memory
    (the reference materialises B x B x D differences and B^3 angles).

    Degenerate cases, all finite:

    * Coincident rows ``e_i = e_j``: ``d_ij`` is clamped to ``1e-6`` and its
      gradient is 0 (as with ``clamp``'s gradient in PyTorch); their unit
      difference is 0 with gradient 0. Here we deliberately differ from
      ``F.normalize``, whose ``x / max(||x||, 1e-12)`` has slope ``1e12``
      at ``x = 0``: only the derivative inside that ``1e-12`` ball differs
      (the value ``u = 0`` at coincidence is the same).
    * ``B = 1``: no pairs; RepDistiller's mean of an empty set is NaN, here
      the loss is 0 with a zero gradient.

    Computed in float64 for both input dtypes (on either device), from squared distances of
    the rows (``Q_ij``, summed from differences) and the polarisation
    identity ``(e_b - e_a).(e_c - e_a) = (Q_ab + Q_ac - Q_bc) / 2``; the
    gradient is returned in the student's dtype.

    Args:
        student_emb: ``(B, ...)`` float array, flattened to ``(B, D_s)``.
        teacher_emb: ``(B, ...)`` float array; cast to the student's dtype.
        distance_weight: ``>= 0``, RepDistiller's ``w_d`` (25).
        angle_weight: ``>= 0``, RepDistiller's ``w_a`` (50). 0 skips the
            O(B^3) angle computation.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        out: optional C-contiguous array of the student's shape and dtype to
            receive the gradient.

    Returns:
        ``(loss, grad)``, ``grad`` of the student's shape and dtype.

    Raises:
        TypeError: non-float input, non-real weights.
        ValueError: batch mismatch, empty input, NaN/inf, negative weights.
    """
    w_d = v.check_non_negative(distance_weight, "distance_weight")
    w_a = v.check_non_negative(angle_weight, "angle_weight")
    be = _dispatch.backend(device, student_emb, teacher_emb)
    s_in = be.float_array(student_emb, "student_emb")
    t_in = be.float_array(teacher_emb, "teacher_emb", dtype=s_in.dtype)
    v.check_same_batch(s_in, t_in, "student_emb", "teacher_emb")
    grad_in = be.gradient_buffer(out, s_in, (student_emb, teacher_emb, t_in))
    s, t = _rows(s_in), _rows(t_in)
    # One launch function for the whole loss (a small call's Python between
    # kernels cost more than the kernels, issue #16). It stops after the
    # squared distances when their total is not finite (NaN/inf input: the
    # clamps would hide it), leaving the gradient unwritten.
    distance_total, loss = be.kernels("relational").loss_and_gradient(
        s, t, NORM_EPS, w_d, w_a, _rows(grad_in))
    inputs = (("student_emb", s), ("teacher_emb", t))
    be.check_finite(distance_total, inputs)
    be.check_finite(loss, inputs)  # finite inputs, but squared distances beyond 1e308
    return float(loss), be.deliver(grad_in, out)


def _rows(x):
    """A C-contiguous ``(B, ...)`` array viewed as ``(B, D)`` (itself when it is)."""
    if len(x.shape) == 2:
        return x
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


# --- registry entry ------------------------------------------------------------------

def _rkd_inputs(rng, dtype, *, rows=7, student_dim=4, teacher_dim=None) -> dict:
    """A student ``(rows, student_dim)`` and a related teacher: the student plus
    noise, or (``teacher_dim`` given) a random projection of it to that width
    plus noise."""
    student = rng.standard_normal((rows, student_dim))
    if teacher_dim is None:
        teacher = student + 0.5 * rng.standard_normal(student.shape)
    else:
        proj = rng.standard_normal((student_dim, teacher_dim)) / np.sqrt(student_dim)
        teacher = student @ proj + 0.5 * rng.standard_normal((rows, teacher_dim))
    return {"student_emb": student.astype(dtype), "teacher_emb": teacher.astype(dtype)}


def _with(arguments: dict, **changes) -> dict:
    return {**arguments, **changes}


def _rkd_flops(inputs) -> int:
    """The matrix-product-like part: both ``B x B`` distance tables (3 flops per
    difference) and the final ``(B, B) @ (B, D_s)`` product; the ``B^3``
    angle term (about 20 flops per entry) comes on top."""
    s, t = inputs["student_emb"], inputs["teacher_emb"]
    n = s.shape[0]
    d_s, d_t = s.size // n, t.size // n
    return int(3 * n * n * (d_s + d_t) + 2 * n * n * d_s)


register(LossSpec(
    name="rkd_loss",
    function=rkd_loss,
    family="relational",
    make_inputs=_rkd_inputs,
    reference="relational:rkd_loss",
    torch="relational:rkd_loss_torch",
    variants=(
        Variant("RepDistiller weights (25, 50)"),
        Variant("wider teacher, weights (1, 2)", {"distance_weight": 1.0, "angle_weight": 2.0},
                {"teacher_dim": 9}),
        Variant("distance term only", {"angle_weight": 0.0}),
        Variant("angle term only", {"distance_weight": 0.0}),
    ),
    medium={"rows": 256, "student_dim": 128},
    bad_inputs=(
        BadInput("negative distance_weight", lambda a: _with(a, distance_weight=-1.0),
                 ValueError, "distance_weight"),
        BadInput("string angle_weight", lambda a: _with(a, angle_weight="50"), TypeError,
                 "angle_weight"),
        BadInput("NaN angle_weight", lambda a: _with(a, angle_weight=float("nan")),
                 ValueError, "angle_weight"),
    ),
    workloads=(
        Workload("B512_D128", {"rows": 512, "student_dim": 128}, quick=True,
                 notes="headline: RepDistiller RKD, w_d=25, w_a=50"),
        Workload("B128_D64", {"rows": 128, "student_dim": 64, "teacher_dim": 256},
                 dtype="float64", notes="small batch, teacher 4x wider"),
    ),
    flops=_rkd_flops,
))
