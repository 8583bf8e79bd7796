"""Attention-based KD as pure functions: :func:`attention_transfer` (CNN feature
maps) and :func:`attention_map_loss` (transformer attention tensors)."""

from __future__ import annotations

import math

import numpy as np

from kdnumba import _dispatch, _policy
from kdnumba import _validation as v
from kdnumba.functional.feature import squared_error_into
from kdnumba.functional.response import kd_loss
from kdnumba.kernels.cpu.reductions import ordered_sum

#: ``F.normalize``'s default clamp of the norm, and the probability clamp of
#: the KL attention-map loss.
EPS = 1e-12
AT_VARIANTS = ("repdistiller", "paper")
MAP_KINDS = ("mse", "kl")
MAP_INPUTS = ("probs", "logits")
#: Tolerance on row sums of attention probabilities.
_ROW_SUM_TOL = 1e-3


def attention_transfer(student_feats, teacher_feats, *, p=2, variant="repdistiller",
                       pool=False, device="auto"):
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
            default ``False`` raises on a mismatch instead.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.

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
    target = _dispatch.resolve_device(device, student_feats, teacher_feats)
    if target == "cuda":
        from kdnumba import _cuda_paths  # imports numba.cuda: CUDA path only
        return _cuda_paths.attention_transfer(student_feats, teacher_feats, p=p,
                                              variant=variant, pool=pool)
    s = v.as_float_array(student_feats, "student_feats", min_ndim=3)
    t = v.as_float_array(teacher_feats, "teacher_feats", min_ndim=3, dtype=s.dtype)
    v.check_same_batch(s, t, "student_feats", "teacher_feats")
    if s.ndim != t.ndim:
        raise ValueError(f"student_feats {s.shape} and teacher_feats {t.shape} must both be "
                         "(B, C, *spatial) with the same number of spatial axes")
    s_factors, t_factors = _pool_factors(s.shape[2:], t.shape[2:], pool)
    s_in = _avg_pool(s, s_factors)
    t_in = _avg_pool(t, t_factors)

    n_rows = s.shape[0]
    n_sp = math.prod(s_in.shape[2:])
    s3 = s_in.reshape(n_rows, s_in.shape[1], n_sp)
    t3 = t_in.reshape(n_rows, t_in.shape[1], n_sp)
    grad = np.empty_like(s3)
    row_loss = np.empty(n_rows, dtype=np.float64)
    paper = variant == "paper"
    kernels = _dispatch.kernels("attention", target)
    with _policy.kernel_launch():
        kernels.at_rows(s3, t3, p, paper, not paper, paper, EPS,
                        1.0 / n_rows if paper else 1.0 / (n_rows * n_sp), grad, row_loss)
    loss = ordered_sum(row_loss)
    if not np.isfinite(loss):
        v.raise_non_finite([("student_feats", s), ("teacher_feats", t)],
                           what="the attention maps (f^p)")
    return float(loss), _avg_unpool(grad.reshape(s_in.shape), s_factors)


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


def _block_shape(shape, factors):
    """Shape ``(B, C, n0, k0, n1, k1, ...)`` splitting each spatial axis in blocks."""
    out = list(shape[:2])
    for size, k in zip(shape[2:], factors):
        out += [size // k, k]
    return out


def _avg_pool(x: np.ndarray, factors) -> np.ndarray:
    """Mean over non-overlapping blocks of ``factors`` along the spatial axes."""
    if all(k == 1 for k in factors):
        return x
    block_axes = tuple(range(3, 2 + 2 * len(factors), 2))
    pooled = x.reshape(_block_shape(x.shape, factors)).mean(axis=block_axes, dtype=x.dtype)
    return np.ascontiguousarray(pooled)


def _avg_unpool(g: np.ndarray, factors) -> np.ndarray:
    """Adjoint of :func:`_avg_pool`: each block receives ``g / prod(factors)``."""
    if all(k == 1 for k in factors):
        return g
    full = [n * k for n, k in zip(g.shape[2:], factors)]
    blocks = _block_shape(list(g.shape[:2]) + full, factors)
    expanded = list(blocks)
    for i in range(len(factors)):
        expanded[3 + 2 * i] = 1
    scale = g.dtype.type(1.0 / math.prod(factors))
    out = np.broadcast_to(g.reshape(expanded) * scale, blocks)
    return np.ascontiguousarray(out).reshape(list(g.shape[:2]) + full)


def attention_map_loss(student_attn, teacher_attn, *, kind="mse", inputs="probs", device="auto"):
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
    target = _dispatch.resolve_device(device, student_attn, teacher_attn)
    if target == "cuda":
        from kdnumba import _cuda_paths  # imports numba.cuda: CUDA path only
        return _cuda_paths.attention_map_loss(student_attn, teacher_attn, kind=kind,
                                              inputs=inputs)
    s = v.as_float_array(student_attn, "student_attn", min_ndim=2)
    t = v.as_float_array(teacher_attn, "teacher_attn", min_ndim=2, dtype=s.dtype)
    v.check_same_shape(s, t, "student_attn", "teacher_attn")
    if kind == "mse":
        grad = np.empty_like(s)
        loss = squared_error_into(_dispatch.backend("cpu"), s, t, grad,
                                  ("student_attn", "teacher_attn"))
        return loss, grad
    n_cols = s.shape[-1]
    s2 = s.reshape(-1, n_cols)
    t2 = t.reshape(-1, n_cols)
    if inputs == "logits":
        try:
            loss, grad = kd_loss(s2, t2, None, temperature=1.0, alpha=0.0, device=target)
        except ValueError:  # name our arguments, not kd_loss's
            v.raise_non_finite([("student_attn", s), ("teacher_attn", t)])
        return loss, grad.reshape(s.shape)
    return _kl_probs(s2, t2, target, s.shape)


def _kl_probs(s2, t2, target, shape):
    n_rows = s2.shape[0]
    grad = np.empty_like(s2)
    row_loss = np.empty(n_rows, dtype=np.float64)
    stats = np.empty((n_rows, 4), dtype=np.float64)
    scalar = s2.dtype.type
    kernels = _dispatch.kernels("attention", target)
    with _policy.kernel_launch():
        kernels.kl_prob_rows(s2, t2, scalar(EPS), scalar(1.0 / n_rows), grad, row_loss, stats)
    if not np.isfinite(stats).all():
        v.raise_non_finite([("student_attn", s2), ("teacher_attn", t2)])
    # columns 2, 3 are negative iff a row holds a negative entry
    for col, name in ((2, "student_attn"), (3, "teacher_attn")):
        if stats[:, col].min() < 0:
            row = _row_index(int(np.argmin(stats[:, col])), shape)
            raise ValueError(f"{name} must hold probabilities (inputs='probs'), found a "
                             f"negative entry in row {row}; pass inputs='logits' for scores")
    for col, name in ((0, "student_attn"), (1, "teacher_attn")):
        err = np.abs(stats[:, col] - 1.0)
        row = int(np.argmax(err))
        if err[row] > _ROW_SUM_TOL:
            raise ValueError(
                f"{name} rows must be probability vectors over the last axis "
                f"(inputs='probs'), row {_row_index(row, shape)} sums to "
                f"{stats[row, col]:.6g}; pass inputs='logits' for scores")
    loss = ordered_sum(row_loss) / n_rows
    return float(loss), grad.reshape(shape)


def _row_index(flat: int, shape) -> str:
    """A flat row number as an index into the leading axes, e.g. ``(0, 3, 5)``."""
    return str(tuple(int(i) for i in np.unravel_index(flat, shape[:-1])))
