"""Gram-matrix (batch similarity) distillation: :class:`SimilarityPreservingStrategy`
(SP) and :class:`PKTStrategy` (probabilistic knowledge transfer)."""

from __future__ import annotations

from kdnumba import _validation as v
from kdnumba.functional import pkt_loss, sp_loss
from kdnumba.strategies.feature import ScaledLayerwiseStrategy


class SimilarityPreservingStrategy(ScaledLayerwiseStrategy):
    r"""Similarity-preserving KD (Tung & Mori 2019) over named layers, RepDistiller ``Similarity``.

    For each configured pair, student layer ``l`` against teacher layer ``m(l)``
    (rows flattened; student and teacher widths and shapes may differ, only the
    ``B x B`` row similarities are compared)::

        loss_l = gamma * sp_loss(s_l, t_m(l))
        intermediate loss = sp_weight * 1/L * sum_l loss_l
        output loss       = (1 - sp_weight) * kd_loss(temperature, alpha)

    ``gamma`` is the paper's layer weight (RepDistiller trains with CE plus
    ``3000 * sum_l sp_loss_l``): a ``>= 0`` factor, since ``sp_loss`` is small
    (``<= 4``, typically ``1e-3``).

    Args:
        layer_names: a layer name (default ``"features"``), a list of names, or a
            mapping ``{student_layer: teacher_layer}``.
        sp_weight: in ``[0, 1]`` (default 0.5).
        gamma: ``>= 0`` factor of every layer's ``sp_loss`` (default 1).
        temperature, alpha: of the output ``kd_loss``.
        missing_layer: ``"raise"`` (default) or ``"skip"`` (see
            :class:`~kdnumba.strategies.feature.LayerwiseStrategy`).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
    """

    weight_arg = "sp_weight"

    def __init__(self, layer_names="features", sp_weight: float = 0.5, gamma: float = 1.0,
                 temperature: float = 3.0, alpha: float = 0.3, *, missing_layer: str = "raise",
                 device: str = "auto"):
        super().__init__(layer_names, sp_weight, gamma, temperature, alpha,
                         layers_arg="layer_names", weight_arg="sp_weight",
                         missing_layer=missing_layer, device=device)

    @property
    def layer_names(self) -> dict[str, str]:
        """The configured ``{student_layer: teacher_layer}`` pairs (a copy)."""
        return dict(self.layers)

    @property
    def sp_weight(self) -> float:
        return self.weight

    def _pair_loss(self, student, teacher):
        return sp_loss(student, teacher, device=self.device)


class PKTStrategy(ScaledLayerwiseStrategy):
    r"""Probabilistic knowledge transfer (Passalis & Tefas 2018) on embedding layers,
    RepDistiller ``PKT``.

    For each configured pair (rows flattened; widths may differ)::

        loss_l = gamma * pkt_loss(s_l, t_m(l), eps)
        intermediate loss = pkt_weight * 1/L * sum_l loss_l
        output loss       = (1 - pkt_weight) * kd_loss(temperature, alpha)

    ``gamma``: a ``>= 0`` factor (RepDistiller trains with CE plus ``30000 * pkt_loss``).

    Args:
        layer_name: the embedding layer (default ``"embeddings"``), a list of
            names, or a mapping ``{student_layer: teacher_layer}``.
        pkt_weight: in ``[0, 1]`` (default 0.5).
        gamma: ``>= 0`` factor of every layer's ``pkt_loss`` (default 1).
        eps: ``> 0``, PKT's epsilon (default 1e-7).
        temperature, alpha: of the output ``kd_loss``.
        missing_layer: ``"raise"`` (default) or ``"skip"``.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
    """

    weight_arg = "pkt_weight"

    def __init__(self, layer_name="embeddings", pkt_weight: float = 0.5, gamma: float = 1.0,
                 eps: float = 1e-7, temperature: float = 3.0, alpha: float = 0.3, *,
                 missing_layer: str = "raise", device: str = "auto"):
        super().__init__(layer_name, pkt_weight, gamma, temperature, alpha,
                         layers_arg="layer_name", weight_arg="pkt_weight",
                         missing_layer=missing_layer, device=device)
        self.eps = v.check_positive(eps, "eps")

    @property
    def layer_name(self) -> dict[str, str]:
        """The configured ``{student_layer: teacher_layer}`` pairs (a copy)."""
        return dict(self.layers)

    @property
    def pkt_weight(self) -> float:
        return self.weight

    def _pair_loss(self, student, teacher):
        return pkt_loss(student, teacher, eps=self.eps, device=self.device)
