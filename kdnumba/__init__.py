"""kdnumba: knowledge-distillation losses and their exact gradients, on Numba.

Layers (arrows point down only)::

    strategies/   thin validated classes (DistillationLoss, ...)
    functional/   pure (loss, grad) functions: validate -> dispatch -> kernel
    _dispatch     (device, family) -> kernel module; CUDA imported lazily
    kernels/      @njit kernels on arrays (cpu/), numba.cuda variants (cuda/)
    _policy       the one Numba compilation policy

Beside them: ``reference/`` (NumPy references), ``training/`` (a loop for
models outside PyTorch), ``benchmarking/`` (``kdnumba bench``), and the
framework bridges ``kdnumba.torch`` / ``kdnumba.jax`` (imported only on
request; ``import kdnumba`` never imports torch or jax).
"""

from kdnumba import functional
from kdnumba.strategies import (
    AttentionDistillationStrategy,
    AttentionMode,
    ContrastiveDistillationStrategy,
    CRDStrategy,
    ContrastiveMode,
    DecoupledDistillationStrategy,
    DISTStrategy,
    DistillationLoss,
    DistillationStrategy,
    FeatureDistillationStrategy,
    HCLStrategy,
    HybridDistillationStrategy,
    IntermediateActivations,
    IntermediateActivationStrategy,
    NSTStrategy,
    NeuronSelectivityDistillationStrategy,
    PKTStrategy,
    RelationalDistillationStrategy,
    SelectivityMetric,
    SimilarityPreservingStrategy,
)

__version__ = "0.1.0"

__all__ = [
    "CRDStrategy",
    "AttentionDistillationStrategy",
    "AttentionMode",
    "ContrastiveDistillationStrategy",
    "ContrastiveMode",
    "DISTStrategy",
    "DecoupledDistillationStrategy",
    "DistillationLoss",
    "DistillationStrategy",
    "FeatureDistillationStrategy",
    "HCLStrategy",
    "HybridDistillationStrategy",
    "IntermediateActivationStrategy",
    "IntermediateActivations",
    "NSTStrategy",
    "NeuronSelectivityDistillationStrategy",
    "PKTStrategy",
    "RelationalDistillationStrategy",
    "SelectivityMetric",
    "SimilarityPreservingStrategy",
    "functional",
    "__version__",
]
