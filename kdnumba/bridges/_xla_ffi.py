"""kd_loss's fused CPU kernel as an XLA FFI handler: no Python in the call.

:mod:`kdnumba.jax` normally runs a loss through ``jax.pure_callback``: XLA
stops, takes the GIL, wraps the operands as NumPy arrays, calls Python, and
copies the returned gradient into its own buffer; and a compiled program
holding a Python callback is run synchronously by JAX's CPU client. Inside a
Keras ``Distiller`` train step (B=4096, C=1000) that cost more than the
kernel saves (docs/keras.md, "Speed"). For the hot case -- ``kd_loss`` with
the KL divergence, no labels, no standardisation, which is
``kdnumba.keras.LogitsDistillation`` -- this module provides handlers of
XLA's typed FFI (``XLA_FFI_Error* handler(XLA_FFI_CallFrame*)``, see
``jaxlib/include/xla/ffi/api/c_api.h``) that read XLA's buffers in place,
run the same ``kd_rows`` kernel and write the gradient straight into XLA's
output buffer.

The handlers are kdnumba-policy ``jit`` functions of one ``intp`` (the call
frame's address) returning one ``intp`` (``NULL`` or an ``XLA_FFI_Error*``);
:func:`handler_address` gives the address of Numba's C wrapper of that
compiled function, so they are cached on disk like every other kernel.

Operands (built by :mod:`kdnumba.jax`): the student ``(B, C)``, the teacher
``(B, C)`` of the same dtype, and ``params``: ``kd_rows``'s scalar arguments
(:func:`kd_params`) as float64 stored in uint32 pairs, so that they pass with
``jax_enable_x64`` off. Results: the loss (0-d) and the
gradient ``(B, C)``, both in the student's dtype. The handler checks the
call frame (counts, dtypes, ranks, shapes) and reports a bad one, NaN/inf
inputs (naming the first operand holding one, like the functional loss) or
an overflow as an XLA error, which JAX raises as ``JaxRuntimeError`` with
that message.

Threads: the handler runs the *serial* build of ``kd_rows`` on the XLA
thread that calls it. It never touches Numba's threading layer, so it is safe
under any layer (``workqueue`` is not reentrant) and next to kernels launched
from Python, and XLA keeps its other thread for the step's other work (which
the callback path blocked). Serial and parallel builds are bit-identical
(tests/test_contract.py), so both paths give the same bits.

This module imports Numba only; :mod:`kdnumba.jax` registers the handlers
with JAX.
"""

from __future__ import annotations

import ctypes

import numpy as np
from llvmlite import ir
from numba import carray, types
from numba.core.extending import intrinsic

from kdnumba._policy import jit
from kdnumba.kernels.cpu.dtypes import cast_like
from kdnumba.kernels.cpu.reductions import ordered_sum
from kdnumba.kernels.cpu.softmax_kl import kd_rows

#: The FFI API version the handlers are written against (``XLA_FFI_API_MAJOR``
#: / ``MINOR``: the call frame, buffer and error structs they read are those
#: of 0.1, unchanged since).
API_VERSION = (0, 1)

# --- XLA FFI C ABI (xla/ffi/api/c_api.h), offsets in bytes on 64-bit targets ---
_EXT_METADATA = 1                   # XLA_FFI_Extension_Metadata
_STAGE_EXECUTE = 3                  # XLA_FFI_ExecutionStage_EXECUTE
_ERR_INVALID_ARGUMENT = 3           # XLA_FFI_Error_Code_INVALID_ARGUMENT
_ERROR_CREATE_ARGS_SIZE = 28        # offsetof(errc) + sizeof(errc)
_DTYPE_F32, _DTYPE_F64, _DTYPE_U32 = 11, 12, 8
# XLA_FFI_CallFrame: struct_size, extension_start, api, ctx, stage, args{...}, rets{...}
_FRAME_EXT, _FRAME_API, _FRAME_STAGE = 8, 16, 32
_FRAME_NARGS, _FRAME_ARGS = 56, 72          # args.size, args.args
_FRAME_NRETS, _FRAME_RETS = 96, 112         # rets.size, rets.rets
# XLA_FFI_Buffer: struct_size, extension_start, dtype, data, rank, dims
_BUF_DTYPE, _BUF_DATA, _BUF_RANK, _BUF_DIMS = 16, 24, 32, 40
# XLA_FFI_Extension_Base: struct_size, type, next; Metadata_Extension adds metadata*
_EXTN_TYPE, _EXTN_NEXT, _EXTN_METADATA = 8, 16, 24
# XLA_FFI_Metadata: struct_size, api_version{struct_size, ext, major, minor}, traits
_META_MAJOR, _META_MINOR, _META_TRAITS = 24, 28, 32
# XLA_FFI_Api: struct_size, extension_start, api_version (24 bytes), internal_api, Error_Create
_API_ERROR_CREATE = 48


#: Scalars in the ``params`` operand (see :func:`kd_params`).
N_PARAMS = 6

#: The serial build of ``kd_rows`` (see "Threads" above).
_KD_ROWS_SERIAL = kd_rows.serial


def _message(text: str) -> np.ndarray:
    """A NUL-terminated message the compiled handler can point XLA at."""
    return np.frombuffer(text.encode() + b"\0", dtype=np.uint8)


_MSG_BAD_CALL = _message(
    "kdnumba kd_loss FFI handler: unexpected operands (expected float32/float64 student and "
    "teacher of one (B, C) shape, 6 uint32 params, and a 0-d loss and (B, C) gradient of the "
    "same dtype)")
_MSG_STUDENT = _message("student_logits contains NaN or inf values")
_MSG_TEACHER = _message("teacher_logits contains NaN or inf values")
_MSG_OVERFLOW = _message(
    "the loss overflowed although every input is finite: the inputs' magnitudes exceed what "
    "the dtype can represent in differences (rescale them, or use float64)")


@intrinsic
def _pointer(typingctx, address, like):
    """``address`` (an int) as a pointer to ``like``'s type."""
    sig = types.CPointer(like)(types.intp, like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@intrinsic
def _call_pointer(typingctx, function, argument):
    """Call the C function ``void* f(void*)`` at address ``function``."""
    sig = types.intp(types.intp, types.intp)

    def codegen(context, builder, signature, args):
        void_p = ir.IntType(8).as_pointer()
        f = builder.inttoptr(args[0], ir.FunctionType(void_p, [void_p]).as_pointer())
        result = builder.call(f, [builder.inttoptr(args[1], void_p)])
        return builder.ptrtoint(result, context.get_value_type(types.intp))

    return sig, codegen


@jit
def _i64(address, offset):
    return carray(_pointer(address + offset, np.int64(0)), 1)[0]


@jit
def _i32(address, offset):
    return carray(_pointer(address + offset, np.int32(0)), 1)[0]


@jit
def _put_i32(address, offset, value):
    carray(_pointer(address + offset, np.int32(0)), 1)[0] = value


@jit
def _error(frame, message):
    """An ``XLA_FFI_Error*`` (as an int) carrying ``message`` (XLA copies it)."""
    create = _i64(_i64(frame, _FRAME_API), _API_ERROR_CREATE)
    args = np.zeros(4, dtype=np.int64)
    args[0] = _ERROR_CREATE_ARGS_SIZE
    args[2] = message.ctypes.data
    args[3] = _ERR_INVALID_ARGUMENT
    return _call_pointer(create, args.ctypes.data)


@jit
def _metadata_or_skip(frame):
    """1 if this call is not an execution (metadata query, other stages), after
    answering a metadata query; 0 if the handler is to compute."""
    extension = _i64(frame, _FRAME_EXT)
    while extension != 0:
        if _i32(extension, _EXTN_TYPE) == _EXT_METADATA:
            metadata = _i64(extension, _EXTN_METADATA)
            _put_i32(metadata, _META_MAJOR, API_VERSION[0])
            _put_i32(metadata, _META_MINOR, API_VERSION[1])
            _put_i32(metadata, _META_TRAITS, 0)
            return 1
        extension = _i64(extension, _EXTN_NEXT)
    return 1 if _i32(frame, _FRAME_STAGE) != _STAGE_EXECUTE else 0


@jit
def _buffer_ok(buffer, dtype_code, rank, rows, cols):
    """The buffer has this dtype and rank, and shape ``()``, ``(rows,)`` or ``(rows, cols)``."""
    if _i32(buffer, _BUF_DTYPE) != dtype_code or _i64(buffer, _BUF_RANK) != rank:
        return False
    dims = _i64(buffer, _BUF_DIMS)
    if rank >= 1 and _i64(dims, 0) != rows:
        return False
    return rank < 2 or _i64(dims, 8) == cols


@jit
def _any_non_finite(x):
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            if not np.isfinite(x[i, j]):
                return True
    return False


@jit
def _kd_execute(frame, zero, dtype_code):
    """The KL ``kd_loss`` without labels on the call frame's buffers; see the module doc."""
    if _metadata_or_skip(frame):
        return 0
    if _i64(frame, _FRAME_NARGS) != 3 or _i64(frame, _FRAME_NRETS) != 2:
        return _error(frame, _MSG_BAD_CALL)
    args = _i64(frame, _FRAME_ARGS)
    rets = _i64(frame, _FRAME_RETS)
    student, teacher, params = _i64(args, 0), _i64(args, 8), _i64(args, 16)
    loss_out, grad_out = _i64(rets, 0), _i64(rets, 8)
    if _i32(student, _BUF_DTYPE) != dtype_code or _i64(student, _BUF_RANK) != 2:
        return _error(frame, _MSG_BAD_CALL)
    dims = _i64(student, _BUF_DIMS)
    rows, cols = _i64(dims, 0), _i64(dims, 8)
    if not (_buffer_ok(teacher, dtype_code, 2, rows, cols)
            and _buffer_ok(params, _DTYPE_U32, 1, 2 * N_PARAMS, 0)
            and _buffer_ok(loss_out, dtype_code, 0, 0, 0)
            and _buffer_ok(grad_out, dtype_code, 2, rows, cols)):
        return _error(frame, _MSG_BAD_CALL)
    s = carray(_pointer(_i64(student, _BUF_DATA), zero), (rows, cols))
    t = carray(_pointer(_i64(teacher, _BUF_DATA), zero), (rows, cols))
    grad = carray(_pointer(_i64(grad_out, _BUF_DATA), zero), (rows, cols))
    p = carray(_pointer(_i64(params, _BUF_DATA), np.float64(0.0)), N_PARAMS)
    row_loss = np.empty(rows, dtype=np.float64)
    # Every scalar comes from ``params`` at run time, none is a constant here:
    # LLVM would otherwise specialise the inlined kernel (fold the label
    # branches, contract other products into FMAs) and change its last bits.
    _KD_ROWS_SERIAL(s, t, np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=s.dtype),
                    np.int64(p[5]), cast_like(p[0], zero), p[1], p[2], p[3], p[4],
                    grad, row_loss)
    loss = ordered_sum(row_loss)
    if not np.isfinite(loss):
        if _any_non_finite(s):
            return _error(frame, _MSG_STUDENT)
        if _any_non_finite(t):
            return _error(frame, _MSG_TEACHER)
        return _error(frame, _MSG_OVERFLOW)
    carray(_pointer(_i64(loss_out, _BUF_DATA), zero), 1)[0] = cast_like(loss, zero)
    return 0


@jit
def kd_handler_float32(frame):
    """FFI handler: float32 ``kd_loss`` (KL, no labels)."""
    return _kd_execute(frame, np.float32(0.0), _DTYPE_F32)


@jit
def kd_handler_float64(frame):
    """FFI handler: float64 ``kd_loss`` (KL, no labels)."""
    return _kd_execute(frame, np.float64(0.0), _DTYPE_F64)


#: dtype -> handler of the KL ``kd_loss`` without labels.
KD_HANDLERS = {np.dtype(np.float32): kd_handler_float32, np.dtype(np.float64): kd_handler_float64}


def handler_address(handler) -> int:
    """The address of the C wrapper of ``handler`` compiled for ``intp(intp)``
    (compiled, or loaded from kdnumba's cache, on first use)."""
    handler.compile((types.intp,))
    result = handler.overloads[(types.intp,)]
    return result.library.get_pointer_to_function(result.fndesc.llvm_cfunc_wrapper_name)


def check_abi() -> None:
    """Raise ``RuntimeError`` where the struct offsets above do not hold (they
    assume 64-bit pointers and ``size_t``, as on every platform JAX ships)."""
    if ctypes.sizeof(ctypes.c_void_p) != 8 or ctypes.sizeof(ctypes.c_size_t) != 8:
        raise RuntimeError("the kdnumba FFI handlers need a 64-bit platform")


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)


def handler_capsule(handler):
    """The handler wrapped as XLA expects its targets (a ``PyCapsule``)."""
    return _capsule_new(handler_address(handler), b"xla._CUSTOM_CALL_TARGET", None)


def kd_params(inv_t: float, w_soft: float, w_hard: float, c_soft: float, c_hard: float,
              labels_kind: int) -> np.ndarray:
    """The ``params`` operand: ``kd_rows``'s scalars as float64 bits in uint32 pairs."""
    return np.array([inv_t, w_soft, w_hard, c_soft, c_hard, labels_kind],
                    dtype=np.float64).view(np.uint32)
