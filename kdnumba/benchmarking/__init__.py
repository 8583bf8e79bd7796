"""Benchmark cases shared by ``kdnumba bench`` and ``bench/`` (pytest-benchmark).

One :class:`BenchCase` describes one workload: how to make its inputs and how
to run it with kdnumba, with the NumPy reference and (if installed) with
PyTorch CPU. The cases come from the loss registry: every
:class:`kdnumba.registry.Workload` of every registered loss becomes one case
(:mod:`.registry_cases`). A family may add cases the registry cannot express
(a scaling sweep, say) in a module ``kdnumba/benchmarking/cases_<family>.py``
exposing ``CASES: list[BenchCase]``; :func:`all_cases` collects both.
"""

from __future__ import annotations

import importlib
import pkgutil

from kdnumba import functional
from kdnumba.benchmarking.case import BenchCase, torch_backward
from kdnumba.benchmarking.registry_cases import cases_of

#: The first families, in the order ``kdnumba bench`` prints them; others follow
#: in registration order.
_PREFERRED_ORDER = ("response", "selectivity", "contrastive", "feature", "attention",
                    "relational")


def _families() -> tuple[str, ...]:
    registered = [spec.family for spec in functional.specs()]
    extra = [m.name.removeprefix("cases_") for m in pkgutil.iter_modules(__path__)
             if m.name.startswith("cases_")]
    found = dict.fromkeys(registered + extra)
    ordered = [f for f in _PREFERRED_ORDER if f in found]
    return tuple(ordered + [f for f in found if f not in ordered])


#: Every family with benchmark cases, in the order ``kdnumba bench`` prints them.
FAMILIES = _families()


def all_cases(families=None) -> list[BenchCase]:
    """Every case of the given families (all by default), in order: the
    registry's workloads, then the family's extra ``cases_<family>`` module."""
    cases: list[BenchCase] = []
    for family in (FAMILIES if families is None else families):
        for spec in functional.specs():
            if spec.family == family:
                cases.extend(cases_of(spec))
        try:
            module = importlib.import_module(f"kdnumba.benchmarking.cases_{family}")
        except ModuleNotFoundError as exc:
            if exc.name == f"kdnumba.benchmarking.cases_{family}":
                continue
            raise
        cases.extend(module.CASES)
    return cases


__all__ = ["FAMILIES", "BenchCase", "all_cases", "torch_backward"]
