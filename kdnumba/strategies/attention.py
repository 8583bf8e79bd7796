"""Attention-based distillation: :class:`AttentionDistillationStrategy`, :class:`AttentionMode`."""

from __future__ import annotations

from enum import Enum

from kdnumba import _validation as v
from kdnumba.functional import attention_map_loss, attention_transfer
from kdnumba.functional.attention import AT_VARIANTS, MAP_INPUTS
from kdnumba.strategies.feature import LayerwiseStrategy


class AttentionMode(str, Enum):
    """What an :class:`AttentionDistillationStrategy` compares.

    * ``TRANSFER`` -- attention transfer on CNN feature maps ``(B, C, *spatial)``
      (:func:`kdnumba.functional.attention_transfer`);
    * ``MSE`` -- mean squared error between attention maps ``(B, heads, L, L)``
      (TinyBERT; AiDotNet's default);
    * ``KL`` -- KL divergence over the rows of attention maps (MiniLM-style).
    """

    TRANSFER = "transfer"
    MSE = "mse"
    KL = "kl"


class AttentionDistillationStrategy(LayerwiseStrategy):
    r"""Match attention between teacher and student (AiDotNet ``AttentionDistillationStrategy``).

    For each configured pair, student layer ``l`` against teacher layer ``m(l)``::

        loss_l = attention_transfer(s_l, t_m(l), p, variant, pool)   mode TRANSFER
               = attention_map_loss(s_l, t_m(l), kind="mse")         mode MSE
               = attention_map_loss(s_l, t_m(l), kind="kl", inputs)  mode KL

        intermediate loss = attention_weight * 1/L * sum_l loss_l
        output loss       = (1 - attention_weight) * kd_loss(temperature, alpha)

    (AiDotNet's split: "attentionWeight 0.3: 30% attention, 70% output".)

    Args:
        attention_layers: ``"name"``, a list of names (same in both models),
            or a mapping ``{student_layer: teacher_layer}``; all required.
        attention_weight: in ``[0, 1]`` (default 0.3, as AiDotNet).
        mode: an :class:`AttentionMode` or its value (default ``"mse"``).
        temperature, alpha: of the output ``kd_loss``.
        p, variant, pool: options of ``attention_transfer`` (mode TRANSFER).
        inputs: ``"probs"`` or ``"logits"``, for mode KL.
        missing_layer: ``"raise"`` (default) or ``"skip"`` (see
            :class:`~kdnumba.strategies.feature.LayerwiseStrategy`).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
    """

    weight_arg = "attention_weight"

    def __init__(self, attention_layers, attention_weight: float = 0.3,
                 mode: AttentionMode | str = AttentionMode.MSE, temperature: float = 3.0,
                 alpha: float = 0.3, *, p: int = 2, variant: str = "repdistiller",
                 pool: bool = False, inputs: str = "probs", missing_layer: str = "raise",
                 device: str = "auto"):
        super().__init__(attention_layers, attention_weight, temperature, alpha,
                         layers_arg="attention_layers", weight_arg="attention_weight",
                         missing_layer=missing_layer, device=device)
        try:
            self.mode = AttentionMode(mode)
        except ValueError:
            raise ValueError(f"mode must be one of {[m.value for m in AttentionMode]}, "
                             f"got {mode!r}") from None
        self.p = v.check_int(p, "p", minimum=1)
        if variant not in AT_VARIANTS:
            raise ValueError(f"variant must be one of {AT_VARIANTS}, got {variant!r}")
        if not isinstance(pool, bool):
            raise TypeError(f"pool must be True or False, got {pool!r}")
        if inputs not in MAP_INPUTS:
            raise ValueError(f"inputs must be one of {MAP_INPUTS}, got {inputs!r}")
        self.variant = variant
        self.pool = pool
        self.inputs = inputs

    @property
    def attention_layers(self) -> dict[str, str]:
        """The configured ``{student_layer: teacher_layer}`` pairs (a copy)."""
        return dict(self.layers)

    @property
    def attention_weight(self) -> float:
        return self.weight

    def _layer_loss(self, student, teacher, student_layer):
        if self.mode is AttentionMode.TRANSFER:
            return attention_transfer(student, teacher, p=self.p, variant=self.variant,
                                      pool=self.pool, device=self.device)
        return attention_map_loss(student, teacher, kind=self.mode.value, inputs=self.inputs,
                                  device=self.device)
