"""What every strategy shares: the strategy base class, the intermediate
activation container and the intermediate-activation protocol.

A *strategy* turns a batch of student outputs, teacher outputs and optional
labels into a loss and its gradient with respect to the student outputs
(AiDotNet's ``IDistillationStrategy``). Strategies that also compare internal
layers implement :class:`IntermediateActivationStrategy`
(AiDotNet's ``IIntermediateActivationStrategy``).
"""

from __future__ import annotations

import os
import sys
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Protocol, runtime_checkable

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
    """

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
    between), so the warning points at the user's line."""
    level = 1  # stacklevel 1 is this function, the caller of warnings.warn
    frame = sys._getframe()
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    warnings.warn(message, UserWarning, stacklevel=level)
