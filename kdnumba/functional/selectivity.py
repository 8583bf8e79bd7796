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
import functools
import math
from typing import NamedTuple

import numpy as np

from kdnumba import _dispatch
from kdnumba import _validation as v
from kdnumba._constants import SELECTIVITY_EPS
from kdnumba.registry import BadInput, LossSpec, Variant, Workload, register

__all__ = ["SelectivityMetric", "SelectivityStatistics", "selectivity_loss", "selectivity_statistics"]

#: Default threshold of "near zero" (AiDotNet's 0.01).
DEFAULT_THRESHOLD = 0.01
#: Default sharpness of the sparsity relaxation (dimensionless; the sigmoid's
#: slope is ``sharpness / threshold``).
DEFAULT_SHARPNESS = 10.0
#: Default epsilon of the peak-to-average denominator.
DEFAULT_EPS = SELECTIVITY_EPS


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
        return v.parse_choice(metric, cls, "metric", _METRIC_ALIASES)


#: Other spellings :meth:`SelectivityMetric.parse` accepts (normalised form -> value).
_METRIC_ALIASES = {"peaktoaverage": "peak_to_average", "peak": "peak_to_average"}


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


def as_batch(be, x, name: str, dtype=None):
    """``x`` as a kernel-ready array of rank >= 2 (one row per sample) on
    backend ``be``."""
    arr = be.float_array(x, name, dtype=dtype)
    if len(arr.shape) < 2:
        raise ValueError(
            f"{name} must have shape (B, N) or (B, ...) with one row per sample, got shape "
            f"{tuple(arr.shape)}; reshape to (B, 1) for a single neuron or (1, N) for a "
            "single sample")
    return arr


def check_pair(s, t) -> None:
    """Student and teacher activations describe the same samples and neurons,
    laid out alike (``ValueError`` saying how to fix it otherwise)."""
    if s.shape == t.shape:
        return
    if s.shape[0] != t.shape[0]:
        raise ValueError(
            f"batch size mismatch: student_acts has {s.shape[0]} rows, teacher_acts has "
            f"{t.shape[0]}; both must hold the activations of the same samples")
    n_s = _per_sample(s)
    n_t = _per_sample(t)
    if n_s != n_t:
        raise ValueError(
            f"neuron count mismatch: student_acts has {n_s} neurons per sample (shape "
            f"{tuple(s.shape)}), teacher_acts has {n_t} (shape {tuple(t.shape)}); "
            "selectivity is compared neuron by neuron, so project the activations to a "
            "common width first (e.g. a learned linear map on the student's side) or "
            "choose layers with the same number of units")
    if tuple(s.shape[1:]) != tuple(t.shape[1:]):
        raise ValueError(
            f"layout mismatch: student_acts has per-sample shape {tuple(s.shape[1:])}, "
            f"teacher_acts {tuple(t.shape[1:])}; neurons are matched by position after "
            "flattening, so reshape (or transpose) one of them explicitly to the other's "
            "layout")


def _per_sample(x) -> int:
    return math.prod(x.shape[1:])


def _rows(x):
    """A C-contiguous (host or device) array viewed as ``(B, N)`` (itself when it is)."""
    if len(x.shape) == 2:
        return x
    return x.reshape(x.shape[0], _per_sample(x))


@functools.cache
def _metric_codes(kernels) -> dict:
    """Metric -> ``(metric code, statistic flag)`` of a kernels module (built
    once per module: a small call pays for every dict it builds)."""
    return {
        SelectivityMetric.VARIANCE: (kernels.VARIANCE, kernels.WANT_VARIANCE),
        SelectivityMetric.SPARSITY: (kernels.SPARSITY, kernels.WANT_SPARSITY),
        SelectivityMetric.PEAK_TO_AVERAGE: (kernels.PEAK_TO_AVERAGE, kernels.WANT_PEAK),
    }


def _check_relaxation(threshold, sharpness, eps) -> tuple[float, float, float]:
    return (v.check_positive(threshold, "threshold"),
            v.check_positive(sharpness, "sharpness"),
            v.check_positive(eps, "eps"))


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
    one sample (``acts.shape[1:]``). The statistics (one value per neuron)
    are NumPy arrays on every device.

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
    be = _dispatch.backend(device, acts)
    x = as_batch(be, acts, "acts")
    x2 = _rows(x)
    n_cols = x2.shape[1]
    scalar = np.dtype(x.dtype).type
    kernels = be.kernels("selectivity")
    flags = (kernels.WANT_VARIANCE | kernels.WANT_SPARSITY | kernels.WANT_PEAK
             | kernels.WANT_HARD)
    stats = be.empty((1, kernels.N_STATS, n_cols), np.float64)
    argmax = be.empty((1, n_cols), np.int64)
    with be.launch(x2.size):
        kernels.column_stats(x2, x2, 1, flags, threshold, scalar(sharpness),
                             scalar(sharpness / threshold), eps, stats, argmax)
    stats, argmax = be.to_host(stats)[0], be.to_host(argmax)[0]
    if not (np.isfinite(stats[kernels.ST_VAR]).all()
            and np.isfinite(stats[kernels.ST_MEAN_ABS]).all()):
        v.raise_non_finite([("acts", be.to_host(x))], what="the statistics")
    shape = tuple(x.shape[1:])
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
                     weight=1.0, device="auto", out=None):
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
            receive the gradient (saves an allocation in training loops).

    Returns:
        ``(loss, grad)``: a Python float and an array shaped like ``student_acts``.

    Raises:
        TypeError: non-float input, bad ``metric`` type.
        ValueError: batch or neuron-count mismatch, rank < 2, empty batch,
            NaN/inf, bad parameters, a gradient that overflows the dtype.
    """
    metric = SelectivityMetric.parse(metric)
    threshold, sharpness, eps = _check_relaxation(threshold, sharpness, eps)
    weight = v.check_non_negative(weight, "weight")
    be = _dispatch.backend(device, student_acts, teacher_acts)
    s = as_batch(be, student_acts, "student_acts")
    t = as_batch(be, teacher_acts, "teacher_acts", dtype=s.dtype)
    check_pair(s, t)
    grad = be.gradient_buffer(out, s, (student_acts, teacher_acts, t))
    kernels = be.kernels("selectivity")
    code, flags = _metric_codes(kernels)[metric]
    # One launch function for the whole loss: statistics, loss terms and
    # gradient back to back (a small call's Python between two kernels costs
    # more than its own time, issue #16). The gradient is written before the
    # loss is checked: non-finite input gives a non-finite loss, reported
    # first (naming the input) whatever the gradient holds.
    s2 = _rows(s)
    total, fits = kernels.loss_and_gradient(_rows(t), s2, code, flags, threshold, sharpness,
                                            sharpness / threshold, eps, weight, _rows(grad))
    loss = weight * total / s2.shape[1]
    be.check_finite(loss, (("student_acts", s), ("teacher_acts", t)))
    if not fits:
        v.raise_non_finite([("student_acts", be.to_host(s)), ("teacher_acts", be.to_host(t))],
                           what="the gradient")
    return loss, be.deliver(grad, out)


# --- registry entry ------------------------------------------------------------------

def _selectivity_inputs(rng, dtype, *, shape=(6, 6), scale=1.0) -> dict:
    """Student activations ``scale * N(0, 1)`` and a teacher that is the student
    plus noise (as in training). ``scale=0.02`` puts them on the default
    sparsity threshold's scale (0.01), as the benchmarks do."""
    student = (scale * rng.standard_normal(shape)).astype(dtype)
    teacher = (student + 0.5 * scale * rng.standard_normal(shape)).astype(dtype)
    return {"student_acts": student, "teacher_acts": teacher}


def _with(arguments: dict, **changes) -> dict:
    return {**arguments, **changes}


def _reshaped(arguments: dict, student_shape, teacher_shape) -> dict:
    s, t = arguments["student_acts"], arguments["teacher_acts"]
    return _with(arguments, student_acts=s.reshape(s.shape[0], *student_shape),
                 teacher_acts=t.reshape(t.shape[0], *teacher_shape))


def _workload(metric: str, rows: int, neurons: int, *, dtype="float32", quick=False,
              notes="") -> Workload:
    return Workload(f"{metric}/B{rows}_N{neurons}", {"shape": (rows, neurons), "scale": 0.02},
                    dtype=dtype, options={"metric": metric}, quick=quick, notes=notes)


register(LossSpec(
    name="selectivity_loss",
    function=selectivity_loss,
    family="selectivity",
    make_inputs=_selectivity_inputs,
    reference="selectivity:selectivity_loss",
    torch="selectivity:selectivity_loss_torch",
    variants=(
        Variant("variance", {"metric": "variance"}),
        Variant("variance, (B, C, H, W) input, weight 0.5", {"metric": "variance", "weight": 0.5},
                {"shape": (6, 2, 3, 2)}),
        Variant("sparsity, threshold 0.5, sharpness 3",
                {"metric": "sparsity", "threshold": 0.5, "sharpness": 3.0}),
        Variant("peak_to_average", {"metric": "peak_to_average"}),
        Variant("peak_to_average, eps 0.1", {"metric": "peak_to_average", "eps": 0.1}),
    ),
    medium={"shape": (300, 1100)},  # 2 column blocks x 5 row chunks on the CPU
    bad_inputs=(
        BadInput("unknown metric", lambda a: _with(a, metric="entropy"), ValueError,
                 "metric must be one of"),
        BadInput("metric of the wrong type", lambda a: _with(a, metric=3), TypeError, "metric"),
        BadInput("threshold 0", lambda a: _with(a, threshold=0.0), ValueError, "threshold"),
        BadInput("sharpness < 0", lambda a: _with(a, sharpness=-1.0), ValueError, "sharpness"),
        BadInput("eps NaN", lambda a: _with(a, eps=float("nan")), ValueError, "eps"),
        BadInput("weight < 0", lambda a: _with(a, weight=-0.1), ValueError, "weight"),
        BadInput("weight a bool", lambda a: _with(a, weight=True), TypeError, "weight"),
        BadInput("neuron count mismatch",
                 lambda a: _with(a, teacher_acts=a["teacher_acts"][:, :-1]), ValueError,
                 "neuron count mismatch.*project"),
        BadInput("same width, other layout", lambda a: _reshaped(a, (2, 3), (3, 2)),
                 ValueError, "layout mismatch"),
        BadInput("one value per sample (rank 1)",
                 lambda a: _with(a, student_acts=a["student_acts"][:, 0],
                                 teacher_acts=a["teacher_acts"][:, 0]),
                 ValueError, r"\(B, 1\)"),
    ),
    workloads=(
        _workload("variance", 4096, 2048, quick=True,
                  notes="headline: population-variance matching, loss+grad"),
        _workload("sparsity", 4096, 2048,
                  notes="sigmoid-relaxed fraction |a| < 0.01, sharpness 10 "
                        "(3 exp per element pair)"),
        _workload("peak_to_average", 4096, 2048,
                  notes="max / (mean|a| + 1e-8), first-max tie rule"),
        _workload("variance", 4096, 2048, dtype="float64", notes="float64"),
        _workload("variance", 256, 64, quick=True, notes="small call: per-call overhead"),
    ),
))
