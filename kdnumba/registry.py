"""The loss registry: one declaration per loss, read by everything else.

Each functional module declares its losses once, next to their code, with
:func:`register` and a :class:`LossSpec`. From that declaration alone:

* ``tests/test_contract.py`` checks every loss (reference agreement, finite
  differences, float32 vs float64, thread-count bit-identity, inputs left
  untouched, teacher cast, NaN/inf naming the argument, dtype/shape errors,
  ``out=``, the loss-specific bad inputs) and ``tests/cuda/`` compares the
  CUDA kernels with the CPU ones under the simulator;
* ``kdnumba bench`` and ``bench/`` take their workloads (with the NumPy and
  PyTorch comparisons and the bytes each call must move);
* ``kdnumba.torch`` and ``kdnumba.jax`` export a wrapper of each loss;
* the API table in ``docs/api.md`` is generated from it (and a test keeps it
  in sync).

This module imports nothing from the layers that register into it, so it
sits below ``functional/`` and above nothing. The registry is complete once
``kdnumba.functional`` is imported; :func:`kdnumba.functional.specs` is the
usual way in.

Adding a loss: write the CPU kernel (``kernels/cpu/<family>.py``), the CUDA
kernel (``kernels/cuda/<family>.py``, same launch functions), the functional
function with its ``register(LossSpec(...))`` (``functional/<family>.py``),
the NumPy (and PyTorch) reference (``reference/<family>.py``), the strategy
if any, and the docs page; see ``docs/architecture.md``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Devices a loss may declare.
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Workload:
    """One benchmark workload of a loss.

    Attributes:
        label: short id of the shape, e.g. ``"B4096_C1000"``.
        shape: keyword arguments of the spec's ``make_inputs`` (sizes).
        dtype: ``"float32"`` or ``"float64"``.
        options: keyword options of the call (e.g. ``{"temperature": 3.0}``).
        quick: part of ``kdnumba bench --quick``.
        notes: shown in the reports.
    """

    label: str
    shape: Mapping[str, int]
    dtype: str = "float32"
    options: Mapping[str, Any] = field(default_factory=dict)
    quick: bool = False
    notes: str = ""


@dataclass(frozen=True)
class Variant:
    """One way of calling a loss that the contract suite checks.

    ``options``: keyword options of the call; ``inputs``: keyword arguments of
    the spec's ``make_inputs`` (e.g. ``{"labels": "dense"}``); ``devices``: where
    this way of calling is implemented (a subset of the loss's; a variant the
    GPU lacks raises ``NotImplementedError`` there, and says so).
    """

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    inputs: Mapping[str, Any] = field(default_factory=dict)
    devices: tuple[str, ...] = DEVICES


@dataclass(frozen=True)
class BadInput:
    """A loss-specific invalid call and the error it must raise.

    ``change(arguments) -> arguments`` gets a dict of valid keyword arguments
    (arrays and options, float64) and returns the invalid ones; the call must
    raise ``error`` with a message matching the regular expression ``match``.
    """

    description: str
    change: Callable[[dict], dict]
    error: type
    match: str


@dataclass(frozen=True)
class LossSpec:
    """The declaration of one functional loss.

    Attributes:
        name: public name in ``kdnumba.functional`` (``"kd_loss"``).
        function: the functional function; returns ``(loss, grad)`` (or
            ``(loss, *grads)``, one per ``grad_wrt`` argument).
        family: its kernel family (``kernels/*/<family>.py``) and docs page.
        make_inputs: ``(rng, dtype, **shape) -> dict`` of valid keyword
            arguments (arrays, and options the inputs imply such as labels);
            called with no ``shape`` for the small contract-test inputs.
        reference: ``"module:function"`` under ``kdnumba.reference``, the
            NumPy reference with the same signature and return.
        torch: ``"module:function"`` under ``kdnumba.reference``: the loss as a
            PyTorch expression with the same signature, returning a 0-d tensor
            (used by the benchmarks and the bridge tests); ``None`` if none.
        variants: the ways of calling it that the contract suite checks
            (:class:`Variant`); one plain call by default.
        medium: ``make_inputs`` shape big enough for the parallel path
            (thread-count bit-identity); ``None``: the small inputs.
        grad_wrt: names of the differentiated arguments (default: the first).
        devices: where it runs.
        has_out: accepts ``out=`` for the (first) gradient.
        nonnegative: the loss is never negative in exact arithmetic.
        zero_when_equal: loss and gradient vanish when the student equals the
            teacher (same shape and values).
        rtol: ``{dtype name: relative tolerance}`` against the reference.
        fd_rtol: tolerance of the float64 finite-difference check.
        bad_inputs: loss-specific invalid calls (the generic ones are derived).
        workloads: benchmark workloads.
        bytes_moved: ``inputs -> bytes`` a call must move at the least (the
            memory bound); default: every float array read and the gradient
            written.
        flops: ``inputs -> floating-point operations`` of its matrix
            products, for compute-bound losses; ``None`` if memory-bound.
    """

    name: str
    function: Callable
    family: str
    make_inputs: Callable[..., dict]
    reference: str
    torch: str | None = None
    variants: tuple[Variant, ...] = (Variant("default"),)
    medium: Mapping[str, int] | None = None
    grad_wrt: tuple[str, ...] | None = None
    devices: tuple[str, ...] = DEVICES
    has_out: bool = True
    nonnegative: bool = True
    zero_when_equal: bool = True
    rtol: Mapping[str, float] = field(
        default_factory=lambda: {"float64": 1e-10, "float32": 2e-4})
    fd_rtol: float = 1e-6
    bad_inputs: tuple[BadInput, ...] = ()
    workloads: tuple[Workload, ...] = ()
    bytes_moved: Callable[[dict], int] | None = None
    flops: Callable[[dict], int] | None = None

    def __post_init__(self):
        unknown = set(self.devices) - set(DEVICES)
        if unknown:
            raise ValueError(f"{self.name}: unknown devices {sorted(unknown)}")
        if self.grad_wrt is None:
            object.__setattr__(self, "grad_wrt", (self.array_params[0],))

    # --- derived from the function's signature ----------------------------------------
    @property
    def signature(self) -> inspect.Signature:
        return inspect.signature(self.function)

    @property
    def array_params(self) -> tuple[str, ...]:
        """The positional parameters: arrays (student first), labels..."""
        return tuple(p.name for p in self.signature.parameters.values()
                     if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))

    # --- the lazily imported companions ------------------------------------------------
    def reference_function(self) -> Callable:
        return _resolve(self.reference)

    def torch_function(self) -> Callable | None:
        """The PyTorch expression (its module imports torch only when called)."""
        return None if self.torch is None else _resolve(self.torch)

    def default_bytes(self, inputs: Mapping) -> int:
        """Bytes a call must move: the arrays read plus the gradients written."""
        if self.bytes_moved is not None:
            return int(self.bytes_moved(inputs))
        read = sum(a.nbytes for k, a in inputs.items()
                   if k in self.array_params and hasattr(a, "nbytes"))
        written = sum(inputs[k].nbytes for k in self.grad_wrt)
        return int(read + written)


def _resolve(path: str) -> Callable:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(f"kdnumba.reference.{module}"), attr)


_SPECS: dict[str, LossSpec] = {}


def register(spec: LossSpec) -> LossSpec:
    """Add ``spec`` to the registry (a name registers once)."""
    if spec.name in _SPECS and _SPECS[spec.name] is not spec:
        raise ValueError(f"a loss named {spec.name!r} is already registered")
    _SPECS[spec.name] = spec
    return spec


def specs() -> tuple[LossSpec, ...]:
    """Every registered loss, in registration order (import ``kdnumba.functional``
    first, or use :func:`kdnumba.functional.specs`)."""
    return tuple(_SPECS.values())


def get(name: str) -> LossSpec:
    """The spec of ``name``; ``KeyError`` listing the registered names."""
    try:
        return _SPECS[name]
    except KeyError:
        raise KeyError(f"no loss named {name!r}; registered: {sorted(_SPECS)}") from None


def api_table() -> str:
    """The Markdown table of ``docs/api.md``: every loss, its signature, devices,
    ``out=`` and the first line of its docstring."""
    rows = ["| function | signature | devices | `out=` | what |",
            "|---|---|---|---|---|"]
    for spec in specs():
        summary = (inspect.getdoc(spec.function) or "").splitlines()[0].rstrip(".")
        sig = str(spec.signature).replace("|", "\\|")
        rows.append(f"| `{spec.name}` | `{sig}` | {', '.join(spec.devices)} | "
                    f"{'yes' if spec.has_out else 'no'} | {summary} |")
    return "\n".join(rows)
