"""Strategies: thin, validated, user-facing classes over :mod:`kdnumba.functional`."""

from kdnumba.strategies.base import (
    DistillationStrategy,
    IntermediateActivations,
    IntermediateActivationStrategy,
    IntermediateStrategyMixin,
)
from kdnumba.strategies.response import DistillationLoss

__all__ = [
    "DistillationLoss",
    "DistillationStrategy",
    "IntermediateActivationStrategy",
    "IntermediateActivations",
    "IntermediateStrategyMixin",
]
