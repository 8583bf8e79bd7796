"""Response-based distillation: :class:`DistillationLoss`."""

from __future__ import annotations

import numpy as np

from kdnumba import _validation as v
from kdnumba.functional import kd_loss
from kdnumba.strategies.base import DistillationStrategy


class DistillationLoss(DistillationStrategy):
    r"""Hinton-style KD on final outputs (AiDotNet ``DistillationLoss``).

    ``loss = alpha * CE(softmax(s), y) + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T))``,
    batch-averaged; the soft term alone when ``labels is None``. Gradient::

        alpha/B * (softmax(s) - y) + (1 - alpha) * T/B * (softmax(s/T) - softmax(t/T))

    Args:
        temperature: softmax temperature ``T > 0`` (default 3.0; 2-10 is usual).
        alpha: weight of the hard-label term in ``[0, 1]`` (default 0.3).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.

    Labels may be ``None``, integer classes ``(B,)`` or one-hot/soft ``(B, C)``.
    """

    def __init__(self, temperature: float = 3.0, alpha: float = 0.3, *, device: str = "auto"):
        super().__init__(device=device)
        self.temperature = v.check_positive(temperature, "temperature")
        self.alpha = v.check_unit_interval(alpha, "alpha")

    def loss_and_gradient(self, student_output, teacher_output, labels=None
                          ) -> tuple[float, np.ndarray]:
        """Fused loss and gradient (see :func:`kdnumba.functional.kd_loss`)."""
        return kd_loss(student_output, teacher_output, labels,
                       temperature=self.temperature, alpha=self.alpha, device=self.device)
