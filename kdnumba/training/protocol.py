"""The protocol a model follows to be trained by :class:`kdnumba.training.Distiller`.

kdnumba never sees a model's parameters: it only needs outputs, named
intermediate activations, and a way to push gradients back. Any object with the
four methods of :class:`Student` can be distilled into, whatever computes it
(NumPy, JAX on CPU, a C extension, a hand-written network). A teacher only needs
:meth:`Teacher.forward` -- or no code at all: a :class:`~kdnumba.training.TeacherOutputs`
of precomputed arrays (e.g. dumped from PyTorch) is accepted wherever a teacher is.

The contract, for one minibatch ``x`` of ``B`` rows::

    outputs, acts = model.forward(x, collect=("embeddings",))
    # outputs: (B, C) array (logits); acts: IntermediateActivations holding
    # exactly the requested layers, acts[name] of shape (B, ...)

    model.backward(d_outputs, IntermediateActivations(embeddings=d_embeddings))
    # d_outputs     = dL/d outputs            (B, C)
    # d_embeddings  = dL/d acts["embeddings"]  same shape as the activation
    # The model computes the gradient of its parameters for the loss
    #   L(theta) = L_out(outputs(theta)) + sum_l L_l(acts_l(theta))
    # i.e. by the chain rule
    #   dL/dtheta = J_out^T d_outputs + sum_l J_l^T d_acts_l
    # -- the seeds' ``BackpropagateFromIntermediateLayers``: each intermediate
    # gradient is *added* to the gradient flowing down from above when the
    # backward pass reaches that layer.

    model.step()           # apply the update from the last backward
    logits = model.predict(x_test)   # inference only, nothing kept for backward

Rules:

* ``backward`` refers to the most recent ``forward`` (the model keeps what it
  needs); it *replaces* (does not accumulate) the parameter gradients.
* The intermediate gradients hold only layers that contributed to the loss;
  a layer absent from them receives no extra gradient.
* Neither method modifies the arrays it is given.
* Optional extras the trainer uses when present:
  ``state_dict()``/``load_state_dict(state)`` (early stopping restores the best
  epoch; ``Distiller.fit(checkpoint=...)`` saves them),
  ``optimizer_state()``/``load_optimizer_state(state)`` (dicts of arrays: a
  checkpoint then resumes the optimiser exactly), ``fingerprint()`` (a string
  identifying the weights, so the teacher cache notices a retrained teacher),
  ``layer_names`` (checked up front) and ``layer_sizes``/``n_outputs`` (labels
  are checked against the number of outputs before training).

:class:`kdnumba.training.MLP` implements this protocol in ~200 lines of NumPy
and is the template for a user's own model.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol, runtime_checkable

import numpy as np

from kdnumba.strategies.base import IntermediateActivations


@runtime_checkable
class Teacher(Protocol):
    """Anything that maps a batch to outputs plus named activations."""

    def forward(self, x, collect: Collection[str] = ()
                ) -> tuple[np.ndarray, IntermediateActivations]:
        """``(outputs (B, C), activations of exactly the layers in collect)``."""
        ...


@runtime_checkable
class Student(Protocol):
    """A trainable model: forward with named activations, backward that accepts
    gradients injected at intermediate layers, a parameter update, inference."""

    def forward(self, x, collect: Collection[str] = ()
                ) -> tuple[np.ndarray, IntermediateActivations]:
        """Training forward pass; remembers what :meth:`backward` needs."""
        ...

    def backward(self, output_grad, intermediate_grads: IntermediateActivations | None = None
                 ) -> object:
        """Parameter gradients of ``L_out + sum_l L_l`` for the last forward:
        ``J_out^T output_grad + sum_l J_l^T intermediate_grads[l]``."""
        ...

    def step(self) -> None:
        """Update the parameters with the gradients of the last backward."""
        ...

    def predict(self, x) -> np.ndarray:
        """Outputs (logits) for ``x``, inference only."""
        ...


def check_student(model) -> None:
    """``TypeError`` naming the missing methods if ``model`` is not a :class:`Student`."""
    missing = [m for m in ("forward", "backward", "step", "predict")
               if not callable(getattr(model, m, None))]
    if missing:
        raise TypeError(
            f"student must implement the kdnumba.training.Student protocol "
            f"(forward, backward, step, predict); {type(model).__name__} lacks "
            f"{', '.join(missing)}")


def check_teacher(model) -> None:
    """``TypeError`` unless ``model`` has a callable ``forward``."""
    if not callable(getattr(model, "forward", None)):
        raise TypeError(
            "teacher must have forward(x, collect=()) -> (outputs, IntermediateActivations), "
            f"or be a kdnumba.training.TeacherOutputs; got {type(model).__name__}")
