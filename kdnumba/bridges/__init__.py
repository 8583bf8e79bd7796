"""Framework bridges: kdnumba losses inside PyTorch autograd and JAX transforms.

The bridges themselves are the public modules :mod:`kdnumba.torch` and
:mod:`kdnumba.jax` (``import kdnumba.torch``); each imports its framework.
This package holds only their framework-free core (:mod:`._adapter`), so
``import kdnumba`` or ``import kdnumba.bridges`` never imports PyTorch or JAX.

Every bridge function differentiates with respect to its *first* argument
only (the student's output); teacher outputs and labels are constants, as in
distillation.
"""

from kdnumba.bridges._adapter import (
    REGISTERED,
    LossAdapter,
    export_losses,
    intermediate_loss_and_gradient,
    registered_losses,
)

__all__ = ["REGISTERED", "LossAdapter", "export_losses", "intermediate_loss_and_gradient",
           "registered_losses"]
