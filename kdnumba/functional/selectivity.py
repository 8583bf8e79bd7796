r"""Neuron-selectivity distillation as pure functions.

For activations ``a`` of shape ``(B, N)`` (``B`` samples, ``N`` neurons; any
``(B, ...)`` input is flattened to ``(B, N)``), each neuron ``j`` gets a
statistic over the batch, and the loss matches the student's to the
teacher's::

    loss = 1/N * sum_j (sel_j(student) - sel_j(teacher))**2

Statistics (see ``docs/selectivity.md`` for derivations and advice):

* ``variance``: ``var_j = 1/B sum_i (a_ij - mean_j)**2`` (population, ddof=0;
  ``B = 1`` gives 0 and a zero gradient).
* ``sparsity``: the hard fraction ``1/B #{i: |a_ij| < threshold}`` has zero
  gradient almost everywhere; the loss uses its relaxation
  ``1/B sum_i sigmoid(sharpness * (1 - |a_ij| / threshold))``, which tends to
  the hard fraction as ``sharpness -> inf`` (for values not exactly at the
  threshold).
* ``peak_to_average``: ``max_i a_ij / (1/B sum_i |a_ij| + eps)``.

Gradients (``c_j = 2/N (sel_j(s) - sel_j(t))``, ``sign(0) = 0``)::

    variance:         c_j * 2/B * (s_ij - mean_j)
    sparsity:         c_j * 1/B * sigmoid'(z_ij) * (-k) * sign(s_ij),
                      z = k (threshold - |s|), k = sharpness / threshold
    peak_to_average:  c_j * ([i == i*_j] / D_j - M_j sign(s_ij) / (B D_j**2)),
                      M_j = max_i s_ij, i*_j its first row, D_j = mean|s_j| + eps
"""

from __future__ import annotations

import enum
import math
from typing import NamedTuple

import numpy as np

from kdnumba import _dispatch, _policy
from kdnumba import _validation as v
from kdnumba.kernels.cpu.reductions import ordered_sum

#: Default threshold of "near zero" (AiDotNet's 0.01).
DEFAULT_THRESHOLD = 0.01
#: Default sharpness of the sparsity relaxation (dimensionless; the sigmoid's
#: slope is ``sharpness / threshold``).
DEFAULT_SHARPNESS = 10.0
#: Default epsilon of the peak-to-average denominator.
DEFAULT_EPS = 1e-8


class SelectivityMetric(enum.StrEnum):
    """Per-neuron statistic matched by selectivity distillation.

    Members compare equal to their string values, so ``metric="variance"``
    and ``metric=SelectivityMetric.VARIANCE`` are interchangeable.

    * ``VARIANCE`` -- population variance over the batch.
    * ``SPARSITY`` -- fraction of near-zero activations (``|a| < threshold``),
      relaxed by a sigmoid for the loss.
    * ``PEAK_TO_AVERAGE`` -- ``max a / (mean |a| + eps)``.
    """

    VARIANCE = "variance"
    SPARSITY = "sparsity"
    PEAK_TO_AVERAGE = "peak_to_average"

    @classmethod
    def parse(cls, metric) -> SelectivityMetric:
        """``metric`` as a member: a member, its value or its name (any case;
        AiDotNet's ``"PeakToAverage"`` spelling is accepted too)."""
        return v.parse_choice(metric, cls, "metric",
                              {"peaktoaverage": "peak_to_average", "peak": "peak_to_average"})


class SelectivityStatistics(NamedTuple):
    """Per-neuron statistics of one activation batch (float64 arrays of the
    per-sample shape ``acts.shape[1:]``; ``argmax`` is int64).

    Attributes:
        mean: ``mean_i a_ij``.
        variance: population variance ``mean_i (a_ij - mean_j)**2``.
        sparsity: hard fraction ``mean_i [|a_ij| < threshold]``.
        sparsity_relaxed: ``mean_i sigmoid(sharpness * (1 - |a_ij| / threshold))``
            (what the ``"sparsity"`` loss matches).
        peak_to_average: ``peak_j / (mean_abs_j + eps)``.
        peak: ``max_i a_ij``.
        argmax: the first row ``i`` attaining ``peak_j``.
        mean_abs: ``mean_i |a_ij|``.
    """

    mean: np.ndarray
    variance: np.ndarray
    sparsity: np.ndarray
    sparsity_relaxed: np.ndarray
    peak_to_average: np.ndarray
    peak: np.ndarray
    argmax: np.ndarray
    mean_abs: np.ndarray


def _as_batch(x, name: str, dtype=None) -> np.ndarray:
    """``x`` as a C-contiguous float array of rank >= 2 (one row per sample)."""
    arr = v.as_float_array(x, name, dtype=dtype)
    if arr.ndim < 2:
        raise ValueError(
            f"{name} must have shape (B, N) or (B, ...) with one row per sample, got shape "
            f"{arr.shape}; reshape to (B, 1) for a single neuron or (1, N) for a single sample")
    return arr


def _check_pair(s: np.ndarray, t: np.ndarray) -> None:
    if s.shape[0] != t.shape[0]:
        raise ValueError(
            f"batch size mismatch: student_acts has {s.shape[0]} rows, teacher_acts has "
            f"{t.shape[0]}; both must hold the activations of the same samples")
    n_s = s.size // s.shape[0]
    n_t = t.size // t.shape[0]
    if n_s != n_t:
        raise ValueError(
            f"neuron count mismatch: student_acts has {n_s} neurons per sample (shape "
            f"{s.shape}), teacher_acts has {n_t} (shape {t.shape}); selectivity is compared "
            "neuron by neuron, so project the activations to a common width first (e.g. a "
            "learned linear map on the student's side) or choose layers with the same "
            "number of units")
    if s.shape[1:] != t.shape[1:]:
        raise ValueError(
            f"layout mismatch: student_acts has per-sample shape {s.shape[1:]}, teacher_acts "
            f"{t.shape[1:]}; neurons are matched by position after flattening, so reshape "
            "(or transpose) one of them explicitly to the other's layout")


def _check_relaxation(threshold, sharpness, eps) -> tuple[float, float, float]:
    return (v.check_positive(threshold, "threshold"),
            v.check_positive(sharpness, "sharpness"),
            v.check_positive(eps, "eps"))


def _column_stats(kernels, a: np.ndarray, b: np.ndarray | None, flags: int,
                  threshold: float, sharpness: float, eps: float):
    """``(stats, argmax)`` of ``a`` (and ``b``): ``(M, N_STATS, N)`` float64 and
    ``(M, N)`` int64, ``M`` = 1 or 2 (one parallel launch for both)."""
    n_rows, n_cols = a.shape
    n_mats = 1 if b is None else 2
    col_block, rows = kernels.plan(n_rows, n_cols)
    n_ch = kernels.n_chunks(n_rows, rows)
    # Scratch of statistics not requested is never written, so np.empty costs
    # no memory traffic (its pages are never touched).
    part = np.empty((n_mats, n_ch, kernels.N_PARTIALS, n_cols), np.float64)
    p_max = np.empty((n_mats, n_ch, n_cols), a.dtype)
    p_arg = np.empty((n_mats, n_ch, n_cols), np.int32)  # offsets within a chunk
    stats = np.empty((n_mats, kernels.N_STATS, n_cols), np.float64)
    argmax = np.empty((n_mats, n_cols), np.int64)
    scalar = a.dtype.type
    # ``work`` for the serial-below threshold, in kd_loss-element units: the
    # variance and peak statistics cost a fraction of kd_loss's exps per
    # element, the relaxed sparsity about the same.
    work = a.size * (n_mats if flags & kernels.WANT_SPARSITY else 1)
    with _policy.kernel_launch(work):
        kernels.column_stats(a, a if b is None else b, n_mats, flags, float(threshold),
                             scalar(sharpness), scalar(sharpness / threshold), eps,
                             col_block, rows, part, p_max, p_arg, stats, argmax)
    return stats, argmax


def selectivity_statistics(acts, *, threshold=DEFAULT_THRESHOLD, sharpness=DEFAULT_SHARPNESS,
                           eps=DEFAULT_EPS, device="auto") -> SelectivityStatistics:
    r"""Per-neuron selectivity statistics of a batch of activations (analysis).

    For ``acts`` of shape ``(B, ...)`` (``N`` neurons per sample), computes in
    one pass over memory, for every neuron ``j``::

        mean_j             = 1/B sum_i a_ij
        variance_j         = 1/B sum_i (a_ij - mean_j)**2
        sparsity_j         = 1/B #{i : |a_ij| < threshold}
        sparsity_relaxed_j = 1/B sum_i sigmoid(sharpness * (1 - |a_ij| / threshold))
        peak_j             = max_i a_ij          (argmax_j: its first row)
        mean_abs_j         = 1/B sum_i |a_ij|
        peak_to_average_j  = peak_j / (mean_abs_j + eps)

    Sums are accumulated in float64 and the results are float64, shaped like
    one sample (``acts.shape[1:]``).

    Args:
        acts: ``(B, ...)`` float32/float64 array, ``B >= 1``.
        threshold: ``> 0``, "near zero" bound of the sparsity statistics.
        sharpness: ``> 0``, sharpness of the relaxed sparsity.
        eps: ``> 0``, added to the mean magnitude in peak-to-average.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.

    Returns:
        :class:`SelectivityStatistics`.

    Raises:
        TypeError: non-float input. ValueError: rank < 2, empty batch,
        NaN/inf, bad parameters.
    """
    threshold, sharpness, eps = _check_relaxation(threshold, sharpness, eps)
    target = _dispatch.resolve_device(device, acts)
    if target == "cuda":
        from kdnumba import _cuda_paths  # imports numba.cuda: CUDA path only
        return _cuda_paths.selectivity_statistics(acts, threshold=threshold,
                                                  sharpness=sharpness, eps=eps)
    x = _as_batch(acts, "acts")
    x2 = x.reshape(x.shape[0], -1)
    kernels = _dispatch.kernels("selectivity", target)
    flags = (kernels.WANT_VARIANCE | kernels.WANT_SPARSITY | kernels.WANT_PEAK
             | kernels.WANT_HARD)
    stats, argmax = _column_stats(kernels, x2, None, flags, threshold, sharpness, eps)
    stats, argmax = stats[0], argmax[0]
    if not (np.isfinite(stats[kernels.ST_VAR]).all()
            and np.isfinite(stats[kernels.ST_MEAN_ABS]).all()):
        v.raise_non_finite([("acts", x)], what="the statistics")
    shape = x.shape[1:]
    return SelectivityStatistics(
        mean=stats[kernels.ST_MEAN].reshape(shape),
        variance=stats[kernels.ST_VAR].reshape(shape),
        sparsity=stats[kernels.ST_HARD].reshape(shape),
        sparsity_relaxed=stats[kernels.ST_SOFT].reshape(shape),
        peak_to_average=stats[kernels.ST_RATIO].reshape(shape),
        peak=stats[kernels.ST_PEAK].reshape(shape),
        argmax=argmax.reshape(shape),
        mean_abs=stats[kernels.ST_MEAN_ABS].reshape(shape))


def selectivity_loss(student_acts, teacher_acts, *, metric="variance",
                     threshold=DEFAULT_THRESHOLD, sharpness=DEFAULT_SHARPNESS, eps=DEFAULT_EPS,
                     weight=1.0, device="auto", out=None) -> tuple[float, np.ndarray]:
    r"""Selectivity-matching loss and its exact gradient w.r.t. the student.

    With ``sel_j`` the chosen per-neuron statistic over the batch (``N``
    neurons, ``B`` samples)::

        loss = weight / N * sum_j (sel_j(student) - sel_j(teacher))**2

    ``metric``:

    * ``"variance"``: ``sel_j = 1/B sum_i (a_ij - mean_j)**2``; gradient
      ``weight * 2/N (var_s - var_t)_j * 2/B (s_ij - mean_j)``. With ``B = 1``
      every variance is 0 and so are loss and gradient.
    * ``"sparsity"``: ``sel_j = 1/B sum_i sigmoid(z_ij)``,
      ``z = sharpness * (1 - |a| / threshold)``, a smooth stand-in for the
      fraction of ``|a| < threshold`` (reached as ``sharpness -> inf``);
      gradient ``weight * 2/N (sel_s - sel_t)_j * 1/B sigmoid'(z_ij) *
      (-sharpness/threshold) * sign(s_ij)``.
    * ``"peak_to_average"``: ``sel_j = M_j / D_j`` with ``M_j = max_i a_ij``
      and ``D_j = 1/B sum_i |a_ij| + eps``; gradient
      ``weight * 2/N (sel_s - sel_t)_j * ([i = i*_j] / D_j - M_j sign(s_ij) / (B D_j**2))``,
      ``i*_j`` the *first* row attaining the maximum (tie rule).

    ``sign(0) = 0`` (the midpoint of the one-sided derivatives of ``|a|``, as
    in PyTorch). Statistics are accumulated in float64; the gradient has the
    student's shape and dtype. The teacher is cast to the student's dtype.

    Args:
        student_acts: ``(B, ...)`` float32/float64 activations.
        teacher_acts: same shape as ``student_acts``.
        metric: ``"variance"``, ``"sparsity"``, ``"peak_to_average"`` or a
            :class:`SelectivityMetric`.
        threshold: ``> 0`` (default 0.01), "near zero" bound (sparsity).
        sharpness: ``> 0`` (default 10), sharpness of the relaxation (sparsity).
        eps: ``> 0`` (default 1e-8), denominator epsilon (peak_to_average).
        weight: ``>= 0`` factor applied to loss and gradient (free: it is
            folded into the per-neuron coefficients).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        out: optional C-contiguous array of the student's shape and dtype to
            receive the gradient.

    Returns:
        ``(loss, grad)``: a Python float and an array shaped like ``student_acts``.

    Raises:
        TypeError: non-float input, bad ``metric`` type.
        ValueError: batch or neuron-count mismatch, rank < 2, empty batch,
            NaN/inf, bad parameters.
    """
    metric = SelectivityMetric.parse(metric)
    threshold, sharpness, eps = _check_relaxation(threshold, sharpness, eps)
    weight = v.check_non_negative(weight, "weight")
    target = _dispatch.resolve_device(device, student_acts, teacher_acts)
    if target == "cuda":
        from kdnumba import _cuda_paths  # imports numba.cuda: CUDA path only
        return _cuda_paths.selectivity_loss(student_acts, teacher_acts, metric=metric,
                                            threshold=threshold, sharpness=sharpness,
                                            eps=eps, weight=weight, out=out)
    s = _as_batch(student_acts, "student_acts")
    t = _as_batch(teacher_acts, "teacher_acts", dtype=s.dtype)
    _check_pair(s, t)
    grad = v.gradient_buffer(out, s, (t, student_acts, teacher_acts))
    s2 = s.reshape(s.shape[0], -1)
    t2 = t.reshape(t.shape[0], -1)
    n_rows, n_cols = s2.shape
    kernels = _dispatch.kernels("selectivity", target)
    code, flags, row = {
        SelectivityMetric.VARIANCE: (kernels.VARIANCE, kernels.WANT_VARIANCE, kernels.ST_VAR),
        SelectivityMetric.SPARSITY: (kernels.SPARSITY, kernels.WANT_SPARSITY, kernels.ST_SOFT),
        SelectivityMetric.PEAK_TO_AVERAGE: (kernels.PEAK_TO_AVERAGE, kernels.WANT_PEAK,
                                            kernels.ST_RATIO),
    }[metric]

    # Teacher first: the student, read last, is then the likelier to still be
    # in cache when the gradient pass reads it again.
    stats, argmax = _column_stats(kernels, t2, s2, flags, threshold, sharpness, eps)
    st_s = stats[1]
    diff = st_s[row] - stats[0, row]
    loss = weight * ordered_sum(diff * diff) / n_cols
    finite = np.isfinite(loss)
    if metric != SelectivityMetric.VARIANCE:
        # sigmoid hides inf and the max skips NaN; sum |a| sees both.
        finite = finite and np.isfinite(stats[:, kernels.ST_MEAN_ABS]).all()
    if not finite:
        v.raise_non_finite([("student_acts", s), ("teacher_acts", t)])

    c = (2.0 * weight / n_cols) * diff  # d loss / d sel_s
    g2 = grad.reshape(n_rows, n_cols)
    scalar = s.dtype.type
    empty64 = np.zeros(0, np.float64)
    mean64 = coef64 = peak_coef64 = empty64
    coef = np.zeros(0, s.dtype)
    arg = np.zeros(0, np.int64)
    with np.errstate(over="ignore"):  # an overflow is reported by _gradient_fits
        if metric == SelectivityMetric.VARIANCE:
            mean64 = st_s[kernels.ST_MEAN]
            coef64 = c * (2.0 / n_rows)
        elif metric == SelectivityMetric.SPARSITY:
            coef = (c * (-(sharpness / threshold) / n_rows)).astype(s.dtype)
        else:
            d = st_s[kernels.ST_MEAN_ABS] + eps
            coef64 = -c * st_s[kernels.ST_PEAK] / (n_rows * d * d)
            coef = coef64.astype(s.dtype)
            peak_coef64 = c / d
            arg = argmax[1]
    with _policy.kernel_launch(s2.size):
        kernels.gradient_rows(s2, code, scalar(sharpness),
                              scalar(sharpness / threshold), mean64, coef64, coef, arg,
                              peak_coef64, g2)
    if not _gradient_fits(metric, kernels, g2, st_s, coef64, coef, arg):
        v.raise_non_finite([("student_acts", s), ("teacher_acts", t)], what="the gradient")
    return float(loss), grad


def _gradient_fits(metric, kernels, g2, st_s, coef64, coef, arg) -> bool:
    """Whether no gradient element overflowed (finite inputs can still give a
    float32 gradient beyond 3.4e38).

    Per-column bounds settle it in O(N): ``|s_ij - mean_j| <= sqrt(B var_j)``
    (variance), ``sigmoid' <= 1/4`` (sparsity), ``|sign| <= 1`` (peak, whose
    maximal entries are checked directly). Only if a bound exceeds the dtype's
    range is the gradient itself scanned.
    """
    big = float(np.finfo(g2.dtype).max)
    if metric == SelectivityMetric.VARIANCE:
        bound = (float(np.abs(coef64).max())
                 * math.sqrt(g2.shape[0] * float(st_s[kernels.ST_VAR].max())))
    elif metric == SelectivityMetric.SPARSITY:
        bound = 0.25 * float(np.abs(coef).max())
    else:
        if not np.isfinite(g2[arg, np.arange(g2.shape[1])]).all():
            return False
        bound = float(np.abs(coef).max())
    if bound <= big:  # False for inf and NaN
        return True
    return bool(np.isfinite(g2).all())

