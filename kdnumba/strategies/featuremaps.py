"""Feature-map distillation over named ``(B, C, H, W)`` layers: :class:`NSTStrategy`
(neuron selectivity transfer) and :class:`HCLStrategy` (ReviewKD's hierarchical
context loss)."""

from __future__ import annotations

from kdnumba.functional import hcl_loss, nst_loss
from kdnumba.strategies.feature import ScaledLayerwiseStrategy


class NSTStrategy(ScaledLayerwiseStrategy):
    r"""Neuron selectivity transfer (Huang & Wang 2017) over named layers, RepDistiller ``NSTLoss``.

    For each configured pair, student layer ``l`` (``(B, Cs, H, W)``) against
    teacher layer ``m(l)`` (``(B, Ct, H, W)``; channels may differ, spatial
    sizes must agree)::

        loss_l = gamma * nst_loss(s_l, t_m(l))
        intermediate loss = nst_weight * 1/L * sum_l loss_l
        output loss       = (1 - nst_weight) * kd_loss(temperature, alpha)

    ``gamma`` is a ``>= 0`` factor (RepDistiller trains with CE plus
    ``50 * sum_l nst_loss_l``; ``gamma = 50 L`` gives its sum over ``L`` layers).

    Args:
        layer_names: a layer name (default ``"features"``), a list of names, or a
            mapping ``{student_layer: teacher_layer}``.
        nst_weight: in ``[0, 1]`` (default 0.5).
        gamma: ``>= 0`` factor of every layer's ``nst_loss`` (default 1).
        temperature, alpha: of the output ``kd_loss``.
        missing_layer: ``"raise"`` (default) or ``"skip"`` (see
            :class:`~kdnumba.strategies.feature.LayerwiseStrategy`).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
    """

    weight_arg = "nst_weight"

    def __init__(self, layer_names="features", nst_weight: float = 0.5, gamma: float = 1.0,
                 temperature: float = 3.0, alpha: float = 0.3, *, missing_layer: str = "raise",
                 device: str = "auto"):
        super().__init__(layer_names, nst_weight, gamma, temperature, alpha,
                         layers_arg="layer_names", weight_arg="nst_weight",
                         missing_layer=missing_layer, device=device)

    @property
    def layer_names(self) -> dict[str, str]:
        """The configured ``{student_layer: teacher_layer}`` pairs (a copy)."""
        return dict(self.layers)

    @property
    def nst_weight(self) -> float:
        return self.weight

    def _pair_loss(self, student, teacher):
        return nst_loss(student, teacher, device=self.device)


class HCLStrategy(ScaledLayerwiseStrategy):
    r"""ReviewKD's hierarchical context loss (Chen et al. 2021) over named layers,
    mdistiller ``hcl_loss``.

    For each configured pair of equal-shape ``(B, C, H, W)`` maps (in ReviewKD,
    the student's fused review features against the teacher's stage outputs)::

        loss_l = gamma * hcl_loss(s_l, t_m(l))
        intermediate loss = hcl_weight * 1/L * sum_l loss_l
        output loss       = (1 - hcl_weight) * kd_loss(temperature, alpha)

    ``gamma`` is a ``>= 0`` factor: mdistiller sums ``hcl_loss`` over the
    ``L`` stages and weighs it by ``REVIEWKD_WEIGHT`` (1 on CIFAR, with a
    linear warm-up over 20 epochs, which is the trainer's business);
    ``gamma = L * REVIEWKD_WEIGHT`` gives that sum.

    Args:
        layer_names: a layer name (default ``"features"``), a list of names, or a
            mapping ``{student_layer: teacher_layer}``.
        hcl_weight: in ``[0, 1]`` (default 0.5).
        gamma: ``>= 0`` factor of every layer's ``hcl_loss`` (default 1).
        temperature, alpha: of the output ``kd_loss``.
        missing_layer: ``"raise"`` (default) or ``"skip"`` (see
            :class:`~kdnumba.strategies.feature.LayerwiseStrategy`).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
    """

    weight_arg = "hcl_weight"

    def __init__(self, layer_names="features", hcl_weight: float = 0.5, gamma: float = 1.0,
                 temperature: float = 3.0, alpha: float = 0.3, *, missing_layer: str = "raise",
                 device: str = "auto"):
        super().__init__(layer_names, hcl_weight, gamma, temperature, alpha,
                         layers_arg="layer_names", weight_arg="hcl_weight",
                         missing_layer=missing_layer, device=device)

    @property
    def layer_names(self) -> dict[str, str]:
        """The configured ``{student_layer: teacher_layer}`` pairs (a copy)."""
        return dict(self.layers)

    @property
    def hcl_weight(self) -> float:
        return self.weight

    def _pair_loss(self, student, teacher):
        return hcl_loss(student, teacher, device=self.device)
