"""Feature-based distillation (FitNets): :class:`FeatureDistillationStrategy`.

Also home of :class:`LayerwiseStrategy`, the shared shape of the three
strategies that match named intermediate layers (feature, attention,
relational): a student->teacher layer mapping, one weight (a ``[0, 1]``
split), output loss ``(1 - weight) * kd_loss``, intermediate loss
``weight * mean over layers``, and the ``missing_layer`` rule.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping

import numpy as np

from kdnumba import _validation as v
from kdnumba.functional import feature_loss, kd_loss
from kdnumba.strategies.base import (
    DistillationStrategy,
    IntermediateActivations,
    IntermediateStrategyMixin,
    check_activations,
    check_missing_layer,
    missing_layer_error,
)


def layer_mapping(layers, name: str) -> dict[str, str]:
    """Normalise a layer spec to ``{student_layer: teacher_layer}``.

    ``"conv3"`` -> ``{"conv3": "conv3"}``; ``["a", "b"]`` -> same names on both
    sides; a mapping is taken as ``student -> teacher``.
    """
    if isinstance(layers, str):
        pairs = [(layers, layers)]
    elif isinstance(layers, Mapping):
        pairs = list(layers.items())
    elif isinstance(layers, (list, tuple)):
        pairs = [(layer, layer) for layer in layers]
    else:
        raise TypeError(
            f"{name} must be a layer name, a list of names, or a mapping "
            f"student layer -> teacher layer; got {type(layers).__name__}")
    if not pairs:
        raise ValueError(f"{name} must name at least one layer")
    mapping: dict[str, str] = {}
    for student, teacher in pairs:
        v.check_name(student, f"{name}: student layer name")
        v.check_name(teacher, f"{name}: teacher layer name")
        if student in mapping:
            raise ValueError(f"{name} names student layer {student!r} twice")
        mapping[student] = teacher
    return mapping


def get_layer(acts, layer: str, acts_name: str, owner: str = "this strategy"):
    """``acts[layer]``, or the ``ValueError`` of :func:`missing_layer_error`."""
    try:
        return acts[layer]
    except KeyError:
        raise missing_layer_error(owner, layer, acts_name, acts) from None


class LayerwiseStrategy(DistillationStrategy, IntermediateStrategyMixin):
    """Base of strategies that match a fixed set of named layers.

    * output loss: ``(1 - weight) * kd_loss(temperature, alpha)``;
    * intermediate loss: ``weight * 1/L * sum_l loss_l`` over the ``L``
      configured layer pairs; the gradient of student layer ``l`` is
      ``weight / L * d loss_l / d student_l``.
    * a configured layer missing from either side raises ``ValueError``
      (``missing_layer="raise"``), or, with ``missing_layer="skip"``, that pair
      contributes nothing: no term, no gradient entry, no warning (``L``
      stays the number of configured pairs, so the other terms are unchanged).

    ``weight`` is a ``[0, 1]`` split (the strategies' weight rule); subclasses
    name it (:attr:`weight_arg`) and expose it and their layer argument as
    attributes of their constructor's names. Subclasses implement
    :meth:`_layer_loss` for one pair of arrays.
    """

    def __init__(self, layers, weight, temperature, alpha, *, layers_arg: str,
                 weight_arg: str, missing_layer: str, device: str):
        super().__init__(device=device)
        self.layers = layer_mapping(layers, layers_arg)
        self.weight = v.check_unit_interval(weight, weight_arg)
        self.temperature = v.check_positive(temperature, "temperature")
        self.alpha = v.check_unit_interval(alpha, "alpha")
        self.missing_layer = check_missing_layer(missing_layer)

    def loss_and_gradient(self, student_output, teacher_output, labels=None
                          ) -> tuple[float, np.ndarray]:
        """``(1 - weight) * kd_loss`` on the final outputs and its gradient."""
        loss, grad = kd_loss(student_output, teacher_output, labels,
                             temperature=self.temperature, alpha=self.alpha, device=self.device)
        scale = 1.0 - self.weight
        grad *= grad.dtype.type(scale)
        return scale * loss, grad

    def intermediate_loss_and_gradient(self, student_acts, teacher_acts
                                       ) -> tuple[float, IntermediateActivations]:
        """``weight * mean_l loss_l`` and the per-student-layer gradients."""
        check_activations(student_acts, "student_acts")
        check_activations(teacher_acts, "teacher_acts")
        owner = type(self).__name__
        pairs = []
        for s_layer, t_layer in self.layers.items():
            if self.missing_layer == "skip" and (s_layer not in student_acts
                                                 or t_layer not in teacher_acts):
                continue
            pairs.append((s_layer, get_layer(student_acts, s_layer, "student_acts", owner),
                          get_layer(teacher_acts, t_layer, "teacher_acts", owner)))
        scale = self.weight / len(self.layers)
        total = 0.0
        grads = IntermediateActivations()
        for s_layer, s_arr, t_arr in pairs:
            try:
                loss, grad = self._layer_loss(s_arr, t_arr, s_layer)
            except (TypeError, ValueError) as exc:
                raise type(exc)(
                    f"layer {s_layer!r} -> {self.layers[s_layer]!r}: {exc}") from exc
            total += loss
            grad *= grad.dtype.type(scale)
            grads.add(s_layer, grad)
        return scale * total, grads

    @abstractmethod
    def _layer_loss(self, student, teacher, student_layer: str) -> tuple[float, np.ndarray]:
        """Unweighted ``(loss, d loss / d student)`` of one layer pair."""


class ScaledLayerwiseStrategy(LayerwiseStrategy):
    """A :class:`LayerwiseStrategy` whose per-pair loss is ``gamma * loss(s, t)``.

    The zoo's papers weigh their feature terms by large factors (SP 3000,
    PKT 30000, NST 50); ``gamma >= 0`` is that factor, applied here once for
    every such strategy. Subclasses implement :meth:`_pair_loss`, the
    unscaled ``(loss, grad)`` of one pair.
    """

    def __init__(self, layers, weight, gamma, temperature, alpha, *, layers_arg: str,
                 weight_arg: str, missing_layer: str, device: str):
        super().__init__(layers, weight, temperature, alpha, layers_arg=layers_arg,
                         weight_arg=weight_arg, missing_layer=missing_layer, device=device)
        self.gamma = v.check_non_negative(gamma, "gamma")

    @abstractmethod
    def _pair_loss(self, student, teacher) -> tuple[float, np.ndarray]:
        """The unscaled ``(loss, d loss / d student)`` of one pair of arrays."""

    def _layer_loss(self, student, teacher, student_layer):
        loss, grad = self._pair_loss(student, teacher)
        if self.gamma != 1.0:
            grad *= grad.dtype.type(self.gamma)
        return self.gamma * loss, grad


class FeatureDistillationStrategy(LayerwiseStrategy):
    r"""FitNets hint matching of intermediate features (AiDotNet ``FeatureDistillationStrategy``).

    For each configured pair, student layer ``l`` against teacher layer ``m(l)``::

        loss_l = feature_loss(s_l, t_m(l)) = mean (s_l - t_m(l))^2
        (with a projection P_l: mean (flat(s_l) @ P_l - flat(t_m(l)))^2)

        intermediate loss = feature_weight * 1/L * sum_l loss_l
        d/d s_l           = feature_weight / L * 2/n (s_l - t) [ @ P_l^T ]
        output loss       = (1 - feature_weight) * kd_loss(temperature, alpha)

    ``flat`` views ``(B, ...)`` as ``(B, N)``. The projection is a *fixed*
    matrix of the caller's (FitNets learns its regressor; train yours
    outside and pass the current one): the gradient is chained through it,
    ``grad_s = (d loss / d (s P)) @ P^T``, reshaped to the student's shape.

    Args:
        layer_mapping: ``"name"`` (same name in both models), a list of
            names, or a mapping ``{student_layer: teacher_layer}``. Every
            configured layer is required: a missing one raises a
            ``ValueError`` that lists the available layers.
        feature_weight: in ``[0, 1]``, share of the feature term (default 0.5).
        projections: ``None`` or ``{student_layer: matrix (N_s, N_t)}``;
            needed for every layer whose student and teacher shapes differ.
            Copied at construction.
        temperature, alpha: of the output ``kd_loss``.
        missing_layer: ``"raise"`` (default) or ``"skip"`` (see
            :class:`LayerwiseStrategy`).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
    """

    weight_arg = "feature_weight"

    def __init__(self, layer_mapping, feature_weight: float = 0.5, projections=None,
                 temperature: float = 3.0, alpha: float = 0.3, *,
                 missing_layer: str = "raise", device: str = "auto"):
        super().__init__(layer_mapping, feature_weight, temperature, alpha,
                         layers_arg="layer_mapping", weight_arg="feature_weight",
                         missing_layer=missing_layer, device=device)
        self.projections = self._check_projections(projections)
        self._cast: dict[tuple[str, np.dtype], np.ndarray] = {}

    @property
    def layer_mapping(self) -> dict[str, str]:
        """The configured ``{student_layer: teacher_layer}`` pairs (a copy)."""
        return dict(self.layers)

    @property
    def feature_weight(self) -> float:
        return self.weight

    def _check_projections(self, projections) -> dict[str, np.ndarray]:
        if projections is None:
            return {}
        if not isinstance(projections, Mapping):
            raise TypeError("projections must be None or a mapping student layer -> "
                            f"matrix (N_s, N_t), got {type(projections).__name__}")
        checked = {}
        for layer, matrix in projections.items():
            if layer not in self.layers:
                raise ValueError(
                    f"projections has a matrix for {layer!r}, which is not a student layer of "
                    f"layer_mapping ({', '.join(map(repr, self.layers))})")
            arr = v.as_float_array(matrix, f"projections[{layer!r}]", ndim=2)
            if not np.isfinite(arr).all():
                raise ValueError(f"projections[{layer!r}] contains NaN or inf values")
            checked[layer] = arr.copy()
        return checked

    def _projection(self, layer: str, dtype) -> np.ndarray | None:
        matrix = self.projections.get(layer)
        if matrix is None or matrix.dtype == dtype:
            return matrix
        key = (layer, np.dtype(dtype))
        if key not in self._cast:
            self._cast[key] = matrix.astype(dtype)
        return self._cast[key]

    def _layer_loss(self, student, teacher, student_layer):
        s = v.as_float_array(student, "student activation")
        t = v.as_float_array(teacher, "teacher activation", dtype=s.dtype)
        proj = self._projection(student_layer, s.dtype)
        if proj is None:
            if s.shape[0] == t.shape[0] and s.shape != t.shape:
                raise ValueError(
                    f"the student activation has shape {s.shape} and the teacher's {t.shape}; "
                    f"pass projections={{{student_layer!r}: matrix of shape "
                    f"({s[0].size}, {t[0].size})}} to map student features to the teacher's width")
            return feature_loss(s, t, device=self.device)
        v.check_same_batch(s, t, "the student activation", "the teacher activation")
        s2 = s.reshape(s.shape[0], -1)
        t2 = t.reshape(t.shape[0], -1)
        if proj.shape != (s2.shape[1], t2.shape[1]):
            raise ValueError(
                f"projections[{student_layer!r}] has shape {proj.shape}, expected "
                f"({s2.shape[1]}, {t2.shape[1]}) (student features x teacher features)")
        loss, grad = feature_loss(s2 @ proj, t2, device=self.device)
        return loss, (grad @ proj.T).reshape(s.shape)
