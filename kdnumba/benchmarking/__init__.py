"""Benchmark cases shared by ``kdnumba bench`` and ``bench/`` (pytest-benchmark).

One :class:`BenchCase` describes one workload: how to make its inputs and how
to run it with kdnumba, with the NumPy reference and (if installed) with
PyTorch CPU. Every kernel family contributes a module
``kdnumba/benchmarking/cases_<family>.py`` exposing ``CASES: list[BenchCase]``;
:func:`all_cases` collects the families listed in ``FAMILIES`` that exist.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

#: Family modules, in the order ``kdnumba bench`` prints them.
FAMILIES = ("response", "selectivity", "contrastive", "feature", "attention",
            "relational")


@dataclass(frozen=True)
class BenchCase:
    """One benchmark workload.

    Attributes:
        name: short unique id, e.g. ``"kd_loss/B4096_C1000/float32"``.
        family: the ``FAMILIES`` entry it belongs to.
        make_inputs: ``rng -> dict`` of NumPy inputs (keyword arguments).
        kdnumba: ``inputs -> result``: loss and gradient with kdnumba.
        numpy: ``inputs -> result`` with the NumPy reference, or ``None``.
        torch: ``inputs -> (zero-arg callable)``: builds tensors once and
            returns a closure running forward + ``backward()`` (made by
            :func:`torch_backward`); ``None`` if there is no PyTorch
            equivalent. Imported lazily.
        bytes_moved: bytes that must cross memory (inputs read + gradient
            written), for the memory-copy bound; ``None`` if compute-bound.
        flops: floating-point operations of the matrix products, for the
            GEMM bound; ``None`` if memory-bound.
        quick: included in ``kdnumba bench --quick``.
        notes: free text shown in reports.
        tags: free labels.
        variants: ``((label, inputs -> result), ...)``: other ways of running
            the same workload with kdnumba (e.g. ``"out="``, a preallocated
            gradient buffer), timed and reported under the headline
            ``kdnumba`` row.
        compile_group: cases with the same group hit the same compiled
            specialisations (same dtypes, ranks and flags), so their first-call
            compile time is measured once; ``None``: the case's own name.
    """

    name: str
    family: str
    make_inputs: Callable[[Any], dict]
    kdnumba: Callable[[dict], Any]
    numpy: Callable[[dict], Any] | None = None
    torch: Callable[[dict], Callable[[], Any]] | None = None
    bytes_moved: int | None = None
    flops: int | None = None
    quick: bool = False
    notes: str = ""
    tags: tuple = field(default_factory=tuple)
    variants: tuple = ()
    compile_group: str | None = None


def torch_backward(student, loss_fn: Callable[[], Any]) -> Callable[[], tuple]:
    """The zero-argument closure a ``BenchCase.torch`` returns: reset
    ``student.grad`` (a leaf tensor), evaluate ``loss_fn()``, run
    ``backward()``; returns ``(loss, student.grad)``."""
    def run():
        student.grad = None
        loss = loss_fn()
        loss.backward()
        return loss.detach(), student.grad
    return run


def all_cases(families=FAMILIES) -> list[BenchCase]:
    """Every case of the given families whose module exists, in order."""
    cases: list[BenchCase] = []
    for family in families:
        try:
            module = importlib.import_module(f"kdnumba.benchmarking.cases_{family}")
        except ModuleNotFoundError as exc:
            if exc.name == f"kdnumba.benchmarking.cases_{family}":
                continue
            raise
        cases.extend(module.CASES)
    return cases
