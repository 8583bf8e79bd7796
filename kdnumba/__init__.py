"""kdnumba: knowledge-distillation losses and their exact gradients, on Numba.

Layers (arrows point down only)::

    strategies/   thin validated classes (DistillationLoss, ...)
    functional/   pure (loss, grad) functions: validate -> dispatch -> kernel
    _dispatch     (device, family) -> kernel module; CUDA imported lazily
    kernels/      @njit kernels on arrays (cpu/), numba.cuda variants (cuda/)
    _policy       the one Numba compilation policy
"""

from kdnumba import functional
from kdnumba.strategies import (
    DistillationLoss,
    DistillationStrategy,
    IntermediateActivations,
    IntermediateActivationStrategy,
)

__version__ = "0.1.0"

__all__ = [
    "DistillationLoss",
    "DistillationStrategy",
    "IntermediateActivationStrategy",
    "IntermediateActivations",
    "functional",
    "__version__",
]
