"""Losses between ``(B, C, H, W)`` feature maps: :func:`nst_loss` (neuron
selectivity transfer) and :func:`hcl_loss` (ReviewKD's hierarchical context loss)."""

from __future__ import annotations

import math

import numpy as np

from kdnumba import _dispatch
from kdnumba import _validation as v
from kdnumba._constants import NORM_EPS
from kdnumba.registry import BadInput, LossSpec, Variant, Workload, register

#: ReviewKD's pooled sizes, coarsest last; a level is used when it is < H.
HCL_LEVELS = (4, 2, 1)


def _maps(be, student_feats, teacher_feats):
    """Validated ``(B, C, H, W)`` kernel-side arrays (teacher cast to the student's dtype)."""
    s = be.float_array(student_feats, "student_feats", ndim=4)
    t = be.float_array(teacher_feats, "teacher_feats", ndim=4, dtype=s.dtype)
    v.check_same_batch(s, t, "student_feats", "teacher_feats")
    for arr, name in ((s, "student_feats"), (t, "teacher_feats")):
        if min(arr.shape[1:]) == 0:
            raise ValueError(f"{name} must have at least one channel and one spatial "
                             f"position, got shape {tuple(arr.shape)}")
    return s, t


def nst_loss(student_feats, teacher_feats, *, device="auto", out=None):
    r"""Neuron selectivity transfer (Huang & Wang 2017; RepDistiller ``NSTLoss``) and its gradient.

    One pair of ``(B, Cs, H, W)`` / ``(B, Ct, H, W)`` maps (channels may
    differ, ``H, W`` must agree). Each channel map is flattened over space
    (``P = H W``) and L2-normalised, ``x_hat = x / max(||x||, 1e-12)``
    (``F.normalize(dim=2)``); with the squared polynomial kernel
    ``K(x, y)_bjk = (x_hat_bk . y_hat_bj)^2``::

        loss = mean K(t, t) + mean K(s, s) - 2 mean K(s, t)
             = 1/B sum_b || S_b^T S_b / Cs - T_b^T T_b / Ct ||_F^2

    the means over ``B x C x C'`` entries (RepDistiller, ``full_loss=True``:
    the teacher-only term is included in the value; it has no gradient).
    Gradient with respect to the normalised student rows, then through the
    normalisation (``g = d loss / d s_hat_c``)::

        d loss / d S_hat_b = 4/(B Cs^2) M_ss S_hat - 4/(B Cs Ct) M_st T_hat
                           (M_ss = S_hat S_hat^T, M_st = S_hat T_hat^T)
        d loss / d s_c     = (g - s_hat_c (s_hat_c . g)) / ||s_c||   (g / 1e-12 if clamped)

    Deviations of the peer from the paper: the paper writes MMD^2 with
    ``k(x, y) = (x^T y + c)^d`` and reports ``d = 2, c = 0`` as NST's choice,
    so the kernel matches; RepDistiller additionally averages over the batch
    and average-pools a larger map down to the other's size (assuming
    square maps). Here the sizes must be equal: pool first.

    Cost: no ``B x C x C`` tensor. Per sample, either ``P x P`` Grams
    (``(Cs + Ct) P^2 / 2 + Cs P^2`` multiply-adds) or ``C x C`` Grams
    (``(1.5 Cs^2 + 0.5 Ct^2 + 2 Cs Ct) P``), whichever is less work (CPU;
    the CUDA kernel uses the ``C x C`` order); scratch memory is per
    thread, ``O(P^2 + C P)`` or ``O(C^2 + C P)`` float64
    (``kernels/cpu/featuremaps.py``).

    Args:
        student_feats: ``(B, Cs, H, W)`` float32/float64 array.
        teacher_feats: ``(B, Ct, H, W)`` float array; cast to the student's dtype.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        out: optional C-contiguous array of the student's shape and dtype to
            receive the gradient.

    Returns:
        ``(loss, grad)``: a Python float and an array of the student's shape and dtype.

    Raises:
        TypeError: non-float input.
        ValueError: not 4-D, batch or spatial mismatch, empty input, NaN/inf.
    """
    be = _dispatch.backend(device, student_feats, teacher_feats)
    s, t = _maps(be, student_feats, teacher_feats)
    if tuple(s.shape[2:]) != tuple(t.shape[2:]):
        raise ValueError(
            f"spatial size mismatch: student_feats has spatial size {tuple(s.shape[2:])}, "
            f"teacher_feats has {tuple(t.shape[2:])}; average-pool the larger map to the "
            "smaller size first (RepDistiller uses F.adaptive_avg_pool2d)")
    grad = be.gradient_buffer(out, s, (student_feats, teacher_feats, t))
    n_b, cs = s.shape[:2]
    ct = t.shape[1]
    p = math.prod(s.shape[2:])
    kernels = be.kernels("featuremaps")
    row_loss = be.empty(n_b, np.float64)
    with be.launch(n_b * (cs + ct) * p * 16):
        kernels.nst_rows(s.reshape(n_b, cs, p), t.reshape(n_b, ct, p),
                         kernels.nst_spatial(cs, ct, p), NORM_EPS, 1.0 / n_b,
                         grad.reshape(n_b, cs, p), row_loss)
    loss = be.total(row_loss)
    be.check_finite(loss, [("student_feats", s), ("teacher_feats", t)])
    return loss, be.deliver(grad, out)


def hcl_levels(h: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """ReviewKD's pooled levels for maps of height ``h`` and their weights:
    the levels of 4, 2, 1 below ``h``, weights 1/2, 1/4, 1/8 in the order used."""
    levels, weights, cnt = [], [], 1.0
    for level in HCL_LEVELS:
        if level >= h:
            continue
        cnt /= 2.0
        levels.append(level)
        weights.append(cnt)
    return tuple(levels), tuple(weights)


def hcl_loss(student_feats, teacher_feats, *, device="auto", out=None):
    r"""ReviewKD's hierarchical context loss (Chen et al. 2021; mdistiller ``hcl_loss``) and its gradient.

    One pair of ``(B, C, H, W)`` maps of equal shape. With ``pool_l`` the
    adaptive average pooling to ``l x l`` (PyTorch's bins: rows
    ``[floor(i H / l), ceil((i + 1) H / l))``, columns likewise; bins overlap
    when ``l`` does not divide the size) and the levels ``l`` of
    ``4, 2, 1`` with ``l < H`` (the peer compares with ``H`` only; ``W`` may
    be smaller than ``l``, PyTorch then repeats columns), weights
    ``w = 1/2, 1/4, 1/8`` in the order used::

        loss = (mse(s, t) + sum_l w_l mse(pool_l(s), pool_l(t))) / (1 + sum_l w_l)
        d loss / d s = (2 (s - t) / n + sum_l w_l unpool_l(2 (pool_l(s) - pool_l(t)) / n_l))
                       / (1 + sum_l w_l)

    ``mse`` is the mean over all elements (``n = B C H W``, ``n_l = B C l^2``);
    ``unpool_l`` spreads each bin's value divided by the bin's area over the
    bin (the adjoint of the pooling). The mdistiller code is the reference;
    the paper describes the same pyramid (levels ``4, 2, 1`` and halving
    weights) without the normalisation by the total weight, which the code adds.

    Args:
        student_feats: ``(B, C, H, W)`` float32/float64 array.
        teacher_feats: same shape; cast to the student's dtype.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        out: optional C-contiguous array of the student's shape and dtype to
            receive the gradient.

    Returns:
        ``(loss, grad)``: a Python float and an array of the student's shape and dtype.

    Raises:
        TypeError: non-float input.
        ValueError: not 4-D, shape mismatch, empty input, NaN/inf.
    """
    be = _dispatch.backend(device, student_feats, teacher_feats)
    s, t = _maps(be, student_feats, teacher_feats)
    v.check_same_shape(s, t, "student_feats", "teacher_feats")
    grad = be.gradient_buffer(out, s, (student_feats, teacher_feats, t))
    n_b, c, h, w = s.shape
    levels, weights = hcl_levels(h)
    total_weight = 1.0 + sum(weights)
    n_maps = n_b * c
    coefs = [1.0 / (n_maps * h * w * total_weight)]
    coefs += [wl / (n_maps * lv * lv * total_weight) for lv, wl in zip(levels, weights)]
    kernels = be.kernels("featuremaps")
    row_loss = be.empty(n_maps, np.float64)
    with be.launch(n_maps * h * w):
        kernels.hcl_rows(s.reshape(n_maps, h, w), t.reshape(n_maps, h, w),
                         be.to_device(np.array(levels or (1,), dtype=np.int64)),  # never empty
                         be.to_device(np.array(coefs, dtype=np.float64)),
                         grad.reshape(n_maps, h, w), row_loss)
    loss = be.total(row_loss)
    be.check_finite(loss, [("student_feats", s), ("teacher_feats", t)])
    return loss, be.deliver(grad, out)


# --- registry -----------------------------------------------------------------------------

def _nst_inputs(rng, dtype, *, shape=(3, 3, 2, 3), teacher_channels=4) -> dict:
    student = rng.standard_normal(shape).astype(dtype)
    b, cs, h, w = shape
    teacher = rng.standard_normal((b, teacher_channels, h, w))
    k = min(cs, teacher_channels)
    teacher[:, :k] += student[:, :k]  # related maps where the channels line up
    return {"student_feats": student, "teacher_feats": teacher.astype(dtype)}


def _hcl_inputs(rng, dtype, *, shape=(2, 3, 5, 6)) -> dict:
    student = rng.standard_normal(shape).astype(dtype)
    return {"student_feats": student,
            "teacher_feats": (student + rng.standard_normal(shape)).astype(dtype)}


def _with(**changes):
    return lambda args: {**args, **changes}


def _spatial_mismatch(args):
    t = args["teacher_feats"]
    return {**args, "teacher_feats": np.concatenate([t, t], axis=3)}


def _no_channels(args):
    return {**args, "teacher_feats": args["teacher_feats"][:, :0]}


def _nst_flops(inputs) -> int:
    """Floating-point operations of the cheaper order (see ``nst_loss``)."""
    s, t = inputs["student_feats"], inputs["teacher_feats"]
    b, cs = s.shape[:2]
    ct = t.shape[1]
    p = math.prod(s.shape[2:])
    spatial = p * (1.5 * cs + 0.5 * ct)
    channel = 1.5 * cs * cs + 0.5 * ct * ct + 2.0 * cs * ct
    return int(2 * b * p * min(spatial, channel))


register(LossSpec(
    name="nst_loss",
    function=nst_loss,
    family="featuremaps",
    make_inputs=_nst_inputs,
    reference="featuremaps:nst_loss",
    torch="featuremaps:nst_loss_torch",
    variants=(
        Variant("cs3_ct4"),
        Variant("same_channels", inputs={"teacher_channels": 3}),
        Variant("fewer_teacher_channels", inputs={"teacher_channels": 2}),
        # P = 36 > C: the C x C order is taken on the CPU.
        Variant("channel_order", inputs={"shape": (2, 3, 6, 6), "teacher_channels": 2}),
    ),
    medium={"shape": (64, 16, 4, 4), "teacher_channels": 32},
    bad_inputs=(
        BadInput("spatial mismatch", _spatial_mismatch, ValueError, "spatial size"),
        BadInput("3-D input", lambda a: {**a, "student_feats": a["student_feats"][0]},
                 ValueError, "student_feats"),
        BadInput("no teacher channels", _no_channels, ValueError, "teacher_feats"),
    ),
    workloads=(
        Workload("B512_64v128x8x8", {"shape": (512, 64, 8, 8), "teacher_channels": 128},
                 quick=True, notes="ResNet8x4 vs ResNet32x4 last stage (CIFAR), B=512"),
        # PyTorch's broadcast needs B Ct Ct P floats (2 GiB here); at (512, 128 v 256,
        # 16, 16) it asks for 32 GiB and fails, so the larger maps use fewer channels.
        Workload("B512_32v64x16x16", {"shape": (512, 32, 16, 16), "teacher_channels": 64},
                 notes="a middle stage (16x16 maps), B=512"),
    ),
    flops=_nst_flops,
))

register(LossSpec(
    name="hcl_loss",
    function=hcl_loss,
    family="featuremaps",
    make_inputs=_hcl_inputs,
    reference="featuremaps:hcl_loss",
    torch="featuremaps:hcl_loss_torch",
    variants=(
        Variant("5x6"),
        Variant("7x7", inputs={"shape": (2, 2, 7, 7)}),
        Variant("5x9", inputs={"shape": (2, 2, 5, 9)}),
        Variant("3x3", inputs={"shape": (2, 2, 3, 3)}),
        Variant("4x4_level_equal_H", inputs={"shape": (2, 2, 4, 4)}),
        Variant("9x3_W_below_level", inputs={"shape": (2, 2, 9, 3)}),
        Variant("1x1_no_levels", inputs={"shape": (2, 3, 1, 1)}),
    ),
    medium={"shape": (64, 32, 7, 7)},
    bad_inputs=(
        BadInput("shape mismatch", _spatial_mismatch, ValueError, "shape"),
        BadInput("3-D input", lambda a: {**a, "student_feats": a["student_feats"][0]},
                 ValueError, "student_feats"),
    ),
    workloads=(
        Workload("B128_256x8x8", {"shape": (128, 256, 8, 8)}, quick=True,
                 notes="ReviewKD ResNet32x4 stage (CIFAR)"),
        Workload("B128_64x32x32", {"shape": (128, 64, 32, 32)},
                 notes="ReviewKD first stage (CIFAR)"),
        Workload("B64_512x7x7", {"shape": (64, 512, 7, 7)},
                 notes="ImageNet ResNet last stage, 7x7 (bins overlap)"),
    ),
))
