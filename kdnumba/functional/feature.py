"""Feature (FitNets hint) matching as a pure function: :func:`feature_loss`."""

from __future__ import annotations

import numpy as np

from kdnumba import _dispatch, _policy
from kdnumba import _validation as v
from kdnumba.kernels.cpu.reductions import ordered_sum


def feature_loss(student_feats, teacher_feats, *, device="auto"):
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

    Returns:
        ``(loss, grad)``: a Python float and an array of the student's shape and dtype.

    Raises:
        TypeError: non-float input (int, bool, float16, complex).
        ValueError: shape/batch mismatch, empty batch, NaN/inf.
    """
    target = _dispatch.resolve_device(device, student_feats, teacher_feats)
    if target == "cuda":
        from kdnumba import _cuda_paths  # imports numba.cuda: CUDA path only
        return _cuda_paths.feature_loss(student_feats, teacher_feats)
    s = v.as_float_array(student_feats, "student_feats")
    t = v.as_float_array(teacher_feats, "teacher_feats", dtype=s.dtype)
    v.check_same_shape(s, t, "student_feats", "teacher_feats")
    return _mse(s, t, target, ("student_feats", "teacher_feats"))


def _mse(s: np.ndarray, t: np.ndarray, target: str, names) -> tuple[float, np.ndarray]:
    """Mean squared error of validated same-shape contiguous arrays."""
    kernels = _dispatch.kernels("feature", target)
    n = s.size
    grad = np.empty_like(s)
    partial = np.empty(kernels.n_chunks(n), dtype=np.float64)
    with _policy.kernel_launch():
        kernels.sq_diff_chunks(s.reshape(-1), t.reshape(-1), s.dtype.type(2.0 / n),
                               grad.reshape(-1), partial)
    loss = ordered_sum(partial) / n
    if not np.isfinite(loss):
        v.raise_non_finite([(names[0], s), (names[1], t)])
    return float(loss), grad
