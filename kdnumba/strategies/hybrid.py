"""Weighted combination of strategies: :class:`HybridDistillationStrategy`."""

from __future__ import annotations

import inspect
import math

import numpy as np

from kdnumba import _validation as v
from kdnumba.strategies.base import (
    DistillationStrategy,
    IntermediateActivations,
    IntermediateActivationStrategy,
    IntermediateStrategyMixin,
    check_activations,
)

#: Tolerance on the sum of the weights.
WEIGHT_SUM_TOL = 1e-6


class HybridDistillationStrategy(DistillationStrategy, IntermediateStrategyMixin):
    r"""Several strategies at once, weighted (AiDotNet ``HybridDistillationStrategy``).

    With members ``(strategy_k, w_k)``, ``w_k`` in ``[0, 1]`` and
    ``sum_k w_k = 1`` (within 1e-6)::

        loss         = sum_k w_k * loss_k(student_output, teacher_output, labels)
        d loss / d s = sum_k w_k * grad_k
        intermediate loss = sum_k w_k * intermediate_loss_k     (members that have one)
        intermediate grad[layer] = sum_k w_k * intermediate_grad_k[layer]

    Each member's fused ``loss_and_gradient`` (and
    ``intermediate_loss_and_gradient``, when it has one) is called once per
    call, so no member is computed twice. Members with weight 0 are not
    computed at all. Unlike AiDotNet's, the hybrid also implements the
    intermediate protocol: members that implement
    :class:`~kdnumba.strategies.IntermediateActivationStrategy` are
    forwarded to, and gradients of the same layer from several members are
    summed (their shapes must agree). Members without an intermediate part
    (e.g. :class:`~kdnumba.DistillationLoss`) simply contribute nothing
    there; the member weights are not renormalised. Members may be hybrids.

    A member's own split between output and intermediate loss is kept: e.g.
    ``[(DistillationLoss(), 0.4), (AttentionDistillationStrategy(..., attention_weight=0.3), 0.6)]``
    has output loss ``0.4 kd + 0.6 * 0.7 kd`` and intermediate loss
    ``0.6 * 0.3 attention``.

    Labels: ``intermediate_loss_and_gradient`` (and the protocol's two
    methods) take an optional ``labels=`` keyword and forward it to every
    member whose intermediate method accepts ``labels`` (e.g. a contrastive
    member in ``SUPERVISED``/``TRIPLET`` mode, which requires them); the
    members' signatures are read once, at construction. Missing layers
    follow each member's own ``missing_layer`` setting.

    Args:
        strategies: a non-empty list of ``(strategy, weight)`` pairs. A
            strategy is a :class:`~kdnumba.DistillationStrategy` or any object
            with a ``loss_and_gradient(student, teacher, labels)`` method.
        temperature, alpha: kept for API parity with AiDotNet, where they are
            the defaults of members that do not set their own. In Python every
            member is constructed with its own settings, so these are only
            validated (``temperature > 0``, ``alpha`` in ``[0, 1]``) and stored
            as attributes; they enter no computation.
        device: validated and stored for uniformity; each member runs on its
            own ``device``.

    Raises:
        TypeError: a non-pair entry, a member that is not a strategy, a
            non-real weight.
        ValueError: no members, a weight outside ``[0, 1]``, weights that do
            not sum to 1, bad ``temperature``/``alpha``.
    """

    def __init__(self, strategies, temperature: float = 3.0, alpha: float = 0.3, *,
                 device: str = "auto"):
        super().__init__(device=device)
        self.temperature = v.check_positive(temperature, "temperature")
        self.alpha = v.check_unit_interval(alpha, "alpha")
        self._members = _check_members(strategies)
        self._intermediate_calls = [_intermediate_call(s) for s, _ in self._members]

    @property
    def strategies(self) -> list[tuple[object, float]]:
        """The ``(strategy, weight)`` pairs (a new list; see :meth:`get_strategies`)."""
        return list(self._members)

    def get_strategies(self) -> list[tuple[object, float]]:
        """The ``(strategy, weight)`` pairs (a new list; the strategies themselves are shared)."""
        return list(self._members)

    def loss_and_gradient(self, student_output, teacher_output, labels=None
                          ) -> tuple[float, np.ndarray]:
        """Weighted sum of the members' fused ``(loss, gradient)``."""
        total = 0.0
        grad = None
        for index, (strategy, weight) in self._active():
            loss, member_grad = strategy.loss_and_gradient(student_output, teacher_output, labels)
            total += weight * loss
            grad = _accumulate(grad, member_grad, weight, f"strategies[{index}]", "gradient")
        return total, grad

    def intermediate_loss_and_gradient(self, student_acts, teacher_acts, *, labels=None
                                       ) -> tuple[float, IntermediateActivations]:
        """Weighted sum over members with an intermediate part; gradients summed per
        layer. ``labels`` go to the members whose intermediate method takes them."""
        check_activations(student_acts, "student_acts")
        check_activations(teacher_acts, "teacher_acts")
        total = 0.0
        grads = IntermediateActivations()
        for index, (_, weight) in self._active():
            call = self._intermediate_calls[index]
            if call is None:
                continue
            loss, member_grads = call(student_acts, teacher_acts, labels)
            total += weight * loss
            for layer, member_grad in member_grads.items():
                grads[layer] = _accumulate(grads.get(layer), member_grad, weight,
                                           f"strategies[{index}]", f"gradient of layer {layer!r}")
        return total, grads

    def compute_intermediate_loss(self, student_acts, teacher_acts, *, labels=None) -> float:
        """Weighted intermediate loss (see the protocol)."""
        return self.intermediate_loss_and_gradient(student_acts, teacher_acts, labels=labels)[0]

    def compute_intermediate_gradient(self, student_acts, teacher_acts, *, labels=None
                                      ) -> IntermediateActivations:
        """Weighted intermediate gradients, only for contributing layers."""
        return self.intermediate_loss_and_gradient(student_acts, teacher_acts, labels=labels)[1]

    def _active(self):
        return ((i, (s, w)) for i, (s, w) in enumerate(self._members) if w != 0.0)


def _check_members(strategies) -> list[tuple[object, float]]:
    if isinstance(strategies, (str, bytes)) or not hasattr(strategies, "__iter__"):
        raise TypeError("strategies must be a list of (strategy, weight) pairs, "
                        f"got {type(strategies).__name__}")
    members = []
    for i, item in enumerate(strategies):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"strategies[{i}] must be a (strategy, weight) pair, got {item!r}")
        strategy, weight = item
        if not (isinstance(strategy, DistillationStrategy)
                or callable(getattr(strategy, "loss_and_gradient", None))):
            raise TypeError(
                f"strategies[{i}] holds {type(strategy).__name__}, which is not a distillation "
                "strategy (a DistillationStrategy, or an object with a loss_and_gradient method)")
        weight = v.check_real(weight, f"weight of strategies[{i}]")
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"weight of strategies[{i}] must be in [0, 1], got {weight!r}")
        members.append((strategy, weight))
    if not members:
        raise ValueError("strategies must hold at least one (strategy, weight) pair")
    total = math.fsum(w for _, w in members)
    if abs(total - 1.0) > WEIGHT_SUM_TOL:
        raise ValueError(f"strategy weights must sum to 1 (within {WEIGHT_SUM_TOL:g}), "
                         f"got {total:.9g}")
    return members


def _accepts_labels(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "labels" or p.kind is p.VAR_KEYWORD for p in params)


def _intermediate_call(strategy):
    """``call(student_acts, teacher_acts, labels) -> (loss, grads)`` for a member with
    an intermediate part (its fused method, else its two protocol methods; ``labels``
    passed as a keyword to those that accept it), or ``None``."""
    if not isinstance(strategy, IntermediateActivationStrategy):
        return None
    fused = getattr(type(strategy), "intermediate_loss_and_gradient", None)
    if fused is not None and fused is not IntermediateStrategyMixin.intermediate_loss_and_gradient:
        fn = strategy.intermediate_loss_and_gradient
        takes = _accepts_labels(fn)
        return lambda s, t, labels: fn(s, t, **({"labels": labels} if takes else {}))
    loss_fn = strategy.compute_intermediate_loss
    grad_fn = strategy.compute_intermediate_gradient
    loss_takes, grad_takes = _accepts_labels(loss_fn), _accepts_labels(grad_fn)
    return lambda s, t, labels: (
        loss_fn(s, t, **({"labels": labels} if loss_takes else {})),
        grad_fn(s, t, **({"labels": labels} if grad_takes else {})))


def _accumulate(total, grad, weight, who, what):
    """``total + weight * grad`` (a new array when ``total`` is None), shapes checked."""
    weighted = grad * weight
    if total is None:
        return weighted
    if weighted.shape != total.shape:
        raise ValueError(f"{who} returned a {what} of shape {weighted.shape}, but earlier "
                         f"members returned {total.shape}")
    total += weighted
    return total
