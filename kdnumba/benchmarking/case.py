"""One benchmark workload (:class:`BenchCase`) and the PyTorch timing closure."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


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
            written), for the memory-copy bound, or ``inputs -> bytes``;
            ``None`` if compute-bound. Read it with :meth:`bytes_for`.
        flops: floating-point operations of the matrix products, for the
            GEMM bound, or ``inputs -> flops``; ``None`` if memory-bound.
            Read it with :meth:`flops_for`.
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
        dtype: the float dtype of the case's inputs (``None``: read from them).
    """

    name: str
    family: str
    make_inputs: Callable[[Any], dict]
    kdnumba: Callable[[dict], Any]
    numpy: Callable[[dict], Any] | None = None
    torch: Callable[[dict], Callable[[], Any]] | None = None
    bytes_moved: int | Callable[[dict], int] | None = None
    flops: int | Callable[[dict], int] | None = None
    quick: bool = False
    notes: str = ""
    tags: tuple = field(default_factory=tuple)
    variants: tuple = ()
    compile_group: str | None = None
    dtype: str | None = None

    def bytes_for(self, inputs: dict) -> int | None:
        """:attr:`bytes_moved` for these inputs."""
        return self.bytes_moved(inputs) if callable(self.bytes_moved) else self.bytes_moved

    def flops_for(self, inputs: dict) -> int | None:
        """:attr:`flops` for these inputs."""
        return self.flops(inputs) if callable(self.flops) else self.flops


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
