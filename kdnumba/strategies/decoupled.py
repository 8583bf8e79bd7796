"""Decoupled KD and DIST as training strategies: :class:`DecoupledDistillationStrategy`
(mdistiller's ``DKD`` distiller) and :class:`DISTStrategy` (DIST's training loss)."""

from __future__ import annotations

import numpy as np

from kdnumba import _validation as v
from kdnumba.functional import dist_loss, dkd_loss, kd_loss
from kdnumba.strategies.base import DistillationStrategy


def _cross_entropy(student_output, teacher_output, labels, device):
    """``(mean CE(softmax(s), y), gradient)`` through ``kd_loss`` with ``alpha = 1``
    (its soft term then has weight 0)."""
    return kd_loss(student_output, teacher_output, labels, temperature=1.0, alpha=1.0,
                   device=device)


class DecoupledDistillationStrategy(DistillationStrategy):
    r"""mdistiller's ``DKD`` distiller: cross-entropy plus warmed-up decoupled KD.

    ``loss = ce_weight * CE(softmax(s), y) + min(epoch / warmup, 1) * dkd_loss(s, t, y)``
    with :func:`kdnumba.functional.dkd_loss` (``alpha`` TCKD + ``beta`` NCKD,
    temperature ``T``, optional logit standardisation); the gradient is the
    same combination of the two gradients.

    **The epoch.** mdistiller counts epochs from 1, so its first epoch has
    factor ``1 / warmup``. :class:`kdnumba.training.Distiller` calls
    :meth:`on_epoch_start` with its 0-based epoch before each epoch; the
    factor is ``min((epoch + 1) / warmup, 1)``, mdistiller's schedule. Outside
    the Distiller, call ``on_epoch_start(epoch)`` yourself each epoch (until
    then the factor is the first epoch's, ``1 / warmup``); ``warmup=0``
    disables the warm-up (factor 1).

    Args:
        alpha: TCKD weight ``>= 0`` (mdistiller 1.0).
        beta: NCKD weight ``>= 0`` (mdistiller 8.0 on CIFAR-100).
        temperature: ``T > 0`` (mdistiller 4.0).
        ce_weight: weight of the cross-entropy term ``>= 0`` (mdistiller 1.0).
        warmup: epochs of linear warm-up of the DKD term, an integer ``>= 0``
            (mdistiller 20).
        standardize: logit standardisation of both logits before DKD.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.

    Labels are required (integer class indices).
    """

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 ce_weight: float = 1.0, warmup: int = 20, standardize: bool = False, *,
                 device: str = "auto"):
        super().__init__(device=device)
        self.alpha = v.check_non_negative(alpha, "alpha")
        self.beta = v.check_non_negative(beta, "beta")
        self.temperature = v.check_positive(temperature, "temperature")
        self.ce_weight = v.check_non_negative(ce_weight, "ce_weight")
        self.warmup = v.check_int(warmup, "warmup", minimum=0)
        if not isinstance(standardize, (bool, np.bool_)):
            raise TypeError(f"standardize must be True or False, got {standardize!r}")
        self.standardize = bool(standardize)
        self.epoch = 0

    def on_epoch_start(self, epoch: int) -> None:
        """Set the current (0-based) epoch; :class:`~kdnumba.training.Distiller` calls it."""
        self.epoch = v.check_int(epoch, "epoch", minimum=0)

    @property
    def warmup_factor(self) -> float:
        """``min((epoch + 1) / warmup, 1)`` (1 when ``warmup == 0``)."""
        return 1.0 if self.warmup == 0 else min((self.epoch + 1) / self.warmup, 1.0)

    def loss_and_gradient(self, student_output, teacher_output, labels=None
                          ) -> tuple[float, np.ndarray]:
        """CE plus the warmed-up DKD term, and its gradient."""
        if labels is None:
            raise ValueError("DecoupledDistillationStrategy needs labels (integer class "
                             "indices): DKD splits each row at its target class")
        factor = self.warmup_factor
        loss, grad = dkd_loss(student_output, teacher_output, labels, alpha=self.alpha,
                              beta=self.beta, temperature=self.temperature,
                              standardize=self.standardize, device=self.device)
        loss *= factor
        grad *= grad.dtype.type(factor)
        if self.ce_weight > 0:
            ce, ce_grad = _cross_entropy(student_output, teacher_output, labels, self.device)
            loss += self.ce_weight * ce
            grad += grad.dtype.type(self.ce_weight) * ce_grad
        return loss, grad


class DISTStrategy(DistillationStrategy):
    r"""DIST's training loss: ``ce_weight * CE(softmax(s), y) + dist_loss(s, t)``.

    :func:`kdnumba.functional.dist_loss` with ``beta`` (inter-class, rows),
    ``gamma`` (intra-class, columns of the batch) and temperature ``T``; the
    DIST paper trains with CE plus DIST (``beta = gamma = 1``, ``T = 1`` on
    ImageNet; ``beta = gamma = 2``, ``T = 4`` on CIFAR-100). With
    ``labels=None`` the CE term is dropped (label-free distillation).

    Note that the intra-class term couples the batch: the loss of a batch is
    not the sum of the losses of its parts.

    Args:
        beta: inter-class weight ``>= 0``.
        gamma: intra-class weight ``>= 0``.
        temperature: ``T > 0``.
        ce_weight: weight of the cross-entropy term ``>= 0``.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
    """

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0,
                 ce_weight: float = 1.0, *, device: str = "auto"):
        super().__init__(device=device)
        self.beta = v.check_non_negative(beta, "beta")
        self.gamma = v.check_non_negative(gamma, "gamma")
        self.temperature = v.check_positive(temperature, "temperature")
        self.ce_weight = v.check_non_negative(ce_weight, "ce_weight")

    def loss_and_gradient(self, student_output, teacher_output, labels=None
                          ) -> tuple[float, np.ndarray]:
        """CE (when labels are given) plus DIST, and its gradient."""
        loss, grad = dist_loss(student_output, teacher_output, beta=self.beta,
                               gamma=self.gamma, temperature=self.temperature,
                               device=self.device)
        if labels is not None and self.ce_weight > 0:
            ce, ce_grad = _cross_entropy(student_output, teacher_output, labels, self.device)
            loss += self.ce_weight * ce
            grad += grad.dtype.type(self.ce_weight) * ce_grad
        return loss, grad
