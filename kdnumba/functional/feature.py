"""Feature (FitNets hint) matching as a pure function: :func:`feature_loss`."""

from __future__ import annotations

import math

import numpy as np

from kdnumba import _dispatch
from kdnumba import _validation as v
from kdnumba.registry import LossSpec, Workload, register


def feature_loss(student_feats, teacher_feats, *, device="auto", out=None):
    r"""FitNets hint loss (Romero et al. 2015; RepDistiller ``HintLoss``) and its gradient.

    With ``n`` the number of elements of the ``(B, ...)`` arrays::

        loss = 1/n * sum (s - t)^2              (torch.nn.MSELoss, reduction "mean")
        d loss / d s = 2/n * (s - t)

    Computed in one fused parallel pass, in the student's dtype, the sum
    accumulated in float64 (deterministic for any thread count).

    Args:
        student_feats: ``(B, ...)`` float32/float64 array (at least 1-D).
        teacher_feats: same shape; cast to the student's dtype. Project a
            teacher of another width first (see ``FeatureDistillationStrategy``).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        out: optional C-contiguous array of the student's shape and dtype to
            receive the gradient.

    Returns:
        ``(loss, grad)``: a Python float and an array of the student's shape and dtype.

    Raises:
        TypeError: non-float input (int, bool, float16, complex).
        ValueError: shape/batch mismatch, empty batch, NaN/inf.
    """
    be = _dispatch.backend(device, student_feats, teacher_feats)
    s = be.float_array(student_feats, "student_feats")
    t = be.float_array(teacher_feats, "teacher_feats", dtype=s.dtype)
    v.check_same_shape(s, t, "student_feats", "teacher_feats")
    grad = be.gradient_buffer(out, s, (student_feats, teacher_feats, t))
    loss = squared_error_into(be, s, t, grad, ("student_feats", "teacher_feats"))
    return loss, be.deliver(grad, out)


def squared_error_into(be, s, t, grad, names) -> float:
    """``mean (s - t)^2`` of validated same-shape kernel-side arrays on backend
    ``be``, its gradient ``2 (s - t) / n`` written into ``grad``; a non-finite
    result raises ``ValueError`` naming ``names[0]`` or ``names[1]``."""
    kernels = be.kernels("feature")
    n = math.prod(s.shape)
    partial = be.empty(kernels.n_chunks(n), np.float64)
    with be.launch(n):
        kernels.sq_diff_chunks(s.reshape(n), t.reshape(n), np.dtype(s.dtype).type(2.0 / n),
                               grad.reshape(n), partial)
    loss = be.total(partial) / n
    be.check_finite(loss, [(names[0], s), (names[1], t)])
    return loss


def _feature_inputs(rng, dtype, *, shape=(6, 3, 2, 2)) -> dict:
    student = rng.standard_normal(shape).astype(dtype)
    return {"student_feats": student,
            "teacher_feats": (student + rng.standard_normal(shape)).astype(dtype)}


register(LossSpec(
    name="feature_loss",
    function=feature_loss,
    family="feature",
    make_inputs=_feature_inputs,
    reference="feature:feature_loss",
    torch="feature:feature_loss_torch",
    medium={"shape": (64, 32, 4, 4)},
    workloads=(
        Workload("256x256x16x16", {"shape": (256, 256, 16, 16)},
                 notes="FitNets hint on a (B, C, H, W) map, 64 MiB per input"),
        Workload("256x768", {"shape": (256, 768)}, notes="small call: per-call overhead"),
    ),
))
