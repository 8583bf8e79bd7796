"""PyTorch bridge: kdnumba's fused losses as autograd functions and ``nn.Module``s.

    >>> import kdnumba.torch as kdt
    >>> loss = kdt.kd_loss(student_logits, teacher_logits, labels, temperature=4.0)
    >>> loss.backward()                       # student_logits.grad is exact

Every loss of :mod:`kdnumba.functional` is here under the same name and
signature, taking tensors and returning a 0-d tensor of the student's dtype
and device. Forward runs kdnumba's one fused kernel, which yields the loss
*and* its gradient; backward returns ``grad_output * grad`` and runs no
kernel. Only the first argument (the student's output) receives a gradient:
teacher outputs and labels are constants, as in distillation, where the
teacher is frozen -- their ``.grad`` stays untouched even if they require
grad.

* CPU tensors reach the kernels without a copy (``tensor.detach().numpy()``;
  non-contiguous tensors are copied once into contiguous memory).
* CUDA tensors are handed over through ``__cuda_array_interface__`` and run
  kdnumba's CUDA kernels when they exist (``numba-cuda`` and a GPU); else the
  call raises a ``RuntimeError`` that says why. Mixed devices raise.
* float32 and float64 tensors are supported; float16/bfloat16 raise a
  ``TypeError`` (convert with ``.float()``).
* kdnumba computes first derivatives only: ``create_graph=True`` works, but
  differentiating the resulting gradient again raises ``RuntimeError``.

Modules: :class:`KDLoss` (Hinton KD), :class:`StrategyModule` (any
:class:`~kdnumba.DistillationStrategy` on outputs), :class:`IntermediateModule`
(any intermediate-activation strategy, on dicts of tensors). :func:`wrap` turns
your own ``(loss, grad)`` function into a differentiable one.

This module is ``kdnumba/torch.py``; its ``import torch`` is an absolute
import (Python 3) and loads PyTorch itself, not this file. Importing
:mod:`kdnumba` does not import this module or PyTorch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import numpy as np

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised in a subprocess
    raise ImportError("kdnumba.torch needs PyTorch: pip install 'kdnumba[torch]'") from exc

from kdnumba import _dispatch
from kdnumba.bridges._adapter import (
    LossAdapter,
    export_losses,
    intermediate_loss_and_gradient,
)
from kdnumba.strategies.response import DistillationLoss

_KERNEL_DTYPES = (torch.float32, torch.float64)


# --- moving tensors in and out ------------------------------------------------

def _placement(where: str, named_tensors, device: str) -> str:
    """``"cpu"`` or ``"cuda"``: where these tensors are, checked against ``device``."""
    _dispatch.check_device(device)
    devices = {t.device for _, t in named_tensors}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in named_tensors)
        raise ValueError(f"{where}: all tensors must be on one device, got {listing}")
    kind = next(iter(devices)).type if devices else "cpu"
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"{where}: kdnumba runs on CPU and CUDA tensors, got {kind} tensors")
    if device != "auto" and device != kind:
        raise ValueError(
            f"{where}: device={device!r} but the tensors are on {kind}; move them with "
            f".to({device!r}) or pass device='auto'")
    if kind == "cuda":
        reason = _dispatch.cuda_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"{where} got CUDA tensors, but {reason}; "
                               "or move the tensors to the CPU with .cpu()")
    return kind


def _kernel_input(x, name: str, on: str):
    """What kdnumba receives for one argument: a NumPy view (CPU) or the
    detached tensor itself (CUDA, via ``__cuda_array_interface__``)."""
    if not isinstance(x, torch.Tensor):
        return x
    x = x.detach()  # a tensor that requires grad exposes neither .numpy() nor the interface
    if x.is_floating_point() and x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{name} must be a float32 or float64 tensor, got {x.dtype} "
                        "(convert it with .float())")
    if on == "cpu":
        return x.resolve_conj().resolve_neg().numpy()
    return x


def _tensor_like(array, like) -> torch.Tensor:
    """``array`` (NumPy or CUDA array) as a tensor of ``like``'s dtype and
    device, sharing memory when it already is one."""
    if isinstance(like, torch.Tensor):
        return torch.as_tensor(array, dtype=like.dtype, device=like.device)
    return torch.as_tensor(array)


def _run(adapter: LossAdapter, arrays, options, device: str):
    """One fused call: ``(loss tensor, gradient tensor)``."""
    names = adapter.array_params
    on = _placement(adapter.name, [(n, a) for n, a in zip(names, arrays)
                                   if isinstance(a, torch.Tensor)], device)
    loss, grad = adapter([_kernel_input(a, n, on) for n, a in zip(names, arrays)], options)
    grad = _tensor_like(grad, arrays[0])
    return torch.tensor(loss, dtype=grad.dtype, device=grad.device), grad


class _FirstDerivativeOnly(torch.autograd.Function):
    """Identity on a gradient kdnumba computed, attached to the student so
    that differentiating it again raises instead of silently giving zero."""

    @staticmethod
    def forward(ctx, grad, student):
        return grad.clone()

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError(
            "kdnumba computes first derivatives only: the gradient of a kdnumba loss cannot be "
            "differentiated again (double backward, Hessian-vector products)")


def _scaled(grad: torch.Tensor, grad_output: torch.Tensor, student) -> torch.Tensor:
    """``grad_output * grad``; under ``create_graph=True`` guarded by
    :class:`_FirstDerivativeOnly`."""
    grad = grad * grad_output
    if torch.is_grad_enabled() and isinstance(student, torch.Tensor) and student.requires_grad:
        grad = _FirstDerivativeOnly.apply(grad, student)
    return grad


# --- functional losses ------------------------------------------------------

def _camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def _autograd_function(adapter: LossAdapter, device_of: Callable[[Mapping], str]) -> type:
    n_arrays = len(adapter.array_params)

    def forward(ctx, options, *arrays):
        loss, grad = _run(adapter, arrays, options, device_of(options))
        ctx.save_for_backward(grad)
        ctx.student = arrays[0]  # only to guard a second derivative (see _scaled)
        return loss

    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        # options, then the student (the only differentiable argument), then the rest
        return (None, _scaled(grad, grad_output, ctx.student)) + (None,) * (n_arrays - 1)

    # built with type() so that grad_fn reads e.g. <KdLossFunctionBackward>
    return type(f"{_camel(adapter.name)}Function", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(backward),
        "__module__": __name__,
        "__doc__": (f"``torch.autograd.Function`` over ``{adapter.name}``: "
                    f"``apply(options: dict, {', '.join(adapter.array_params)})``."),
    })


def _differentiable(adapter: LossAdapter, device_of: Callable[[Mapping], str], doc: str):
    Function = _autograd_function(adapter, device_of)

    def loss(*args, **kwargs):
        arrays, options = adapter.bind(args, kwargs)
        return Function.apply(options, *arrays)

    loss.__name__ = loss.__qualname__ = adapter.name
    loss.__signature__ = adapter.signature
    loss.__doc__ = doc
    loss.Function = Function
    return loss


def wrap(fn: Callable, name: str | None = None):
    """Make a differentiable PyTorch loss of any ``(loss, grad)`` function.

    ``fn(x, *others, **options)`` must return ``(loss, d loss / d x)`` with the
    gradient of ``x``'s shape. Its positional parameters are array arguments
    (tensors, arrays or ``None``; only ``x`` gets a gradient), its keyword-only
    parameters are options passed through unchanged. The result has ``fn``'s
    signature (minus ``out``) and returns a 0-d tensor; ``.Function`` is the
    ``torch.autograd.Function`` behind it. If ``fn`` takes ``device``, it also
    guards where the tensors are.

    >>> double = kdnumba.torch.wrap(lambda x, *, k=1.0: (k * float((x * x).sum()), 2 * k * x))
    """
    adapter = LossAdapter.of(fn, name)
    doc = (f"PyTorch version of ``{adapter.name}{adapter.signature}``: a 0-d tensor, "
           f"differentiable with respect to ``{adapter.array_params[0]}`` only.\n\n"
           + (fn.__doc__ or ""))
    return _differentiable(adapter, lambda options: adapter.option(options, "device", "auto"), doc)


# --- modules -----------------------------------------------------------------

class StrategyModule(torch.nn.Module):
    """Any output strategy as a loss module:
    ``forward(student_output, teacher_output, labels=None) -> 0-d tensor``.

    The loss and its gradient come from one ``strategy.loss_and_gradient``
    call; ``student_output`` receives ``d loss / d student_output`` on
    backward, the teacher output and labels none. The strategy's ``device``
    (``"auto"``: follow the tensors) is checked against the tensors.
    """

    def __init__(self, strategy):
        super().__init__()
        if not callable(getattr(strategy, "loss_and_gradient", None)):
            raise TypeError(f"strategy must be a DistillationStrategy (with loss_and_gradient), "
                            f"got {type(strategy).__name__}")
        self.strategy = strategy
        adapter = LossAdapter.of(strategy.loss_and_gradient, type(strategy).__name__)
        self._loss = _differentiable(
            adapter, lambda options: getattr(strategy, "device", "auto"),
            f"{type(strategy).__name__}.loss_and_gradient as a differentiable function.")

    def forward(self, student_output, teacher_output, labels=None) -> torch.Tensor:
        return self._loss(student_output, teacher_output, labels)

    def extra_repr(self) -> str:
        return repr(self.strategy)


class KDLoss(StrategyModule):
    r"""Hinton knowledge distillation as an ``nn.Module`` (over
    :class:`kdnumba.DistillationLoss`).

    ``loss = alpha * CE(softmax(s), y) + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T))``,
    averaged over the batch; the soft term alone when ``labels`` is ``None``.
    Same value as PyTorch's::

        alpha * F.cross_entropy(s, y) + (1 - alpha) * T * T * F.kl_div(
            F.log_softmax(s / T, 1), F.log_softmax(t / T, 1),
            log_target=True, reduction="batchmean")

    computed (with its gradient) in one fused kernel.

    Args:
        temperature: ``T > 0``.
        alpha: weight of the hard-label term, in ``[0, 1]``.
        device: ``"auto"`` (follow the tensors), ``"cpu"`` or ``"cuda"``.
    """

    def __init__(self, temperature: float = 3.0, alpha: float = 0.3, *, device: str = "auto"):
        super().__init__(DistillationLoss(temperature, alpha, device=device))


class _IntermediateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call, student_names, teacher_names, device, *tensors):
        n = len(student_names)
        student = dict(zip(student_names, tensors[:n]))
        teacher = dict(zip(teacher_names, tensors[n:]))
        labelled = ([(f"student_acts[{k!r}]", a) for k, a in student.items()]
                    + [(f"teacher_acts[{k!r}]", a) for k, a in teacher.items()])
        on = _placement("IntermediateModule", [(k, a) for k, a in labelled
                                               if isinstance(a, torch.Tensor)], device)
        loss, grads = call({k: _kernel_input(a, f"student_acts[{k!r}]", on) for k, a in student.items()},
                           {k: _kernel_input(a, f"teacher_acts[{k!r}]", on) for k, a in teacher.items()})
        grads = [None if k not in grads else _tensor_like(grads[k], student[k]) for k in student_names]
        ctx.contributed = [g is not None for g in grads]
        ctx.students = tensors[:n]  # only to guard a second derivative (see _scaled)
        ctx.n_teacher = len(teacher_names)
        ctx.save_for_backward(*[g for g in grads if g is not None])
        like = next((a for a in tensors if isinstance(a, torch.Tensor) and a.is_floating_point()),
                    None)
        if like is None:
            return torch.tensor(loss)
        return torch.tensor(loss, dtype=like.dtype, device=like.device)

    @staticmethod
    def backward(ctx, grad_output):
        saved = iter(ctx.saved_tensors)
        student = tuple(_scaled(next(saved), grad_output, a) if c else None
                        for c, a in zip(ctx.contributed, ctx.students))
        # call, names, names, device, then the student layers, then the teacher's
        return (None, None, None, None) + student + (None,) * ctx.n_teacher


class IntermediateModule(torch.nn.Module):
    """An intermediate-activation strategy as a loss module over dicts of tensors:
    ``forward(student_acts, teacher_acts) -> 0-d tensor``.

    ``student_acts``/``teacher_acts`` map layer names to tensors ``(B, ...)``
    (a ``dict`` or :class:`kdnumba.IntermediateActivations`). The value is the
    strategy's weighted intermediate loss; on backward each student layer that
    contributed gets its exact gradient, the others and all teacher layers
    none. Uses the strategy's fused ``intermediate_loss_and_gradient`` when it
    has one (one kernel pass), else ``compute_intermediate_loss`` then
    ``compute_intermediate_gradient``. ``forward(..., labels=y)`` passes the
    batch labels on (as :class:`~kdnumba.Distiller` does).
    """

    def __init__(self, strategy):
        super().__init__()
        self.strategy = strategy
        self._call = intermediate_loss_and_gradient(strategy)

    def forward(self, student_acts: Mapping, teacher_acts: Mapping, labels=None
                ) -> torch.Tensor:
        """The weighted intermediate loss; ``labels`` (``(B,)`` class indices, a
        tensor or array) go to strategies whose intermediate methods take them
        (contrastive ``SUPERVISED``/``TRIPLET`` need them)."""
        for name, acts in (("student_acts", student_acts), ("teacher_acts", teacher_acts)):
            if not isinstance(acts, Mapping):
                raise TypeError(f"{name} must be a mapping layer name -> tensor, "
                                f"got {type(acts).__name__}")
        call = self._call
        if labels is not None:
            host = (labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor)
                    else np.asarray(labels))
            call = functools.partial(self._call, labels=host)
        return _IntermediateFunction.apply(
            call, tuple(student_acts), tuple(teacher_acts),
            getattr(self.strategy, "device", "auto"),
            *student_acts.values(), *teacher_acts.values())

    def extra_repr(self) -> str:
        return repr(self.strategy)


# --- the registered functional losses ----------------------------------------

__all__ = ["IntermediateModule", "KDLoss", "StrategyModule", "wrap",
           *export_losses(globals(), wrap)]
