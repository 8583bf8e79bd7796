"""NumPy reference for the FitNets hint loss (``kdnumba.functional.feature_loss``)."""

from __future__ import annotations

import numpy as np


def feature_loss(student_feats, teacher_feats):
    """``(mean (s - t)^2, 2 (s - t) / n)`` straight from the formula."""
    s = np.asarray(student_feats)
    t = np.asarray(teacher_feats).astype(s.dtype, copy=False)
    diff = s - t
    loss = np.mean(diff.astype(np.float64) ** 2)
    return float(loss), (2 * diff / s.dtype.type(s.size)).astype(s.dtype, copy=False)


def feature_loss_torch(student_feats, teacher_feats):
    """``F.mse_loss(s, t)`` (RepDistiller ``HintLoss``), on tensors."""
    import torch.nn.functional as F

    return F.mse_loss(student_feats, teacher_feats)
