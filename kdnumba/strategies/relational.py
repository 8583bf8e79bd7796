"""Relational distillation (RKD): :class:`RelationalDistillationStrategy`."""

from __future__ import annotations

from kdnumba import _validation as v
from kdnumba.functional import rkd_loss
from kdnumba.strategies.feature import LayerwiseStrategy


class RelationalDistillationStrategy(LayerwiseStrategy):
    r"""Relational KD (Park et al. 2019) on embedding layers.

    AiDotNet ``RelationalDistillationStrategy``, with RepDistiller's ``RKDLoss``.

    For each configured pair, student layer ``l`` against teacher layer ``m(l)``
    (rows flattened to ``(B, D)``; student and teacher widths may differ)::

        loss_l = rkd_loss(s_l, t_m(l), distance_weight, angle_weight)
        intermediate loss = relational_weight * 1/L * sum_l loss_l
        output loss       = (1 - relational_weight) * kd_loss(temperature, alpha)

    The gradient is exact for every row (AiDotNet adds one batch-averaged
    relational gradient to every row, which is not the derivative of its loss).

    Args:
        layer_name: the embedding layer (default ``"embeddings"``), a list
            of names, or a mapping ``{student_layer: teacher_layer}``; required.
        relational_weight: in ``[0, 1]`` (default 0.5).
        distance_weight, angle_weight: RKD's ``w_d = 25`` and ``w_a = 50``.
        temperature, alpha: of the output ``kd_loss``.
        missing_layer: ``"raise"`` (default) or ``"skip"`` (see
            :class:`~kdnumba.strategies.feature.LayerwiseStrategy`).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
    """

    weight_arg = "relational_weight"

    def __init__(self, layer_name="embeddings", relational_weight: float = 0.5,
                 distance_weight: float = 25.0, angle_weight: float = 50.0,
                 temperature: float = 3.0, alpha: float = 0.3, *, missing_layer: str = "raise",
                 device: str = "auto"):
        super().__init__(layer_name, relational_weight, temperature, alpha,
                         layers_arg="layer_name", weight_arg="relational_weight",
                         missing_layer=missing_layer, device=device)
        self.distance_weight = v.check_non_negative(distance_weight, "distance_weight")
        self.angle_weight = v.check_non_negative(angle_weight, "angle_weight")

    @property
    def layer_name(self) -> dict[str, str]:
        """The configured ``{student_layer: teacher_layer}`` pairs (a copy)."""
        return dict(self.layers)

    @property
    def relational_weight(self) -> float:
        return self.weight

    def _layer_loss(self, student, teacher, student_layer):
        return rkd_loss(student, teacher, distance_weight=self.distance_weight,
                        angle_weight=self.angle_weight, device=self.device)
