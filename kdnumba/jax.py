"""JAX bridge: kdnumba's fused CPU losses as ``jax.custom_vjp`` functions.

    >>> import kdnumba.jax as kdj
    >>> g = jax.jit(jax.grad(lambda s: kdj.kd_loss(s, t, y, temperature=4.0)))(s)

Every loss of :mod:`kdnumba.functional` is here under the same name and
signature (less ``device`` and ``out``), taking JAX arrays and returning a 0-d
array of the student's dtype. It works under ``jax.jit``, ``jax.grad``,
``jax.value_and_grad`` and ``jax.vmap``:

* the primal runs kdnumba's fused CPU kernel through ``jax.pure_callback``;
  that one call returns the loss *and* its gradient, which is kept as the
  residual, so the backward pass only multiplies it by the cotangent;
* only the first argument (the student's output) is differentiated: teacher
  outputs and labels are constants, as in distillation, and get a zero
  cotangent;
* keyword options (``temperature``, ``alpha``...) must be Python values; under
  ``jax.jit`` make them static (``static_argnames``) or close over them;
* the kernels run on the host CPU whatever JAX's backend (arrays on an
  accelerator are copied to the host and back), in the student's dtype
  (float32, or float64 with ``jax_enable_x64``); under ``vmap`` the callback
  runs once per batch element;
* shape, dtype and value errors (batch mismatch, NaN, labels out of range) are
  raised inside the callback, so JAX reports them as
  ``jax.errors.JaxRuntimeError`` whose message holds the original
  ``ValueError``/``TypeError``. float16/bfloat16 inputs and traced options
  raise ``TypeError`` at trace time.
* kdnumba computes first derivatives only: ``jax.hessian`` and forward-mode
  (``jax.jvp``, ``jax.jacfwd``) are not supported.
* one hot case skips Python altogether: ``kd_loss`` with the KL divergence,
  no labels and no standardisation (``kdnumba.keras.LogitsDistillation``),
  on the CPU platform, is an XLA FFI call (:func:`ffi_target`;
  ``kdnumba.bridges._xla_ffi``) running the same kernel on XLA's buffers,
  bit-identical to the callback; its errors (NaN/inf, overflow) are XLA
  errors with the functional loss's message. Other platforms, other option
  sets, or ``KDNUMBA_JAX_FFI=0`` when the function is traced use the callback.

:func:`wrap` turns any ``(loss, grad)`` function (e.g. a strategy's bound
``loss_and_gradient``) into such a function; :func:`intermediate_loss` does
the same for intermediate-activation strategies over dicts of arrays.

This module is ``kdnumba/jax.py``; its ``import jax`` is an absolute import
(Python 3) and loads JAX itself. Importing :mod:`kdnumba` does not import this
module or JAX.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Mapping

import numpy as np

try:
    import jax
    import jax.numpy as jnp
except ImportError as exc:  # pragma: no cover - exercised in a subprocess
    raise ImportError("kdnumba.jax needs JAX: pip install 'kdnumba[jax]'") from exc

from kdnumba.bridges import _xla_ffi
from kdnumba.bridges._adapter import (
    LossAdapter,
    export_losses,
    intermediate_loss_and_gradient,
    registered_losses,
)
from kdnumba._constants import LABELS_NONE
from kdnumba.functional.response import kd_loss as _functional_kd_loss
from kdnumba.functional.response import kernel_weights

_KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: Distinct option sets kept compiled per loss (a sweep over many values just rebuilds).
_CACHE_SIZE = 64


def _operand(x, name: str, where: str):
    """``x`` as a JAX array, rejecting float dtypes the kernels lack."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{where}: {name} must be float32 or float64, got {x.dtype} "
                        "(convert it with .astype(jnp.float32))")
    return x


def _check_options(where: str, options: Mapping) -> None:
    for key, value in options.items():
        if isinstance(value, jax.Array):
            raise TypeError(
                f"{where}: option {key} must be a Python value, got a JAX array (under jax.jit, "
                f"pass it through static_argnames or close over it)")


def _option_key(options: Mapping):
    """A hashable key for one option set, or ``None`` if it has none.
    Types are part of it, so ``alpha=True`` does not reuse ``alpha=1``."""
    key = tuple(sorted((k, type(val), val) for k, val in options.items()))
    try:
        hash(key)
    except TypeError:
        return None
    return key


class _WritableAlias:
    """Exposes a read-only array's memory as writable (see :func:`_kernel_view`);
    holding ``array`` keeps that memory alive as long as the view."""

    def __init__(self, array: np.ndarray):
        self.array = array
        interface = dict(array.__array_interface__)
        interface["data"] = (interface["data"][0], False)
        self.__array_interface__ = interface


def _kernel_view(x, trusted: bool) -> np.ndarray:
    """A callback operand as a NumPy array, without a copy when ``trusted``.

    JAX hands callbacks read-only buffers, and kdnumba copies read-only inputs
    (Numba types them as another type; ``_validation.kernel_ready``): two full
    copies per call of a (student, teacher) pair, about a third of the
    callback's time at B=4096, C=1000. kdnumba's registered losses never
    write their inputs (``tests/test_contract.py`` checks each), so for them
    the same memory is exposed writable; any other ``fn`` (``wrap``) gets the
    read-only array.
    """
    array = np.asarray(x)
    if not trusted or array.flags.writeable or not array.flags.c_contiguous:
        return array
    return np.asarray(_WritableAlias(array))


def _fused(host: Callable, operands, result_shapes):
    return jax.pure_callback(host, result_shapes, *operands, vmap_method="sequential")


# --- XLA FFI path (kdnumba.bridges._xla_ffi) --------------------------------------
#: Environment variable: ``0`` sends every loss through ``jax.pure_callback``.
FFI_ENV = "KDNUMBA_JAX_FFI"
#: dtype -> registered FFI target name, or the reason the FFI path is off.
_ffi_targets: dict = {}
_ffi_lock = threading.Lock()


def ffi_target(dtype) -> str | None:
    """The XLA FFI target computing the KL ``kd_loss`` without labels in
    ``dtype`` (registered with JAX on first use), or ``None`` when that path is
    off: ``KDNUMBA_JAX_FFI=0``, or registering failed (the reason is kept in
    :func:`ffi_status`; the losses then use ``jax.pure_callback``)."""
    dtype = np.dtype(dtype)
    if os.environ.get(FFI_ENV, "1") == "0" or dtype not in _xla_ffi.KD_HANDLERS:
        return None
    with _ffi_lock:
        if dtype not in _ffi_targets:
            name = f"kdnumba_kd_loss_{dtype.name}"
            try:
                _xla_ffi.check_abi()
                # With the CPU client up, XLA checks the handler (its API version)
                # now and raises here; registered before, a rejected handler would
                # fail the CPU backend's initialisation instead.
                jax.devices("cpu")
                capsule = _xla_ffi.handler_capsule(_xla_ffi.KD_HANDLERS[dtype])
                jax.ffi.register_ffi_target(name, capsule, platform="cpu", api_version=1)
                _ffi_targets[dtype] = name
            except Exception as exc:  # an XLA without typed FFI: the callback path stays
                _ffi_targets[dtype] = f"{type(exc).__name__}: {exc}"
        target = _ffi_targets[dtype]
    return target if target.startswith("kdnumba_") else None


def ffi_status() -> dict:
    """``dtype name -> target name or the reason the FFI path is off`` for the
    dtypes tried so far (diagnostics)."""
    return {dtype.name: value for dtype, value in _ffi_targets.items()}


def _uses_ffi(adapter: LossAdapter, present, options) -> bool:
    """The call is the FFI handler's case: ``kd_loss``, no labels, KL, not standardised."""
    return (adapter.fn is _functional_kd_loss and present == (True, True, False)
            and adapter.option(options, "divergence") == "kl"
            and adapter.option(options, "standardize") is False)


def _ffi_fits(student, teacher) -> str | None:
    """The FFI target for these operands, or ``None`` when they do not fit it
    (the callback path then raises the functional loss's error, if any)."""
    if (student.ndim != 2 or teacher.shape != student.shape or 0 in student.shape
            or not jnp.issubdtype(teacher.dtype, jnp.floating)):
        return None
    return ffi_target(student.dtype)


def _ffi_loss_and_grad(target: str, temperature: float, student, teacher):
    """``(loss, grad)`` of the KL ``kd_loss`` through the FFI ``target`` (CPU only)."""
    teacher = teacher.astype(student.dtype)  # as the functional loss casts it
    w_soft, w_hard, c_soft, c_hard = kernel_weights("none", temperature, 0.0, student.shape[0])
    inv_t = float(np.dtype(student.dtype).type(1.0 / temperature))
    params = jnp.asarray(_xla_ffi.kd_params(inv_t, w_soft, w_hard, c_soft, c_hard, LABELS_NONE))
    shapes = (jax.ShapeDtypeStruct((), student.dtype),
              jax.ShapeDtypeStruct(student.shape, student.dtype))
    return jax.ffi.ffi_call(target, shapes, vmap_method="sequential")(student, teacher, params)


def _custom_vjp(adapter: LossAdapter, present: tuple[bool, ...], options: Mapping,
                trusted: bool = False):
    """A ``custom_vjp`` function of the non-``None`` array arguments."""
    n_operands = sum(present)

    def host(*operands):
        given = iter(operands)
        arrays = [_kernel_view(next(given), trusted) if p else None for p in present]
        loss, grad = adapter(arrays, options)
        dtype = arrays[0].dtype
        return np.asarray(loss, dtype=dtype), np.asarray(grad, dtype=dtype)

    def callback(*operands):
        student = operands[0]
        return _fused(host, operands, (jax.ShapeDtypeStruct((), student.dtype),
                                       jax.ShapeDtypeStruct(student.shape, student.dtype)))

    loss_and_grad = callback
    if trusted and _uses_ffi(adapter, present, options):
        # bad options raise now (float32: the build kdnumba.keras's option check compiled)
        dummy = np.zeros((1, 2), dtype=np.float32)
        adapter([dummy, dummy, None], options)
        temperature = float(adapter.option(options, "temperature"))

        def loss_and_grad(*operands):
            target = _ffi_fits(*operands)
            if target is None:
                return callback(*operands)
            # the FFI target exists on CPU only: other platforms keep the callback
            return jax.lax.platform_dependent(
                *operands, cpu=functools.partial(_ffi_loss_and_grad, target, temperature),
                default=callback)

    @jax.custom_vjp
    def loss(*operands):
        return loss_and_grad(*operands)[0]

    def bwd(grad, cotangent):
        # the teacher and labels are constants: None is JAX's zero cotangent
        return (cotangent * grad,) + (None,) * (n_operands - 1)

    loss.defvjp(loss_and_grad, bwd)
    return loss


def wrap(fn: Callable, name: str | None = None):
    """Make a JAX-differentiable loss of any ``(loss, grad)`` function.

    ``fn(x, *others, **options)`` must return ``(loss, d loss / d x)`` with the
    gradient of ``x``'s shape, computed on NumPy arrays. Its positional
    parameters are array arguments (arrays or ``None``; only ``x`` is
    differentiated), its keyword-only parameters Python-valued options. The
    result has ``fn``'s signature less ``device`` (always ``"cpu"``) and
    ``out``, and returns a 0-d array of ``x``'s dtype.

    >>> double = kdnumba.jax.wrap(lambda x, *, k=1.0: (k * float((x * x).sum()), 2 * k * x))
    """
    adapter = LossAdapter.of(fn, name, hidden=("device",), fixed={"device": "cpu"})
    # kdnumba's own losses read their inputs in place (see _kernel_view)
    trusted = any(fn is registered for registered in registered_losses().values())
    cache: dict = {}

    def loss(*args, **kwargs):
        arrays, options = adapter.bind(args, kwargs)
        _check_options(adapter.name, options)
        if arrays[0] is None:
            raise TypeError(f"{adapter.name}: {adapter.array_params[0]} must be an array, got None")
        present = tuple(a is not None for a in arrays)
        operands = [_operand(a, n, adapter.name)
                    for a, n in zip(arrays, adapter.array_params) if a is not None]
        key = _option_key(options)
        f = cache.get((present, key)) if key is not None else None
        if f is None:
            f = _custom_vjp(adapter, present, options, trusted)
            if key is not None:
                if len(cache) >= _CACHE_SIZE:
                    cache.clear()
                cache[(present, key)] = f
        return f(*operands)

    loss.__name__ = loss.__qualname__ = adapter.name
    loss.__signature__ = adapter.signature
    loss.__doc__ = (f"JAX version of ``{adapter.name}{adapter.signature}``: a 0-d array, "
                    f"differentiable with respect to ``{adapter.array_params[0]}`` only.\n\n"
                    + (fn.__doc__ or ""))
    return loss


def intermediate_loss(strategy) -> Callable:
    """An intermediate-activation strategy as a JAX loss over dicts of arrays:
    ``f(student_acts, teacher_acts, labels=None) -> 0-d array``.

    The value is the strategy's weighted intermediate loss (dtype: the
    promoted dtype of the student layers). ``jax.grad`` with respect to
    ``student_acts`` gives each contributing layer its exact gradient and
    zeros for the layers the strategy ignores; teacher layers and ``labels``
    are constants. ``labels`` (``(B,)`` class indices) go to strategies whose
    intermediate methods take them (contrastive ``SUPERVISED``/``TRIPLET``
    need them). Dicts are pytrees, so it works under ``jax.jit`` too (labels
    may be traced).
    """
    call = intermediate_loss_and_gradient(strategy)
    where = f"{type(strategy).__name__} intermediate loss"

    def host(student, teacher, labels):
        student = {k: np.asarray(a) for k, a in student.items()}
        loss, grads = call(student, {k: np.asarray(a) for k, a in teacher.items()},
                           None if labels is None else np.asarray(labels))
        dtype = np.result_type(*student.values())
        return (np.asarray(loss, dtype=dtype),
                {k: np.asarray(grads[k], dtype=a.dtype) if k in grads else np.zeros_like(a)
                 for k, a in student.items()})

    def loss_and_grads(student, teacher, labels):
        shapes = (jax.ShapeDtypeStruct((), jnp.result_type(*student.values())),
                  {k: jax.ShapeDtypeStruct(a.shape, a.dtype) for k, a in student.items()})
        return _fused(host, (student, teacher, labels), shapes)

    @jax.custom_vjp
    def fused(student, teacher, labels):
        return loss_and_grads(student, teacher, labels)[0]

    def bwd(grads, cotangent):
        return jax.tree.map(lambda g: cotangent.astype(g.dtype) * g, grads), None, None

    fused.defvjp(loss_and_grads, bwd)

    def loss(student_acts: Mapping, teacher_acts: Mapping, labels=None):
        acts = []
        for name, given in (("student_acts", student_acts), ("teacher_acts", teacher_acts)):
            if not isinstance(given, Mapping):
                raise TypeError(f"{where}: {name} must be a mapping layer name -> array, "
                                f"got {type(given).__name__}")
            acts.append({k: _operand(a, f"{name}[{k!r}]", where) for k, a in given.items()})
        if not acts[0]:
            raise ValueError(f"{where}: student_acts is empty")
        if labels is not None:
            labels = jnp.asarray(labels)
            if not jnp.issubdtype(labels.dtype, jnp.integer):
                raise TypeError(f"{where}: labels must be integer class indices, got "
                                f"{labels.dtype}")
        return fused(*acts, labels)

    return loss


__all__ = ["intermediate_loss", "wrap", *export_losses(globals(), wrap)]
