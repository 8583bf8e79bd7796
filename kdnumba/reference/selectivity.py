"""NumPy reference for neuron-selectivity distillation
(``kdnumba.functional.selectivity_loss`` / ``selectivity_statistics``).

Written straight from the formulas, column statistics with NumPy reductions
over axis 0, in the dtype of the student. No code is shared with the kernels.
"""

from __future__ import annotations

import numpy as np


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """Stable logistic function: never exponentiates a positive number."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


def selectivity_statistics(acts, *, threshold=0.01, sharpness=10.0, eps=1e-8) -> dict:
    """Per-neuron statistics of ``acts`` ``(B, ...)`` as a dict of ``(N,)`` arrays."""
    a = np.asarray(acts)
    a = a.reshape(a.shape[0], -1)
    k = sharpness / threshold
    mean = a.mean(axis=0)
    mean_abs = np.abs(a).mean(axis=0)
    peak = a.max(axis=0)
    return {
        "mean": mean,
        "variance": ((a - mean) ** 2).mean(axis=0),
        # compared in float64: a float32 threshold would be rounded (float32(0.01) < 0.01)
        "sparsity": (np.abs(a.astype(np.float64)) < threshold).mean(axis=0),
        "sparsity_relaxed": _sigmoid(k * (threshold - np.abs(a))).mean(axis=0),
        "peak": peak,
        "argmax": a.argmax(axis=0),  # NumPy returns the first maximal row
        "mean_abs": mean_abs,
        "peak_to_average": peak / (mean_abs + eps),
    }


def selectivity_loss(student_acts, teacher_acts, *, metric="variance", threshold=0.01,
                     sharpness=10.0, eps=1e-8, weight=1.0):
    """``(loss, grad)``: ``weight * mean_j (sel_j(s) - sel_j(t))**2`` and its gradient.

    ``metric`` is ``"variance"``, ``"sparsity"`` (sigmoid relaxation) or
    ``"peak_to_average"``; see :func:`kdnumba.functional.selectivity_loss`.
    """
    s_in = np.asarray(student_acts)
    s = s_in.reshape(s_in.shape[0], -1)
    t = np.asarray(teacher_acts).astype(s.dtype, copy=False).reshape(s.shape[0], -1)
    B, N = s.shape
    metric = str(metric)

    if metric == "variance":
        def sel(a):
            return ((a - a.mean(axis=0)) ** 2).mean(axis=0)
        dsel = 2 / B * (s - s.mean(axis=0))
    elif metric == "sparsity":
        k = sharpness / threshold

        def sel(a):
            return _sigmoid(k * (threshold - np.abs(a))).mean(axis=0)
        sig = _sigmoid(k * (threshold - np.abs(s)))
        dsel = sig * (1 - sig) * (-k) * np.sign(s) / B
    elif metric == "peak_to_average":
        def sel(a):
            return a.max(axis=0) / (np.abs(a).mean(axis=0) + eps)
        m = s.max(axis=0)
        d = np.abs(s).mean(axis=0) + eps
        first_max = np.zeros_like(s)
        first_max[s.argmax(axis=0), np.arange(N)] = 1
        dsel = first_max / d - m * np.sign(s) / (B * d * d)
    else:
        raise ValueError(f"unknown metric {metric!r}")

    diff = sel(s) - sel(t)
    loss = weight * np.mean(diff * diff)
    grad = (weight * 2 / N) * diff * dsel
    return float(loss), grad.astype(s.dtype, copy=False).reshape(s_in.shape)


def selectivity_loss_torch(student_acts, teacher_acts, *, metric="variance", threshold=0.01,
                           sharpness=10.0, eps=1e-8, weight=1.0):
    """The same loss as a PyTorch expression (tensors in, 0-d tensor out), the way
    PyTorch users write it (``(B, ...)`` flattened to ``(B, N)``)::

        variance:        sel(a) = a.var(0, unbiased=False)
        sparsity:        sel(a) = sigmoid(sharpness * (1 - a.abs() / threshold)).mean(0)
        peak_to_average: sel(a) = a.max(0).values / (a.abs().mean(0) + eps)
        loss = weight * ((sel(s) - sel(t))**2).mean()

    Imports torch only when called (benchmarks and bridge tests).
    """
    import torch

    s = student_acts.reshape(student_acts.shape[0], -1)
    t = teacher_acts.reshape(teacher_acts.shape[0], -1).to(s.dtype)
    metric = str(metric)
    if metric == "variance":
        def sel(a):
            return a.var(0, unbiased=False)
    elif metric == "sparsity":
        def sel(a):
            return torch.sigmoid(sharpness * (1 - a.abs() / threshold)).mean(0)
    elif metric == "peak_to_average":
        def sel(a):
            return a.max(0).values / (a.abs().mean(0) + eps)
    else:
        raise ValueError(f"unknown metric {metric!r}")
    return weight * ((sel(s) - sel(t)) ** 2).mean()
