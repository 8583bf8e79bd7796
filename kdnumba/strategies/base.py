"""What every strategy shares: the strategy base class, the intermediate
activation container and the intermediate-activation protocol.

A *strategy* turns a batch of student outputs, teacher outputs and optional
labels into a loss and its gradient with respect to the student outputs
(AiDotNet's ``IDistillationStrategy``). Strategies that also compare internal
layers implement :class:`IntermediateActivationStrategy`
(AiDotNet's ``IIntermediateActivationStrategy``).
"""

from __future__ import annotations

import enum
import inspect
import numbers
import os
import sys
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, MutableMapping
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np

from kdnumba import _dispatch
from kdnumba import _validation as v


class IntermediateActivations(MutableMapping):
    """Mapping ``layer name -> array (B, ...)`` of one model's internal outputs.

    >>> acts = IntermediateActivations()
    >>> acts.add("layer3", np.zeros((32, 128), np.float32))

    Arrays are stored as given (no copy); kdnumba never writes to them.
    """

    __slots__ = ("_layers",)

    def __init__(self, layers: Mapping | None = None, /, **named):
        self._layers: dict[str, object] = {}
        for name, array in {**dict(layers or {}), **named}.items():
            self.add(name, array)

    def add(self, name: str, array) -> IntermediateActivations:
        """Store ``array`` under ``name`` (replacing a previous one); returns self."""
        self[name] = array
        return self

    def __setitem__(self, name: str, array) -> None:
        v.check_name(name, "layer name")
        self._layers[name] = array

    def __getitem__(self, name: str):
        return self._layers[name]

    def __delitem__(self, name: str) -> None:
        del self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k!r}: {getattr(a, 'shape', '?')}" for k, a in self._layers.items())
        return f"IntermediateActivations({{{shapes}}})"


@runtime_checkable
class IntermediateActivationStrategy(Protocol):
    """Protocol of strategies that also match intermediate layers.

    Both methods return values *already multiplied by the strategy's weight*;
    the gradient holds only the layers that contributed to the loss, each of
    the same shape as the student's activation.
    """

    def compute_intermediate_loss(self, student_acts: IntermediateActivations,
                                  teacher_acts: IntermediateActivations) -> float: ...

    def compute_intermediate_gradient(self, student_acts: IntermediateActivations,
                                      teacher_acts: IntermediateActivations
                                      ) -> IntermediateActivations: ...


class DistillationStrategy(ABC):
    """Base of every strategy: ``loss_and_gradient`` plus derived accessors.

    Subclasses implement the fused :meth:`loss_and_gradient`; the seeds'
    ``compute_loss``/``compute_gradient`` are views of it, so loss and
    gradient always come from the same computation.

    Conventions every subclass follows (``docs/api.md``, "Strategies"):

    * **Parameters are attributes.** Each ``__init__`` parameter is readable
      as an attribute of the same name holding the validated (normalised)
      value; :meth:`get_params` and ``repr`` are derived from them.
    * **Weights.** :attr:`weight_arg` names the constructor argument that
      weighs the intermediate part (``None`` when there is none);
      :attr:`weight_split` tells whether it is a ``[0, 1]`` split
      (output ``(1 - w) * kd_loss``, intermediate ``w * loss``: the rule) or,
      as an exception, a ``>= 0`` factor of the intermediate loss only.
    * **Missing layers.** Strategies that read named layers take
      ``missing_layer="raise" | "skip"`` (see :func:`check_missing_layer`).
    """

    #: Constructor argument that weighs the intermediate part, or ``None``.
    weight_arg: ClassVar[str | None] = None
    #: ``True``: ``weight_arg`` is a ``[0, 1]`` split between output and
    #: intermediate loss; ``False``: a ``>= 0`` factor of the intermediate loss.
    weight_split: ClassVar[bool] = True

    def __init__(self, *, device: str = "auto"):
        self.device = _dispatch.check_device(device)

    @abstractmethod
    def loss_and_gradient(self, student_output, teacher_output, labels=None
                          ) -> tuple[float, np.ndarray]:
        """``(loss, d loss / d student_output)`` for one batch."""

    def compute_loss(self, student_output, teacher_output, labels=None) -> float:
        """The loss of :meth:`loss_and_gradient`."""
        return self.loss_and_gradient(student_output, teacher_output, labels)[0]

    def compute_gradient(self, student_output, teacher_output, labels=None) -> np.ndarray:
        """The gradient of :meth:`loss_and_gradient` (student's shape and dtype)."""
        return self.loss_and_gradient(student_output, teacher_output, labels)[1]

    # --- parameters and repr (scikit-learn's BaseEstimator convention) --------------

    @classmethod
    def _param_names(cls) -> list[str]:
        """Names of the ``__init__`` parameters, in signature order."""
        init = cls.__init__
        if init is object.__init__:
            return []
        return [p.name for p in inspect.signature(init).parameters.values()
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    def get_params(self) -> dict[str, object]:
        """``{parameter: value}`` for every ``__init__`` parameter, read from the
        attribute of the same name (the validated value), in signature order.

        Raises ``AttributeError`` naming a parameter that has no such attribute
        (every kdnumba strategy has them all; a user's subclass may not)."""
        params = {}
        for name in self._param_names():
            try:
                params[name] = getattr(self, name)
            except AttributeError:
                raise AttributeError(
                    f"{type(self).__name__} has no attribute {name!r} for its __init__ "
                    "parameter of that name; store each parameter under its own name") from None
        return params

    def __repr__(self) -> str:
        """``ClassName(param=value, ...)`` listing *every* constructor parameter
        as a keyword, in signature order, with the value the object holds.

        ``eval`` of it rebuilds an equal strategy, given ``kdnumba``'s names
        (``from kdnumba import *``) and ``array`` (``from numpy import array``)
        for array-valued parameters; arrays of more than
        :data:`REPR_ARRAY_LIMIT` elements are summarised and then not eval-able.
        """
        # Parameters without an attribute (possible in a user's subclass) are left out
        # rather than making repr raise.
        names = [n for n in self._param_names() if hasattr(self, n)]
        args = ", ".join(f"{name}={format_param(getattr(self, name))}" for name in names)
        return f"{type(self).__name__}({args})"


#: Arrays with more elements are summarised in reprs (then not eval-able).
REPR_ARRAY_LIMIT = 1000


def format_param(value) -> str:
    """An eval-able rendering of one parameter value for :meth:`DistillationStrategy.__repr__`:
    enum members as ``Class.MEMBER``, NumPy scalars as Python numbers, arrays as
    ``array([...], dtype='...')`` with round-trip precision (over
    :data:`REPR_ARRAY_LIMIT` elements, a non-eval-able summary), containers
    recursively, anything else by its own ``repr``."""
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, (bool, np.bool_)):
        return repr(bool(value))
    if isinstance(value, np.integer):
        return repr(int(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    if isinstance(value, numbers.Number) or value is None or isinstance(value, str):
        return repr(value)
    if isinstance(value, np.ndarray):
        if value.size > REPR_ARRAY_LIMIT:
            return f"<array of shape {value.shape}, dtype {value.dtype.name}>"
        # tolist() gives Python numbers whose repr round-trips exactly (float32 too).
        return f"array({value.tolist()!r}, dtype={value.dtype.name!r})"
    if isinstance(value, Mapping):
        items = ", ".join(f"{format_param(k)}: {format_param(v)}" for k, v in value.items())
        return "{" + items + "}"
    if isinstance(value, tuple):
        inner = ", ".join(format_param(x) for x in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return "[" + ", ".join(format_param(x) for x in value) + "]"
    return repr(value)


#: Values of the ``missing_layer`` argument.
MISSING_LAYER_CHOICES = ("raise", "skip")


def check_missing_layer(value) -> str:
    """Validate ``missing_layer``: ``"raise"`` (the default everywhere: a
    missing layer is a ``ValueError`` naming it and the layers present) or
    ``"skip"`` (a missing layer contributes nothing: no loss, no gradient
    entry, no warning)."""
    if not isinstance(value, str) or value not in MISSING_LAYER_CHOICES:
        raise ValueError(f"missing_layer must be one of {MISSING_LAYER_CHOICES}, got {value!r}")
    return value


def missing_layer_error(owner: str, layer: str, acts_name: str, acts) -> ValueError:
    """The ``ValueError`` for ``layer`` absent from ``acts``: names the layer, the
    activations, the layers present and the ``missing_layer="skip"`` opt-out."""
    present = ", ".join(repr(k) for k in acts) or "none"
    return ValueError(
        f"{owner}: layer {layer!r} is missing from {acts_name} (layers present: {present}); "
        "check the layer name, or pass missing_layer='skip' to ignore missing layers")


class IntermediateStrategyMixin:
    """Implements the protocol's two methods from one fused
    :meth:`intermediate_loss_and_gradient`, which subclasses provide -- or,
    for a subclass that implements the two protocol methods instead, the
    fused method from those, so every caller can use either form."""

    def intermediate_loss_and_gradient(self, student_acts, teacher_acts
                                       ) -> tuple[float, IntermediateActivations]:
        """``(compute_intermediate_loss, compute_intermediate_gradient)`` when the
        subclass implements both; a subclass should override this instead."""
        cls, mixin = type(self), IntermediateStrategyMixin
        if (cls.compute_intermediate_loss is mixin.compute_intermediate_loss
                or cls.compute_intermediate_gradient is mixin.compute_intermediate_gradient):
            raise NotImplementedError(
                f"{cls.__name__} must implement intermediate_loss_and_gradient, or both "
                "compute_intermediate_loss and compute_intermediate_gradient")
        return (self.compute_intermediate_loss(student_acts, teacher_acts),
                self.compute_intermediate_gradient(student_acts, teacher_acts))

    def compute_intermediate_loss(self, student_acts, teacher_acts) -> float:
        """Weighted intermediate loss (see the protocol)."""
        return self.intermediate_loss_and_gradient(student_acts, teacher_acts)[0]

    def compute_intermediate_gradient(self, student_acts, teacher_acts
                                      ) -> IntermediateActivations:
        """Weighted intermediate gradients, only for contributing layers."""
        return self.intermediate_loss_and_gradient(student_acts, teacher_acts)[1]


def check_activations(acts, name: str) -> IntermediateActivations | Mapping:
    """Accept an :class:`IntermediateActivations` or any mapping of arrays."""
    if not isinstance(acts, Mapping):
        raise TypeError(
            f"{name} must be an IntermediateActivations (or a mapping name -> array), "
            f"got {type(acts).__name__}")
    return acts


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def warn_user(message: str) -> None:
    """A ``UserWarning`` attributed to the first calling frame outside kdnumba
    (however many kdnumba frames, e.g. a hybrid strategy or a trainer, lie
    between), so the warning points at the user's line.

    Not for missing layers: those raise, or are skipped silently
    (``missing_layer``; see ``docs/api.md``)."""
    level = 1  # stacklevel 1 is this function, the caller of warnings.warn
    frame = sys._getframe()
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    warnings.warn(message, UserWarning, stacklevel=level)
