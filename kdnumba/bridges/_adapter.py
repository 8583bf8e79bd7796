"""The framework-free half of the PyTorch and JAX bridges.

A *functional loss* here is any callable ``fn(x, *others, **options) -> (loss,
grad)`` whose ``grad`` is the exact derivative of ``loss`` with respect to its
*first* argument ``x`` (same shape). Every function of
:mod:`kdnumba.functional` has this form, and so does a bound
``strategy.loss_and_gradient``. Its signature tells the bridges everything
they need:

* positional parameters (``student_logits, teacher_logits, labels=None``) are
  *array arguments*: arrays, tensors or ``None``. Only the first one gets a
  gradient; the others (teacher outputs, labels) are constants, as in
  distillation, where the teacher is frozen.
* keyword-only parameters (``temperature``, ``alpha``, ``metric``...) are
  *options*: plain Python values, static under ``jax.jit``.
* ``out`` (a gradient buffer) is managed by the bridge and hidden from users.

:class:`LossAdapter` reads that signature once and splits each call into array
arguments and options; ``kdnumba.torch`` and ``kdnumba.jax`` turn it into a
``torch.autograd.Function`` or a ``jax.custom_vjp`` function. Adding a loss to
both bridges is nothing: :data:`REGISTERED` is read from the loss registry.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from kdnumba import functional
from kdnumba.strategies.base import IntermediateActivations, check_activations

#: Functional losses the bridges expose: every loss of the registry
#: (:mod:`kdnumba.registry`) whose gradient is with respect to its first
#: argument only (a loss that also trains a teacher-side head, such as CRD,
#: returns two gradients and is called directly).
REGISTERED = tuple(spec.name for spec in functional.specs() if len(spec.grad_wrt) == 1)

#: Keyword parameters the bridge fills itself and never shows to users.
MANAGED = frozenset({"out"})


def registered_losses() -> dict[str, Callable]:
    """``name -> function`` for every :data:`REGISTERED` loss."""
    return {name: getattr(functional, name) for name in REGISTERED}


def export_losses(namespace: dict, wrap: Callable) -> list[str]:
    """Define ``namespace[name] = wrap(fn, name)`` for every registered loss (a
    bridge passes its ``globals()`` and its own ``wrap``); the names, for ``__all__``."""
    losses = registered_losses()
    for name, fn in losses.items():
        namespace[name] = wrap(fn, name)
    return list(losses)


@dataclass(frozen=True)
class LossAdapter:
    """How to call one functional loss from a framework.

    Attributes:
        name: the public name (``"kd_loss"``).
        fn: the wrapped ``(loss, grad)`` callable.
        array_params: names of the positional parameters, in order; the
            gradient is with respect to ``array_params[0]``.
        signature: the public signature: ``fn``'s, less :data:`MANAGED` and
            the ``hidden`` parameters given to :meth:`of`.
        fixed: keyword arguments always passed to ``fn`` (e.g. ``device``).
    """

    name: str
    fn: Callable
    array_params: tuple[str, ...]
    signature: inspect.Signature
    fixed: Mapping[str, object]

    @classmethod
    def of(cls, fn: Callable, name: str | None = None, *, hidden=(), fixed=None) -> LossAdapter:
        """Read ``fn``'s signature.

        ``hidden`` names parameters the framework decides (JAX hides
        ``device``); ``fixed`` gives their values, passed on every call.
        """
        if not callable(fn):
            raise TypeError(f"fn must be a callable returning (loss, grad), got {type(fn).__name__}")
        name = name or getattr(fn, "__name__", type(fn).__name__)
        params = list(inspect.signature(fn).parameters.values())
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(
                    f"cannot adapt {name}: *{p.name}/**{p.name} parameters are not supported; "
                    "array arguments must be named positional parameters, options keyword-only")
        arrays = tuple(p.name for p in params
                       if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        if not arrays:
            raise TypeError(f"cannot adapt {name}: it has no positional (array) parameter "
                            "to differentiate")
        drop = MANAGED | frozenset(hidden)
        public = inspect.Signature([p for p in params if p.name not in drop])
        fixed = dict(fixed or {})
        accepted = {p.name for p in params}
        return cls(name, fn, arrays, public,
                   {k: val for k, val in fixed.items() if k in accepted})

    def bind(self, args, kwargs) -> tuple[tuple, dict]:
        """Split one call into ``(array arguments in order, options)``.

        Missing array arguments get their defaults (``labels=None``); options
        hold the keyword arguments given, so ``fn``'s defaults apply.
        """
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.name}(): {exc}") from None
        arguments = bound.arguments
        arrays = tuple(arguments.get(p, self.signature.parameters[p].default)
                       for p in self.array_params)
        options = {k: val for k, val in arguments.items() if k not in self.array_params}
        return arrays, options

    def option(self, options: Mapping, key: str, default=None):
        """The value ``fn`` will see for keyword ``key`` (given, fixed or default)."""
        if key in options:
            return options[key]
        if key in self.fixed:
            return self.fixed[key]
        param = self.signature.parameters.get(key)
        if param is None or param.default is inspect.Parameter.empty:
            return default
        return param.default

    def __call__(self, arrays, options: Mapping):
        """``fn(*arrays, **options)``, checked: ``(float loss, grad)``."""
        loss, grad = self.fn(*arrays, **{**self.fixed, **options})
        shape = tuple(getattr(arrays[0], "shape", ()))
        if tuple(getattr(grad, "shape", ())) != shape:
            raise RuntimeError(
                f"{self.name} returned a gradient of shape {getattr(grad, 'shape', None)}, "
                f"expected the shape of {self.array_params[0]}, {shape}")
        return float(loss), grad


def _accepts_labels(fn) -> bool:
    """True if ``fn`` takes a ``labels`` keyword (or ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "labels" or p.kind is p.VAR_KEYWORD for p in params)


def intermediate_loss_and_gradient(strategy) -> Callable:
    """``(student_acts, teacher_acts, labels=None) -> (loss, {layer: grad})`` for an
    intermediate strategy (the weighted protocol values).

    Uses the fused ``intermediate_loss_and_gradient`` when the strategy has
    one; otherwise the protocol's two methods, called one after the other.
    ``labels`` (a NumPy array) reach those methods as the keyword ``labels=``
    when they accept it (contrastive ``SUPERVISED``/``TRIPLET`` need them, a
    hybrid forwards them), as :class:`~kdnumba.Distiller` passes them; a
    strategy whose methods take no labels is called without.
    """
    fused = getattr(strategy, "intermediate_loss_and_gradient", None)
    if fused is None:
        if not (hasattr(strategy, "compute_intermediate_loss")
                and hasattr(strategy, "compute_intermediate_gradient")):
            raise TypeError(
                f"{type(strategy).__name__} is not an intermediate-activation strategy: it needs "
                "compute_intermediate_loss and compute_intermediate_gradient")
        loss_fn = strategy.compute_intermediate_loss
        grad_fn = strategy.compute_intermediate_gradient
        loss_labels, grad_labels = _accepts_labels(loss_fn), _accepts_labels(grad_fn)

        def fused(student_acts, teacher_acts, labels=None):
            return (loss_fn(student_acts, teacher_acts,
                            **({"labels": labels} if loss_labels else {})),
                    grad_fn(student_acts, teacher_acts,
                            **({"labels": labels} if grad_labels else {})))

        takes_labels = True
    else:
        takes_labels = _accepts_labels(fused)

    def call(student_acts, teacher_acts, labels=None):
        check_activations(student_acts, "student_acts")
        check_activations(teacher_acts, "teacher_acts")
        kw = {"labels": labels} if labels is not None and takes_labels else {}
        loss, grads = fused(IntermediateActivations(student_acts),
                            IntermediateActivations(teacher_acts), **kw)
        unknown = set(grads) - set(student_acts)
        if unknown:
            raise RuntimeError(f"{type(strategy).__name__} returned gradients for layers "
                               f"{sorted(unknown)} that are not in student_acts")
        return float(loss), dict(grads)

    return call
