"""Strategies: thin, validated, user-facing classes over :mod:`kdnumba.functional`."""

from kdnumba.functional.selectivity import SelectivityMetric
from kdnumba.strategies.attention import AttentionDistillationStrategy, AttentionMode
from kdnumba.strategies.base import (
    DistillationStrategy,
    IntermediateActivations,
    IntermediateActivationStrategy,
    IntermediateStrategyMixin,
)
from kdnumba.strategies.contrastive import ContrastiveDistillationStrategy, ContrastiveMode
from kdnumba.strategies.crd import CRDStrategy
from kdnumba.strategies.decoupled import DecoupledDistillationStrategy, DISTStrategy
from kdnumba.strategies.feature import FeatureDistillationStrategy
from kdnumba.strategies.featuremaps import HCLStrategy, NSTStrategy
from kdnumba.strategies.hybrid import HybridDistillationStrategy
from kdnumba.strategies.relational import RelationalDistillationStrategy
from kdnumba.strategies.response import DistillationLoss
from kdnumba.strategies.selectivity import NeuronSelectivityDistillationStrategy
from kdnumba.strategies.similarity import PKTStrategy, SimilarityPreservingStrategy

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
    "IntermediateStrategyMixin",
    "NSTStrategy",
    "NeuronSelectivityDistillationStrategy",
    "PKTStrategy",
    "RelationalDistillationStrategy",
    "SelectivityMetric",
    "SimilarityPreservingStrategy",
]
