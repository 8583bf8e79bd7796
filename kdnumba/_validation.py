"""Input validation: coerce user input to kernel-ready arrays or raise clearly.

Every public entry point funnels its arguments through these helpers, so the
error messages are uniform: they name the argument, say what was expected and
what was received. Nothing here modifies a caller's array; coercion copies only
when it must (dtype cast, non-contiguous input).
"""

from __future__ import annotations

import enum
import functools
import math
import numbers

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_F32, _F64 = FLOAT_DTYPES
_INT64 = np.dtype(np.int64)
_UINT64 = np.dtype(np.uint64)
_ndarray = np.ndarray

# Fast paths. A call of a few microseconds of kernel work must not spend tens
# in its checks (issue #16), so the common case -- an exact ``np.ndarray`` of
# a native float dtype, C-contiguous and writable, int64 labels, or a finite
# ``float`` scalar -- is recognised by a few attribute reads and identity tests
# (``dtype is``: NumPy's native dtypes are singletons) and returned as is.
# Anything else, including every input that is wrong, takes the general path
# below it, which alone raises: the messages cannot differ.


def as_float_array(x, name: str, *, ndim: int | None = None, min_ndim: int | None = None,
                   dtype=None) -> np.ndarray:
    """``x`` as a C-contiguous float32/float64 array with at least one row.

    ``dtype`` (optional) is the dtype to compute in, e.g. the student's: a
    float array of the *other* float dtype is cast to it (a teacher in float64
    for a float32 student). Integer, bool, float16, complex and object input
    raise ``TypeError``; wrong rank or an empty batch raise ``ValueError``.
    """
    if type(x) is _ndarray:  # fast path: nothing to convert, only to look at
        x_dtype, x_ndim = x.dtype, x.ndim
        if ((x_dtype is _F32 or x_dtype is _F64) and (dtype is None or x_dtype is dtype)
                and x_ndim and (ndim is None or x_ndim == ndim)
                and (min_ndim is None or x_ndim >= min_ndim)
                and x.size and (flags := x.flags).c_contiguous and flags.writeable):
            return x  # ndim, size > 0: at least one row and no zero-length dimension
    reject_masked(x, name)
    if hasattr(x, "__cuda_array_interface__") and not hasattr(x, "__array__"):
        raise TypeError(
            f"{name} is a GPU array; pass device='cuda' (or 'auto') to run on the GPU, "
            "or copy it to the host first")
    try:
        arr = np.asarray(x)
    except Exception as exc:  # e.g. a CUDA torch tensor
        raise TypeError(f"{name} could not be converted to a NumPy array: {exc}") from exc
    check_float_meta(arr.dtype, arr.shape, name, ndim=ndim, min_ndim=min_ndim)
    if dtype is not None and arr.dtype != dtype:
        arr = arr.astype(dtype)
    return kernel_ready(arr)


def kernel_ready(arr: np.ndarray, dtype=None) -> np.ndarray:
    """``arr`` C-contiguous and writable (a copy only when it is not): Numba types
    a read-only array as a different type, so handing one to a kernel would
    compile a second specialisation of it (0.3-0.8 s per kernel and dtype).
    Kernels never write their inputs; the copy keeps the caller's array as is."""
    arr = np.ascontiguousarray(arr, dtype=dtype)
    return arr if arr.flags.writeable else arr.copy()


def reject_masked(x, name: str) -> None:
    """``TypeError`` for a NumPy masked array: ``np.asarray`` would silently drop
    its mask and compute with the hidden values."""
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a masked array; kdnumba does not interpret masks. Pass "
            f"{name}.filled(value) with the value masked entries should take, or drop "
            "the masked rows")


def check_float_meta(dtype, shape, name: str, *, ndim: int | None = None,
                     min_ndim: int | None = None) -> None:
    """The dtype and shape checks of :func:`as_float_array`, on metadata only
    (shared with device arrays, whose data stays on the GPU)."""
    dtype = np.dtype(dtype)
    shape = tuple(shape)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a float32 or float64 array, got dtype {dtype.name}"
            + (" (cast it with .astype(np.float32))" if dtype.kind in "biuf" else ""))
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {shape}")
    if min_ndim is not None and len(shape) < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {shape}")
    if len(shape) == 0 or shape[0] == 0:
        raise ValueError(f"{name} is empty: the batch must hold at least one row, got shape {shape}")
    if 0 in shape:
        raise ValueError(f"{name} has a zero-length dimension: shape {shape}")


def check_same_batch(a, b, name_a: str, name_b: str) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` have the same number of rows
    (any objects with a ``shape``, host or device arrays)."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"batch size mismatch: {name_a} has {a.shape[0]} rows, {name_b} has {b.shape[0]}")


def check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` have the same shape."""
    if a.shape == b.shape:
        return
    check_same_batch(a, b, name_a, name_b)
    if a.shape != b.shape:
        raise ValueError(
            f"shape mismatch: {name_a} has shape {a.shape}, {name_b} has shape {b.shape}")


def first_non_finite(named_arrays) -> str | None:
    """Name of the first array holding NaN or inf, else ``None``."""
    for name, arr in named_arrays:
        if arr is not None and arr.dtype.kind == "f" and not np.isfinite(arr).all():
            return name
    return None


def raise_non_finite(named_arrays, what: str = "the loss") -> None:
    """Called when a kernel produced a non-finite result: say why."""
    name = first_non_finite(named_arrays)
    if name is not None:
        raise ValueError(f"{name} contains NaN or inf values")
    raise ValueError(
        f"{what} overflowed although every input is finite: the inputs' magnitudes "
        "exceed what the dtype can represent in differences (rescale them, or use float64)")


def check_positive(value, name: str) -> float:
    """A finite float > 0 (temperatures, margins...)."""
    v = check_real(value, name)
    if not v > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return v


def check_unit_interval(value, name: str) -> float:
    """A float in [0, 1] (alpha, weights...)."""
    v = check_real(value, name)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return v


def check_non_negative(value, name: str) -> float:
    v = check_real(value, name)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return v


def check_real(value, name: str) -> float:
    """A finite real number (bool rejected: ``True`` is not a temperature)."""
    if type(value) is float and math.isfinite(value):  # fast path
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def check_int(value, name: str, *, minimum: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    v = int(value)
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return v


def check_name(value, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty string, got {value!r}")
    return value


def parse_choice(value, choices: type[enum.Enum], name: str, aliases=None):
    """``value`` as a member of the string enum ``choices``: a member, or a
    string matching a member's value in any case, with ``-`` read as ``_``
    and ``aliases`` (``{normalised spelling: value}``) applied.

    Non-strings raise ``TypeError``; unknown strings ``ValueError`` listing
    the valid values.
    """
    if type(value) is str and (aliases is None or value not in aliases):
        member = _exact_values(choices).get(value)  # fast path: a member's exact value
        if member is not None:
            return member
    if isinstance(value, choices):
        return value
    if not isinstance(value, str):
        raise TypeError(
            f"{name} must be a {choices.__name__} or a string, got {type(value).__name__}")
    key = value.strip().lower().replace("-", "_")
    key = (aliases or {}).get(key, key)
    try:
        return choices(key)
    except ValueError:
        valid = ", ".join(repr(m.value) for m in choices)
        raise ValueError(f"{name} must be one of {valid}, got {value!r}") from None


@functools.cache
def _exact_values(choices: type[enum.Enum]) -> dict:
    """``{value: member}`` of the members whose value is already in the form
    :func:`parse_choice` normalises to (so looking it up gives the same member)."""
    return {m.value: m for m in choices
            if isinstance(m.value, str) and m.value == m.value.strip().lower().replace("-", "_")}


def _labels_array(labels, name: str) -> np.ndarray:
    reject_masked(labels, name)
    try:
        return np.asarray(labels)
    except Exception as exc:
        raise TypeError(f"{name} could not be converted to a NumPy array: {exc}") from exc


def check_index_labels(arr: np.ndarray, name: str, n_rows: int, rows_of: str) -> None:
    """Shape checks shared by every kind of integer class-index labels."""
    if arr.ndim != 1:
        raise ValueError(
            f"integer {name} must be 1-D class indices of shape ({n_rows},), got shape {arr.shape}")
    if arr.shape[0] != n_rows:
        raise ValueError(
            f"batch size mismatch: {name} has {arr.shape[0]} entries, {rows_of} have {n_rows} rows")


def as_labels(labels, name: str, n_rows: int, n_classes: int, dtype) -> tuple[str, np.ndarray | None]:
    """Classify and validate labels for ``n_rows`` rows over ``n_classes`` classes.

    Returns ``(kind, array)`` with kind ``"none"``, ``"index"`` (int64 ``(B,)``)
    or ``"dense"`` (``dtype`` ``(B, C)``, rows non-negative and summing to 1
    within 1e-3).
    """
    if labels is None:
        return "none", None
    if (type(labels) is _ndarray and labels.dtype is _INT64 and labels.ndim == 1
            and labels.shape[0] == n_rows and n_rows
            and (flags := labels.flags).c_contiguous and flags.writeable
            and labels.view(_UINT64).max() < n_classes):
        return "index", labels  # fast path: in range (a negative index is >= 2**63 here)
    arr = _labels_array(labels, name)
    if arr.dtype.kind in "iu":
        check_index_labels(arr, name, n_rows, "the logits")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= n_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} must be class indices in [0, {n_classes}), found {bad}")
        return "index", kernel_ready(arr, np.int64)
    if arr.dtype.kind == "f" and arr.dtype in FLOAT_DTYPES:
        if arr.ndim != 2 or arr.shape != (n_rows, n_classes):
            raise ValueError(
                f"float {name} must be one-hot or soft targets of shape ({n_rows}, {n_classes}), "
                f"got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} contains NaN or inf values")
        if (arr < 0).any():
            raise ValueError(f"{name} rows must be probability vectors, found a negative entry")
        sums = arr.sum(axis=1, dtype=np.float64)
        worst = int(np.argmax(np.abs(sums - 1.0)))
        if abs(sums[worst] - 1.0) > 1e-3:
            raise ValueError(
                f"{name} rows must be probability vectors summing to 1, row {worst} sums to {sums[worst]:.6g}")
        return "dense", kernel_ready(arr, dtype)
    raise TypeError(
        f"{name} must be None, integer class indices (B,), or float32/float64 targets (B, C); "
        f"got dtype {arr.dtype.name}")


def as_layer_array(acts, name: str, layer: str, dtype=None) -> np.ndarray:
    """One layer of an ``IntermediateActivations``, validated like any input."""
    return as_float_array(acts[layer], f"{name}[{layer!r}]", dtype=dtype)


def gradient_buffer(out, like: np.ndarray, inputs=()) -> np.ndarray:
    """The array a kernel writes the gradient into: ``out``, checked, or a new one.

    ``out`` must be a C-contiguous array of ``like``'s shape and dtype that
    shares no memory with ``like`` or any of the caller's ``inputs`` (``like``
    may be a converted copy, so the originals are checked too).
    """
    if out is None:
        return np.empty_like(like)
    check_out(out, like.shape, like.dtype, (like, *inputs))
    return out


def check_out(out, shape, dtype, inputs=()) -> None:
    """Raise unless ``out`` is a C-contiguous NumPy array of ``shape`` and
    ``dtype`` sharing no memory with any NumPy array among ``inputs``."""
    dtype = np.dtype(dtype)
    shape = tuple(shape)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy array, got {type(out).__name__}")
    if out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(
            f"out must be a C-contiguous {dtype.name} array of shape {shape}, "
            f"got {out.dtype.name} {out.shape}")
    if not out.flags.writeable:
        raise ValueError("out must be a writeable array, got a read-only one")
    checked = []  # a validated input is often the caller's array itself: check it once
    for array in inputs:
        if isinstance(array, np.ndarray) and not any(array is c for c in checked):
            checked.append(array)
            if np.shares_memory(out, array):
                raise ValueError("out must not share memory with the inputs")


def as_class_labels(labels, name: str, n_rows: int) -> np.ndarray:
    """Hard class labels as int64 ``(B,)``.

    Accepts non-negative integer indices ``(B,)`` (any values; only equality
    matters) or one-hot float rows ``(B, C)``. Soft targets have no classes
    and raise ``ValueError``.
    """
    if labels is None:
        raise ValueError(f"{name} are required (integer class indices of shape ({n_rows},))")
    arr = _labels_array(labels, name)
    if arr.dtype.kind in "iu":
        check_index_labels(arr, name, n_rows, "the embeddings")
        if arr.size and int(arr.min()) < 0:
            raise ValueError(f"{name} must be non-negative class indices, found {int(arr.min())}")
        return kernel_ready(arr, np.int64)
    if arr.dtype in FLOAT_DTYPES:
        if arr.ndim != 2 or arr.shape[0] != n_rows:
            raise ValueError(
                f"float {name} must be one-hot rows of shape ({n_rows}, C), got shape "
                f"{arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} contains NaN or inf values")
        one_hot = ((arr == 0) | (arr == 1)).all() and (arr.sum(axis=1) == 1).all()
        if not one_hot:
            raise ValueError(
                f"{name}: contrastive losses need hard classes; float labels must be one-hot "
                "rows (soft targets define no positives)")
        return np.ascontiguousarray(arr.argmax(axis=1), dtype=np.int64)
    raise TypeError(
        f"{name} must be integer class indices ({n_rows},) or one-hot float rows "
        f"({n_rows}, C); got dtype {arr.dtype.name}")
