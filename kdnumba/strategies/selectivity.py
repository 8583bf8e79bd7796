"""Neuron-selectivity distillation: :class:`NeuronSelectivityDistillationStrategy`."""

from __future__ import annotations

import numpy as np

from kdnumba import _validation as v
from kdnumba.functional import kd_loss
from kdnumba.functional.selectivity import (
    DEFAULT_EPS,
    DEFAULT_SHARPNESS,
    DEFAULT_THRESHOLD,
    SelectivityMetric,
    selectivity_loss,
)
from kdnumba.strategies.base import (
    DistillationStrategy,
    IntermediateActivations,
    IntermediateStrategyMixin,
    check_activations,
    check_missing_layer,
    missing_layer_error,
)

__all__ = ["NeuronSelectivityDistillationStrategy", "SelectivityMetric"]


class NeuronSelectivityDistillationStrategy(DistillationStrategy, IntermediateStrategyMixin):
    r"""Match how selective each neuron of a student layer is to the teacher's
    (AiDotNet ``NeuronSelectivityDistillationStrategy``).

    Two parts, used together in a training step::

        output loss       = kd_loss(student_logits, teacher_logits, labels; T, alpha)
        intermediate loss = selectivity_weight * 1/N sum_j (sel_j(s) - sel_j(t))**2

    where ``s``/``t`` are the activations of ``target_layer_name`` (shape
    ``(B, ...)``, flattened to ``(B, N)``) and ``sel_j`` is a per-neuron
    statistic over the batch chosen by ``metric`` (see
    :func:`kdnumba.functional.selectivity_loss` for formulas and gradients):
    population variance, relaxed sparsity
    ``mean_i sigmoid(sharpness * (1 - |a_ij| / threshold))``, or peak-to-average
    ``max_i a_ij / (mean_i |a_ij| + eps)``.

    >>> strategy = NeuronSelectivityDistillationStrategy("layer3", metric="sparsity")
    >>> out_loss, out_grad = strategy.loss_and_gradient(s_logits, t_logits, labels)
    >>> sel_loss, sel_grads = strategy.intermediate_loss_and_gradient(
    ...     {"layer3": s_act}, {"layer3": t_act})
    >>> # backpropagate out_grad into the output layer, sel_grads["layer3"] into layer3

    If ``target_layer_name`` is missing from the activations, a ``ValueError``
    names it and the layers present (AiDotNet silently returns 0); with
    ``missing_layer="skip"`` the intermediate loss is then 0 and the gradient
    empty, without a warning.

    Weights: ``selectivity_weight`` is the one exception to the strategies'
    ``[0, 1]`` split rule (``docs/api.md``): a plain ``>= 0`` factor of the
    intermediate loss, while the output loss is the full ``kd_loss``.

    Args:
        target_layer_name: the layer whose neurons are compared.
        selectivity_weight: ``>= 0`` factor of the intermediate loss (0.5).
        metric: a :class:`SelectivityMetric` or its string value.
        temperature: ``T > 0`` of the output KD loss (3.0).
        alpha: hard-label weight of the output KD loss in ``[0, 1]`` (0.3).
        threshold: ``> 0`` "near zero" bound of the sparsity metric (0.01).
        sharpness: ``> 0`` sharpness of the sparsity relaxation (10).
        eps: ``> 0`` denominator epsilon of the peak-to-average metric (1e-8).
        missing_layer: ``"raise"`` (default) or ``"skip"`` (see above).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
    """

    weight_arg = "selectivity_weight"
    weight_split = False  # SPEC: a plain factor; the output loss is the full kd_loss

    def __init__(self, target_layer_name: str = "default", selectivity_weight: float = 0.5,
                 metric=SelectivityMetric.VARIANCE, temperature: float = 3.0,
                 alpha: float = 0.3, *, threshold: float = DEFAULT_THRESHOLD,
                 sharpness: float = DEFAULT_SHARPNESS, eps: float = DEFAULT_EPS,
                 missing_layer: str = "raise", device: str = "auto"):
        super().__init__(device=device)
        self.target_layer_name = v.check_name(target_layer_name, "target_layer_name")
        self.selectivity_weight = v.check_non_negative(selectivity_weight, "selectivity_weight")
        self.metric = SelectivityMetric.parse(metric)
        self.temperature = v.check_positive(temperature, "temperature")
        self.alpha = v.check_unit_interval(alpha, "alpha")
        self.threshold = v.check_positive(threshold, "threshold")
        self.sharpness = v.check_positive(sharpness, "sharpness")
        self.eps = v.check_positive(eps, "eps")
        self.missing_layer = check_missing_layer(missing_layer)

    # --- output part -------------------------------------------------------------
    def loss_and_gradient(self, student_output, teacher_output, labels=None
                          ) -> tuple[float, np.ndarray]:
        """KD loss on final outputs and its gradient (no selectivity term; see
        :func:`kdnumba.functional.kd_loss`)."""
        return kd_loss(student_output, teacher_output, labels,
                       temperature=self.temperature, alpha=self.alpha, device=self.device)

    # --- selectivity part ----------------------------------------------------------
    def selectivity_loss_and_gradient(self, student_acts, teacher_acts, *, weight: float = 1.0
                                      ) -> tuple[float, np.ndarray]:
        """``(weight * loss, weight * grad)`` of the selectivity metric on two
        activation arrays ``(B, ...)``; the gradient has the student's shape."""
        return selectivity_loss(student_acts, teacher_acts, metric=self.metric,
                                threshold=self.threshold, sharpness=self.sharpness,
                                eps=self.eps, weight=weight, device=self.device)

    def compute_selectivity_loss(self, student_acts, teacher_acts) -> float:
        """Unweighted selectivity loss of two activation arrays ``(B, ...)``
        (AiDotNet's ``ComputeSelectivityLoss``)."""
        return self.selectivity_loss_and_gradient(student_acts, teacher_acts)[0]

    def intermediate_loss_and_gradient(self, student_acts, teacher_acts
                                       ) -> tuple[float, IntermediateActivations]:
        """``selectivity_weight *`` the selectivity loss on ``target_layer_name``
        and its gradient as ``{target_layer_name: grad}``. A layer missing from
        either side raises ``ValueError`` (``missing_layer="raise"``) or gives
        ``(0.0, empty)`` (``missing_layer="skip"``)."""
        check_activations(student_acts, "student_acts")
        check_activations(teacher_acts, "teacher_acts")
        name = self.target_layer_name
        for side, acts in (("student_acts", student_acts), ("teacher_acts", teacher_acts)):
            if name not in acts:
                if self.missing_layer == "skip":
                    return 0.0, IntermediateActivations()
                raise missing_layer_error(type(self).__name__, name, side, acts)
        try:
            loss, grad = selectivity_loss(
                student_acts[name], teacher_acts[name], metric=self.metric,
                threshold=self.threshold, sharpness=self.sharpness, eps=self.eps,
                weight=self.selectivity_weight, device=self.device)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"layer {name!r}: {exc}") from exc
        return loss, IntermediateActivations({name: grad})
