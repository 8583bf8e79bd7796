"""Attention-based KD as pure functions: :func:`attention_transfer` (CNN feature
maps) and :func:`attention_map_loss` (transformer attention tensors)."""

from __future__ import annotations

import math

import numpy as np

from kdnumba import _dispatch
from kdnumba import _validation as v
from kdnumba._constants import NORM_EPS, ROW_SUM_TOL
from kdnumba.functional.feature import squared_error_into
from kdnumba.functional.response import kd_loss
from kdnumba.registry import BadInput, LossSpec, Variant, Workload, register

AT_VARIANTS = ("repdistiller", "paper")
MAP_KINDS = ("mse", "kl")
MAP_INPUTS = ("probs", "logits")


def attention_transfer(student_feats, teacher_feats, *, p=2, variant="repdistiller",
                       pool=False, device="auto", out=None):
    r"""Attention transfer (Zagoruyko & Komodakis 2017) and its exact gradient.

    Features are ``(B, C, *spatial)``; channel counts may differ between
    student and teacher (the map averages channels away), spatial sizes must
    agree (or see ``pool``). With ``S`` the number of spatial positions:

    ``variant="repdistiller"`` (default; RepDistiller ``AT.py`` and the
    authors' code, ``(at(s) - at(t)).pow(2).mean()``)::

        a(f)_b = normalize(mean_c f_bc^p)                  (flattened over space)
        loss   = 1/(B S) * sum_b sum_j (a(s)_bj - a(t)_bj)^2

    ``variant="paper"`` (eq. 2 of the paper without its ``beta/2``, which is
    the caller's weight): channel *sum* of ``|f|^p`` and the (not squared)
    Euclidean norm of the difference, averaged over the batch::

        a(f)_b = normalize(sum_c |f_bc|^p)
        loss   = 1/B * sum_b || a(s)_b - a(t)_b ||_2

    ``normalize(q) = q / max(||q||_2, 1e-12)`` exactly as ``F.normalize``.
    Gradient, per sample, with ``g = d loss / d a(s)`` (``2 (a(s)-a(t))/(B S)``,
    or ``(a(s)-a(t)) / (B ||a(s)-a(t)||)``, 0 where that norm is 0)::

        d loss / d q = (g - a (a . g)) / ||q||     (||q|| >= 1e-12; else g / 1e-12)
        d loss / d f_cj = k * d loss/d q_j * p f_cj^(p-1)     (k = 1/C, or 1)
                        (paper: p |f_cj|^(p-1) sign(f_cj))

    Args:
        student_feats: ``(B, Cs, *spatial)`` float array, at least 3-D.
        teacher_feats: ``(B, Ct, *spatial')`` float array; cast to the student's dtype.
        p: the power, an integer >= 1 (2 in both papers' experiments).
        variant: ``"repdistiller"`` or ``"paper"`` (see above).
        pool: if the spatial sizes differ, average-pool the larger map down
            to the smaller one (each axis' sizes must divide; this equals
            ``F.adaptive_avg_pool2d`` for such sizes, as RepDistiller does).
            The student's gradient is chained back through its pooling. The
            default ``False`` raises on a mismatch instead. (CPU only for now:
            on CUDA, unequal sizes raise ``NotImplementedError``.)
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        out: optional C-contiguous array of the student's shape and dtype to
            receive the gradient.

    Returns:
        ``(loss, grad)``, ``grad`` of the student's shape and dtype.

    Raises:
        TypeError: non-float input, non-integer ``p``, non-bool ``pool``.
        ValueError: batch or rank mismatch, spatial mismatch (without
            ``pool``, or sizes that do not divide), empty input, NaN/inf,
            ``p < 1``, unknown ``variant``.
    """
    p = v.check_int(p, "p", minimum=1)
    if variant not in AT_VARIANTS:
        raise ValueError(f"variant must be one of {AT_VARIANTS}, got {variant!r}")
    if not isinstance(pool, (bool, np.bool_)):
        raise TypeError(f"pool must be True or False, got {pool!r}")
    be = _dispatch.backend(device, student_feats, teacher_feats)
    s = be.float_array(student_feats, "student_feats", min_ndim=3)
    t = be.float_array(teacher_feats, "teacher_feats", min_ndim=3, dtype=s.dtype)
    v.check_same_batch(s, t, "student_feats", "teacher_feats")
    if len(s.shape) != len(t.shape):
        raise ValueError(f"student_feats {tuple(s.shape)} and teacher_feats {tuple(t.shape)} "
                         "must both be (B, C, *spatial) with the same number of spatial axes")
    s_factors, t_factors = _pool_factors(tuple(s.shape[2:]), tuple(t.shape[2:]), pool)
    grad = be.gradient_buffer(out, s, (student_feats, teacher_feats, t))
    kernels = be.kernels("attention")
    s_in = _pooled(be, kernels, s, s_factors)
    t_in = _pooled(be, kernels, t, t_factors)
    g_in = grad if s_in is s else be.empty(tuple(s_in.shape), s.dtype)

    n_rows = s.shape[0]
    n_sp = math.prod(s_in.shape[2:])
    paper = variant == "paper"
    row_loss = be.empty(n_rows, np.float64)
    # ``work`` counts the larger map's elements, not both maps': the serial
    # build stays faster up to about twice the serial-below threshold for
    # this light loop (32k-element maps: 54 us serial, 109-144 us through the
    # parallel build; measured on 2 cores, issue 16).
    with be.launch(n_rows * max(s_in.shape[1], t_in.shape[1]) * n_sp):
        kernels.at_rows(s_in.reshape(n_rows, s_in.shape[1], n_sp),
                        t_in.reshape(n_rows, t_in.shape[1], n_sp), p, paper, not paper, paper,
                        NORM_EPS, 1.0 / n_rows if paper else 1.0 / (n_rows * n_sp),
                        g_in.reshape(n_rows, s_in.shape[1], n_sp), row_loss)
    loss = be.total(row_loss)
    be.check_finite(loss, [("student_feats", s), ("teacher_feats", t)],
                    what="the attention maps (f^p)")
    if g_in is not grad:
        kernels.avg_unpool(g_in, s_factors, grad)
    return loss, be.deliver(grad, out)


def _pooled(be, kernels, x, factors):
    """``x`` average-pooled by ``factors`` (itself when they are all 1)."""
    if all(k == 1 for k in factors):
        return x
    shape = tuple(x.shape[:2]) + tuple(n // k for n, k in zip(x.shape[2:], factors))
    pooled = be.empty(shape, x.dtype)
    kernels.avg_pool(x, factors, pooled)
    return pooled


def _pool_factors(s_sp, t_sp, pool):
    """Per-axis pooling factors ``(student, teacher)`` that equalise the spatial sizes."""
    if s_sp == t_sp:
        ones = (1,) * len(s_sp)
        return ones, ones
    if not pool:
        raise ValueError(
            f"spatial size mismatch: student_feats has spatial size {s_sp}, teacher_feats "
            f"has {t_sp}; resize one of them, or pass pool=True to average-pool the larger "
            "map down to the smaller (as RepDistiller does)")
    s_f, t_f = [], []
    for axis, (a, b) in enumerate(zip(s_sp, t_sp)):
        if a % b == 0:
            s_f.append(a // b)
            t_f.append(1)
        elif b % a == 0:
            s_f.append(1)
            t_f.append(b // a)
        else:
            raise ValueError(
                f"pool=True needs spatial sizes that divide each other, but axis {axis + 2} "
                f"has {a} (student_feats) and {b} (teacher_feats)")
    return tuple(s_f), tuple(t_f)


def attention_map_loss(student_attn, teacher_attn, *, kind="mse", inputs="probs", device="auto",
                       out=None):
    r"""Match transformer attention maps ``(B, heads, L_q, L_k)`` (any ``(B, ..., L)``).

    ``kind="mse"`` (TinyBERT's attention loss; AiDotNet's default): mean over
    all elements of ``(s - t)^2``, gradient ``2 (s - t) / n`` -- the same
    function as :func:`kdnumba.functional.feature_loss`. It compares the
    arrays as given, whatever ``inputs`` says. TinyBERT matches the
    *unnormalised* scores and replaces masked positions (scores <= -100) by
    0 first; do that masking yourself (inf/NaN are rejected).

    ``kind="kl"`` (MiniLM-style): KL divergence from the teacher's to the
    student's distribution over the last axis, averaged over all ``R`` rows
    (``R = B * heads * L_q``)::

        loss = 1/R * sum_r sum_j t_rj (log t_rj - log s_rj)

    * ``inputs="probs"``: the arrays are attention probabilities (rows
      non-negative, summing to 1 within 1e-3; checked). Terms with
      ``t_rj = 0`` are 0 (``0 log 0 = 0``, so masked keys that both models
      give probability 0 cost nothing). The student is clamped below at
      ``1e-12`` inside the log, so an exact 0 where the teacher has mass
      gives a large finite loss, not inf; the gradient is
      ``-t_rj / (R s_rj)`` where ``s_rj >= 1e-12`` and 0 where the clamp
      is active (the clamped function is flat there).
    * ``inputs="logits"``: the arrays are pre-softmax scores; ``s`` and
      ``t`` are replaced by ``softmax`` of each row (stable log-sum-exp, no
      clamp needed) and the gradient with respect to the scores is
      ``(softmax(s_r) - softmax(t_r)) / R`` -- ``kd_loss`` at ``T = 1``
      over the rows. Mask with a large negative finite score (e.g. -1e4),
      not ``-inf``.

    Args:
        student_attn, teacher_attn: float arrays of the same shape, at least
            2-D; the teacher is cast to the student's dtype.
        kind: ``"mse"`` or ``"kl"``.
        inputs: ``"probs"`` or ``"logits"`` (used by ``kind="kl"``).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        out: optional C-contiguous array of the student's shape and dtype to
            receive the gradient.

    Returns:
        ``(loss, grad)``, ``grad`` of the student's shape and dtype.

    Raises:
        TypeError: non-float input.
        ValueError: shape mismatch, empty input, NaN/inf, unknown
            ``kind``/``inputs``, and with ``kind="kl", inputs="probs"``
            negative entries or rows not summing to 1.
    """
    if kind not in MAP_KINDS:
        raise ValueError(f"kind must be one of {MAP_KINDS}, got {kind!r}")
    if inputs not in MAP_INPUTS:
        raise ValueError(f"inputs must be one of {MAP_INPUTS}, got {inputs!r}")
    be = _dispatch.backend(device, student_attn, teacher_attn)
    s = be.float_array(student_attn, "student_attn", min_ndim=2)
    t = be.float_array(teacher_attn, "teacher_attn", min_ndim=2, dtype=s.dtype)
    v.check_same_shape(s, t, "student_attn", "teacher_attn")
    grad = be.gradient_buffer(out, s, (student_attn, teacher_attn, t))
    names = ("student_attn", "teacher_attn")
    if kind == "mse":
        loss = squared_error_into(be, s, t, grad, names)
        return loss, be.deliver(grad, out)
    shape = tuple(s.shape)
    n_cols = shape[-1]
    n_rows = math.prod(shape) // n_cols
    s2, t2, g2 = (x.reshape(n_rows, n_cols) for x in (s, t, grad))
    if inputs == "logits":  # kd_loss at T = 1 over the rows, its gradient into ours
        try:
            loss, _ = kd_loss(s2, t2, None, temperature=1.0, alpha=0.0, device=be.device,
                              out=g2)
        except ValueError:  # name our arguments, not kd_loss's
            v.raise_non_finite([(names[0], be.to_host(s)), (names[1], be.to_host(t))])
        return loss, be.deliver(grad, out)
    dtype = np.dtype(s.dtype)
    row_loss = be.empty(n_rows, np.float64)
    with be.launch(n_rows * n_cols):
        be.kernels("attention").kl_prob_rows(s2, t2, dtype.type(NORM_EPS),
                                             dtype.type(1.0 / n_rows), g2, row_loss)
    loss = be.total(row_loss) / n_rows
    if not np.isfinite(loss):  # a row that is not a probability vector, or NaN/inf
        _diagnose_probs(be.to_host(s2), be.to_host(t2), shape)
    return loss, be.deliver(grad, out)


def _diagnose_probs(s2, t2, shape) -> None:
    """Error path of ``kind="kl", inputs="probs"`` (host copies of the ``(R, L)``
    rows): raise ``ValueError`` naming the argument and the row at fault."""
    inputs = [("student_attn", s2), ("teacher_attn", t2)]
    if v.first_non_finite(inputs) is not None:
        v.raise_non_finite(inputs)
    for x, name in ((s2, "student_attn"), (t2, "teacher_attn")):
        negative = np.minimum(x, 0).sum(axis=1, dtype=np.float64)
        if negative.min() < 0:
            row = _row_index(int(np.argmin(negative)), shape)
            raise ValueError(f"{name} must hold probabilities (inputs='probs'), found a "
                             f"negative entry in row {row}; pass inputs='logits' for scores")
    for x, name in ((s2, "student_attn"), (t2, "teacher_attn")):
        sums = x.sum(axis=1, dtype=np.float64)
        err = np.abs(sums - 1.0)
        row = int(np.argmax(err))
        if err[row] > ROW_SUM_TOL:
            raise ValueError(
                f"{name} rows must be probability vectors over the last axis "
                f"(inputs='probs'), row {_row_index(row, shape)} sums to "
                f"{sums[row]:.6g}; pass inputs='logits' for scores")
    v.raise_non_finite([], what="the loss")


def _row_index(flat: int, shape) -> str:
    """A flat row number as an index into the leading axes, e.g. ``(0, 3, 5)``."""
    return str(tuple(int(i) for i in np.unravel_index(flat, shape[:-1])))


# --- registry entries ----------------------------------------------------------------

def _at_inputs(rng, dtype, *, shape=(3, 4, 3, 5), teacher_channels=None,
               teacher_spatial=None) -> dict:
    """Features ``(B, C, *spatial)`` and a related teacher: the student's channels
    (cycled to ``teacher_channels``), block-averaged down to ``teacher_spatial``
    if given, plus noise."""
    student = rng.standard_normal(shape)
    teacher = student[:, np.arange(teacher_channels or shape[1]) % shape[1]]
    if teacher_spatial is not None:
        blocks = list(teacher.shape[:2])
        for n, m in zip(shape[2:], teacher_spatial):
            blocks += [m, n // m]
        teacher = teacher.reshape(blocks).mean(axis=tuple(range(3, len(blocks), 2)))
    teacher = teacher + 0.5 * rng.standard_normal(teacher.shape)
    return {"student_feats": student.astype(dtype), "teacher_feats": teacher.astype(dtype)}


def _map_inputs(rng, dtype, *, shape=(2, 2, 3, 5), probs=True) -> dict:
    """Attention scores ``(B, heads, L_q, L_k)`` (teacher = student + noise), as
    probabilities (softmax over the last axis) unless ``probs=False``."""
    student = 2.0 * rng.standard_normal(shape)
    teacher = student + rng.standard_normal(shape)
    if probs:
        student, teacher = (np.exp(x - x.max(axis=-1, keepdims=True)) for x in (student, teacher))
        student /= student.sum(axis=-1, keepdims=True)
        teacher /= teacher.sum(axis=-1, keepdims=True)
    return {"student_attn": student.astype(dtype), "teacher_attn": teacher.astype(dtype)}


def _with(arguments: dict, **changes) -> dict:
    return {**arguments, **changes}


def _changed(arguments: dict, name: str, change) -> dict:
    """``arguments`` with ``name`` replaced by ``change`` applied to a copy of it."""
    value = arguments[name].copy()
    return {**arguments, name: change(value)}


def _negative_entry(x):
    x.flat[1] -= 0.5 + x.flat[1]  # -0.5: the row no longer sums to 1 either
    return x


register(LossSpec(
    name="attention_transfer",
    function=attention_transfer,
    family="attention",
    make_inputs=_at_inputs,
    reference="attention:attention_transfer",
    torch="attention:attention_transfer_torch",
    variants=(
        Variant("p=2, RepDistiller"),
        Variant("paper variant, p=3, wider teacher", {"variant": "paper", "p": 3},
                {"teacher_channels": 6}),
        Variant("pool: student map 2x the teacher's", {"pool": True},
                {"shape": (3, 4, 4, 6), "teacher_spatial": (2, 3)},
                devices=("cpu",)),  # pooling of unequal maps is CPU-only so far
    ),
    medium={"shape": (16, 32, 8, 8)},
    bad_inputs=(
        BadInput("spatial sizes differ, no pool",
                 lambda a: _with(a, teacher_feats=a["teacher_feats"][:, :, :1]), ValueError,
                 "spatial size mismatch.*pool=True"),
        BadInput("pool with sizes that do not divide",
                 lambda a: _with(a, teacher_feats=a["teacher_feats"][:, :, :2], pool=True),
                 ValueError, "divide each other"),
        BadInput("different numbers of spatial axes",
                 lambda a: _with(a, teacher_feats=a["teacher_feats"].reshape(
                     a["teacher_feats"].shape[:2] + (-1,))),
                 ValueError, "same number of spatial axes"),
        BadInput("2-D features",
                 lambda a: _with(a, student_feats=a["student_feats"][:, :, 0, 0],
                                 teacher_feats=a["teacher_feats"][:, :, 0, 0]),
                 ValueError, "at least 3 dimensions"),
        BadInput("p = 0", lambda a: _with(a, p=0), ValueError, "p must be >= 1"),
        BadInput("p = 2.5", lambda a: _with(a, p=2.5), TypeError, "p must be an integer"),
        BadInput("p = True", lambda a: _with(a, p=True), TypeError, "p must be an integer"),
        BadInput("unknown variant", lambda a: _with(a, variant="zk"), ValueError, "variant"),
        BadInput("pool = 1", lambda a: _with(a, pool=1), TypeError,
                 "pool must be True or False"),
    ),
    workloads=(
        Workload("256x256x16x16", {"shape": (256, 256, 16, 16)}, quick=True,
                 notes="headline: RepDistiller AT, p=2, 64 MiB per input"),
        Workload("256x256x16x16", {"shape": (256, 256, 16, 16)}, dtype="float64",
                 notes="float64"),
        Workload("64x32x8x8", {"shape": (64, 32, 8, 8), "teacher_channels": 64},
                 notes="small call; teacher has twice the channels"),
    ),
))

register(LossSpec(
    name="attention_map_loss",
    function=attention_map_loss,
    family="attention",
    make_inputs=_map_inputs,
    reference="attention:attention_map_loss",
    torch="attention:attention_map_loss_torch",
    variants=(
        Variant("mse (TinyBERT)", {"kind": "mse"}),
        Variant("kl, probabilities", {"kind": "kl"}),
        Variant("kl, logits", {"kind": "kl", "inputs": "logits"}, {"probs": False}),
    ),
    medium={"shape": (4, 4, 32, 64)},
    # kind="kl" on probabilities: at student == teacher the gradient is -t/s/N per
    # entry (only its projection on the simplex vanishes), so not for every variant.
    zero_when_equal=False,
    bad_inputs=(
        BadInput("unknown kind", lambda a: _with(a, kind="cos"), ValueError, "kind"),
        BadInput("unknown inputs", lambda a: _with(a, inputs="p"), ValueError, "inputs"),
        BadInput("last axes differ",
                 lambda a: _with(a, teacher_attn=a["teacher_attn"][..., :-1]), ValueError,
                 "shape mismatch"),
        BadInput("1-D maps",
                 lambda a: _with(a, student_attn=a["student_attn"].ravel(),
                                 teacher_attn=a["teacher_attn"].ravel()),
                 ValueError, "at least 2 dimensions"),
        BadInput("kl: negative student probability",
                 lambda a: _changed({**a, "kind": "kl"}, "student_attn", _negative_entry),
                 ValueError, "student_attn must hold probabilities.*negative"),
        BadInput("kl: negative teacher probability",
                 lambda a: _changed({**a, "kind": "kl"}, "teacher_attn", _negative_entry),
                 ValueError, "teacher_attn must hold probabilities.*negative"),
        BadInput("kl: student rows not summing to 1",
                 lambda a: _changed({**a, "kind": "kl"}, "student_attn", lambda x: 0.9 * x),
                 ValueError, "student_attn rows must be probability vectors"),
    ),
    workloads=(
        Workload("32x12x128x128", {"shape": (32, 12, 128, 128)}, options={"kind": "kl"},
                 notes="BERT-base attention probabilities, KL over rows"),
    ),
))
