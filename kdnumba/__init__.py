"""kdnumba: knowledge-distillation losses and their exact gradients, on Numba.

Layers (arrows point down only)::

    strategies/   thin validated classes (DistillationLoss, ...)
    functional/   pure (loss, grad) functions, one body for both devices;
                  each loss declared once in ``registry``
    _dispatch     the backend of a call (host or CUDA); CUDA imported lazily
    kernels/      @njit kernels on arrays (cpu/), numba.cuda variants (cuda/)
    _policy       the one Numba compilation policy

Beside them: ``reference/`` (NumPy references), ``training/`` (a loop for
models outside PyTorch), ``benchmarking/`` (``kdnumba bench``), and the
framework bridges ``kdnumba.torch`` / ``kdnumba.jax`` (imported only on
request; ``import kdnumba`` never imports torch or jax).
"""

from kdnumba import functional, strategies
from kdnumba.strategies import *  # noqa: F403 -- the strategies' own export list

__version__ = "0.1.0"

__all__ = [*strategies.__all__, "functional", "__version__"]
