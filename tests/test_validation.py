"""Input validation (``kdnumba/_validation.py``), device dispatch (``kdnumba/_dispatch.py``)
and every bad input of SPEC through ``kdnumba.functional.kd_loss``: each raises a clear
``ValueError``/``TypeError`` (or ``RuntimeError`` for an unusable CUDA device) whose message
names the argument."""

from __future__ import annotations

import numpy as np
import pytest
from testkit import assert_inputs_untouched

from kdnumba import _dispatch
from kdnumba import _validation as v
from kdnumba.functional import kd_loss


class FakeCudaArray:
    """Looks like a device array (``__cuda_array_interface__``) and has no ``__array__``."""

    @property
    def __cuda_array_interface__(self):
        return {"shape": (2, 3), "typestr": "<f4", "data": (0, False), "version": 3}


class Unconvertible:
    def __array__(self, *args, **kwargs):
        raise RuntimeError("cannot leave the device")


# --- as_float_array -------------------------------------------------------------------------

def test_as_float_array_accepts_lists_and_keeps_float_dtypes():
    arr = v.as_float_array([[1.0, 2.0], [3.0, 4.0]], "x", ndim=2)
    assert arr.dtype == np.float64 and arr.shape == (2, 2) and arr.flags.c_contiguous
    for dtype in (np.float32, np.float64):
        assert v.as_float_array(np.ones((2, 3), dtype), "x").dtype == dtype


def test_as_float_array_copies_only_when_it_must(rng):
    x = rng.standard_normal((4, 6)).astype(np.float32)
    assert np.shares_memory(v.as_float_array(x, "x"), x)  # already kernel-ready
    strided = np.asfortranarray(x)
    before = strided.copy()
    out = v.as_float_array(strided, "x")
    assert out.flags.c_contiguous and not np.shares_memory(out, strided)
    np.testing.assert_array_equal(out, x)
    np.testing.assert_array_equal(strided, before)
    cast = v.as_float_array(x, "x", dtype=np.float64)
    assert cast.dtype == np.float64 and not np.shares_memory(cast, x)
    np.testing.assert_array_equal(cast, x.astype(np.float64))


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_, np.float16,
                                   np.complex64, np.complex128, object, "U3"])
def test_as_float_array_rejects_non_float_dtypes(dtype):
    x = np.ones((2, 3), dtype=dtype)
    with pytest.raises(TypeError, match=r"my_arg must be a float32 or float64 array, got dtype"):
        v.as_float_array(x, "my_arg")


def test_as_float_array_suggests_a_cast_for_numeric_input():
    with pytest.raises(TypeError, match=r"\.astype\(np\.float32\)"):
        v.as_float_array(np.ones((2, 3), np.int64), "x")


@pytest.mark.parametrize("shape, kwargs, pattern", [
    ((3,), dict(ndim=2), r"x must be 2-D, got shape \(3,\)"),
    ((2, 3, 4), dict(ndim=2), r"x must be 2-D, got shape \(2, 3, 4\)"),
    ((3,), dict(min_ndim=2), r"x must have at least 2 dimensions"),
    ((0, 3), dict(ndim=2), r"x is empty: the batch must hold at least one row"),
    ((0,), dict(), r"x is empty"),
    ((), dict(), r"x is empty"),
    ((3, 0), dict(ndim=2), r"x has a zero-length dimension"),
])
def test_as_float_array_shape_errors(shape, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        v.as_float_array(np.ones(shape), "x", **kwargs)


def test_as_float_array_gpu_and_unconvertible_inputs():
    with pytest.raises(TypeError, match=r"x is a GPU array; pass device='cuda'"):
        v.as_float_array(FakeCudaArray(), "x")
    with pytest.raises(TypeError, match=r"x could not be converted to a NumPy array"):
        v.as_float_array(Unconvertible(), "x")


# --- scalars --------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [1, 2.5, np.float32(0.5), np.int64(3), 1e300])
def test_check_positive_accepts(value):
    assert v.check_positive(value, "temperature") == float(value)


@pytest.mark.parametrize("value, exc, pattern", [
    (0, ValueError, r"temperature must be > 0, got 0"),
    (-0.0, ValueError, r"temperature must be > 0"),
    (-2.0, ValueError, r"temperature must be > 0"),
    (float("nan"), ValueError, r"temperature must be finite"),
    (float("inf"), ValueError, r"temperature must be finite"),
    (True, TypeError, r"temperature must be a real number, got bool"),
    (np.bool_(True), TypeError, r"temperature must be a real number"),
    ("3", TypeError, r"temperature must be a real number, got str"),
    (None, TypeError, r"temperature must be a real number"),
    (1 + 2j, TypeError, r"temperature must be a real number"),
    (np.array([3.0]), TypeError, r"temperature must be a real number"),
])
def test_check_positive_rejects(value, exc, pattern):
    with pytest.raises(exc, match=pattern):
        v.check_positive(value, "temperature")


def test_check_unit_interval():
    for ok in (0, 0.0, 0.3, 1, 1.0):
        assert v.check_unit_interval(ok, "alpha") == float(ok)
    for bad in (-1e-12, 1.0000001, 2):
        with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
            v.check_unit_interval(bad, "alpha")
    with pytest.raises(TypeError, match="alpha must be a real number"):
        v.check_unit_interval(False, "alpha")


def test_check_non_negative_int_and_name():
    assert v.check_non_negative(0, "w") == 0.0
    with pytest.raises(ValueError, match=r"w must be >= 0"):
        v.check_non_negative(-0.5, "w")
    assert v.check_int(np.int32(4), "n", minimum=0) == 4
    with pytest.raises(ValueError, match=r"n must be >= 1, got 0"):
        v.check_int(0, "n", minimum=1)
    for bad in (2.0, True, "2", None):
        with pytest.raises(TypeError, match=r"n must be an integer"):
            v.check_int(bad, "n")
    assert v.check_name("layer3", "layer name") == "layer3"
    for bad in ("", None, 3, b"x"):
        with pytest.raises(TypeError, match=r"layer name must be a non-empty string"):
            v.check_name(bad, "layer name")


# --- shapes, non-finite values --------------------------------------------------------------

def test_check_same_shape_reports_batch_first():
    a = np.ones((3, 4))
    v.check_same_shape(a, np.zeros((3, 4)), "a", "b")
    with pytest.raises(ValueError, match=r"batch size mismatch: a has 3 rows, b has 2"):
        v.check_same_shape(a, np.ones((2, 5)), "a", "b")
    with pytest.raises(ValueError, match=r"shape mismatch: a has shape \(3, 4\), b has shape \(3, 5\)"):
        v.check_same_shape(a, np.ones((3, 5)), "a", "b")


def test_non_finite_helpers():
    ok, bad = np.ones(3), np.array([1.0, np.inf])
    assert v.first_non_finite([("a", ok), ("b", None), ("c", bad)]) == "c"
    assert v.first_non_finite([("a", ok), ("i", np.arange(3))]) is None
    with pytest.raises(ValueError, match=r"c contains NaN or inf values"):
        v.raise_non_finite([("a", ok), ("c", bad)])
    with pytest.raises(ValueError, match=r"the loss overflowed although every input is finite"):
        v.raise_non_finite([("a", ok)])


# --- labels ---------------------------------------------------------------------------------

def test_as_labels_kinds():
    assert v.as_labels(None, "labels", 3, 4, np.float32) == ("none", None)
    kind, y = v.as_labels([0, 3, 1], "labels", 3, 4, np.float32)
    assert kind == "index" and y.dtype == np.int64 and y.tolist() == [0, 3, 1]
    kind, y = v.as_labels(np.array([0, 3, 1], np.uint8), "labels", 3, 4, np.float32)
    assert kind == "index" and y.dtype == np.int64
    soft = np.full((3, 4), 0.25)
    kind, y = v.as_labels(soft, "labels", 3, 4, np.float32)
    assert kind == "dense" and y.dtype == np.float32 and y.flags.c_contiguous
    # Within the documented 1e-3 slack.
    v.as_labels(soft * (1 + 9e-4), "labels", 3, 4, np.float64)


@pytest.mark.parametrize("labels, exc, pattern", [
    (np.array([0, 4, 1]), ValueError, r"labels must be class indices in \[0, 4\), found 4"),
    (np.array([0, -1, 1]), ValueError, r"labels must be class indices in \[0, 4\), found -1"),
    (np.array([[0], [1], [2]]), ValueError, r"integer labels must be 1-D class indices of shape \(3,\)"),
    (np.array([0, 1]), ValueError, r"batch size mismatch: labels has 2 entries"),
    (np.full((3, 5), 0.2), ValueError, r"float labels must be one-hot or soft targets of shape \(3, 4\)"),
    (np.full((2, 4), 0.25), ValueError, r"float labels must be one-hot or soft targets"),
    (np.full(3, 0.25), ValueError, r"float labels must be one-hot or soft targets"),
    (np.full((3, 4), 0.3), ValueError, r"labels rows must be probability vectors summing to 1, row 0 sums to 1\.2"),
    (np.array([[1.5, -0.5, 0, 0]] * 3), ValueError, r"labels rows must be probability vectors, found a negative entry"),
    (np.array([[np.nan, 1, 0, 0]] * 3), ValueError, r"labels contains NaN or inf values"),
    (np.array([[np.inf, 0, 0, 0]] * 3), ValueError, r"labels contains NaN or inf values"),
    (np.array([True, False, True]), TypeError, r"labels must be None, integer class indices .* got dtype bool"),
    (np.full((3, 4), 0.25, np.float16), TypeError, r"labels must be None, .* got dtype float16"),
    (np.full((3, 4), 0.25, np.complex128), TypeError, r"labels must be None, .* got dtype complex128"),
    (np.array(["a", "b", "c"]), TypeError, r"labels must be None, integer class indices"),
    (Unconvertible(), TypeError, r"labels could not be converted to a NumPy array"),
])
def test_as_labels_rejects(labels, exc, pattern):
    with pytest.raises(exc, match=pattern):
        v.as_labels(labels, "labels", 3, 4, np.float64)


def test_index_labels_fast_path_agrees_with_the_general_path():
    """int64 C-contiguous labels skip the copy and take one range reduction; a
    negative index, one equal to C, read-only or strided labels behave as ever."""
    y = np.array([0, 3, 1], np.int64)
    kind, out = v.as_labels(y, "labels", 3, 4, np.float32)
    assert kind == "index" and out is y
    for bad, found in (([0, -1, 1], -1), ([0, 4, 1], 4), ([np.iinfo(np.int64).min, 0, 0], None)):
        with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 4\)"
                           + (f", found {found}" if found is not None else "")):
            v.as_labels(np.array(bad, np.int64), "labels", 3, 4, np.float32)
    frozen = y.copy()
    frozen.flags.writeable = False
    kind, out = v.as_labels(frozen, "labels", 3, 4, np.float32)
    assert out.flags.writeable and out.tolist() == [0, 3, 1]
    strided = np.array([0, 9, 3, 9, 1, 9], np.int64)[::2]
    kind, out = v.as_labels(strided, "labels", 3, 4, np.float32)
    assert out.flags.c_contiguous and out.tolist() == [0, 3, 1]


def test_float_array_fast_path_only_for_kernel_ready_arrays(rng):
    """An exact ndarray of a native float dtype, C-contiguous and writable, is
    returned as is; anything else is converted, or rejected, as before."""
    x = rng.standard_normal((3, 4)).astype(np.float32)
    assert v.as_float_array(x, "x", ndim=2) is x
    assert v.as_float_array(x, "x", dtype=x.dtype) is x
    assert v.as_float_array(x, "x", dtype=np.float64).dtype == np.float64
    frozen = x.copy()
    frozen.flags.writeable = False
    assert v.as_float_array(frozen, "x").flags.writeable
    big_endian = x.astype(">f4")
    with pytest.raises(TypeError, match=r"x must be a float32 or float64 array"):
        v.as_float_array(big_endian, "x")
    with pytest.raises(ValueError, match=r"x is empty"):
        v.as_float_array(np.float32(1.0) * np.ones((), np.float32), "x")
    with pytest.raises(TypeError, match=r"x is a masked array"):
        v.as_float_array(np.ma.masked_array(x), "x")


def test_parse_choice_exact_values_and_aliases():
    from kdnumba.functional.response import Divergence
    from kdnumba.functional.selectivity import SelectivityMetric
    assert v.parse_choice("jsd", Divergence, "divergence") is Divergence.JSD
    assert v.parse_choice(" JSD", Divergence, "divergence") is Divergence.JSD
    assert SelectivityMetric.parse("peak") is SelectivityMetric.PEAK_TO_AVERAGE
    assert SelectivityMetric.parse("variance") is SelectivityMetric.VARIANCE
    # An alias wins over an exact value it shadows (none of kdnumba's does).
    assert v.parse_choice("kl", Divergence, "d", {"kl": "tvd"}) is Divergence.TVD


def test_as_layer_array_names_the_layer():
    acts = {"layer3": np.ones((2, 3), np.int32)}
    with pytest.raises(TypeError, match=r"student_acts\['layer3'\] must be a float32 or float64"):
        v.as_layer_array(acts, "student_acts", "layer3")
    acts = {"layer3": np.ones((2, 3), np.float32)}
    assert v.as_layer_array(acts, "student_acts", "layer3", dtype=np.float64).dtype == np.float64


# --- every bad input of SPEC, through kd_loss -----------------------------------------------

def _good(n_rows=3, n_cols=4, dtype=np.float64):
    rng = np.random.default_rng(7)
    return (rng.standard_normal((n_rows, n_cols)).astype(dtype),
            rng.standard_normal((n_rows, n_cols)).astype(dtype))


def _with(student=None, teacher=None, **kwargs):
    s, t = _good()
    return (s if student is None else student, t if teacher is None else teacher), kwargs


def _poisoned(which, value, row=1, col=2, dtype=np.float64):
    s, t = _good(dtype=dtype)
    (s if which == "student" else t)[row, col] = value
    return s, t


BAD_INPUTS = {
    # shapes
    "shape_mismatch": (_with(teacher=np.ones((3, 5))), ValueError,
                       r"shape mismatch: student_logits has shape \(3, 4\), teacher_logits has shape \(3, 5\)"),
    "batch_mismatch": (_with(teacher=np.ones((2, 4))), ValueError,
                       r"batch size mismatch: student_logits has 3 rows, teacher_logits has 2"),
    "student_1d": (_with(student=np.ones(4)), ValueError, r"student_logits must be 2-D, got shape \(4,\)"),
    "student_3d": (_with(student=np.ones((3, 4, 1))), ValueError, r"student_logits must be 2-D"),
    "teacher_1d": (_with(teacher=np.ones(4)), ValueError, r"teacher_logits must be 2-D"),
    "teacher_3d": (_with(teacher=np.ones((3, 4, 1))), ValueError, r"teacher_logits must be 2-D"),
    "student_scalar": (_with(student=np.float64(1.0)), ValueError, r"student_logits must be 2-D"),
    "empty_batch": (((np.ones((0, 4)), np.ones((0, 4))), {}), ValueError,
                    r"student_logits is empty: the batch must hold at least one row"),
    "empty_teacher": (_with(teacher=np.ones((0, 4))), ValueError, r"teacher_logits is empty"),
    "zero_classes": (((np.ones((3, 0)), np.ones((3, 0))), {}), ValueError,
                     r"student_logits has a zero-length dimension"),
    # dtypes
    **{f"student_{d}": (_with(student=np.ones((3, 4), dtype=d)), TypeError,
                        r"student_logits must be a float32 or float64 array, got dtype")
       for d in ("int32", "int64", "uint8", "bool", "float16", "complex64", "complex128", "object")},
    **{f"teacher_{d}": (_with(teacher=np.ones((3, 4), dtype=d)), TypeError,
                        r"teacher_logits must be a float32 or float64 array, got dtype")
       for d in ("int64", "bool", "float16", "complex128")},
    "student_strings": (_with(student=[["a"] * 4] * 3), TypeError, r"student_logits must be a float32"),
    # non-finite values
    **{f"student_{name}_{dt.__name__}": (((_poisoned("student", val, dtype=dt)), {}), ValueError,
                                         r"student_logits contains NaN or inf values")
       for name, val in (("nan", np.nan), ("inf", np.inf), ("neginf", -np.inf))
       for dt in (np.float32, np.float64)},
    **{f"teacher_{name}_{dt.__name__}": (((_poisoned("teacher", val, dtype=dt)), {}), ValueError,
                                         r"teacher_logits contains NaN or inf values")
       for name, val in (("nan", np.nan), ("inf", np.inf), ("neginf", -np.inf))
       for dt in (np.float32, np.float64)},
    "student_nan_only_entry": ((((np.full((1, 2), np.nan)), np.zeros((1, 2))), {}), ValueError,
                               r"student_logits contains NaN"),
    "teacher_all_neginf": (((np.zeros((1, 3)), np.full((1, 3), -np.inf)), {}), ValueError,
                           r"teacher_logits contains NaN"),
    # labels
    "labels_too_large": (_with(labels=np.array([0, 4, 1])), ValueError,
                         r"labels must be class indices in \[0, 4\), found 4"),
    "labels_negative": (_with(labels=np.array([0, -1, 1])), ValueError,
                        r"labels must be class indices in \[0, 4\), found -1"),
    "labels_short": (_with(labels=np.array([0, 1])), ValueError, r"batch size mismatch: labels has 2"),
    "labels_2d_int": (_with(labels=np.zeros((3, 4), np.int64)), ValueError,
                      r"integer labels must be 1-D class indices"),
    "labels_wrong_classes": (_with(labels=np.full((3, 5), 0.2)), ValueError,
                             r"float labels must be one-hot or soft targets of shape \(3, 4\)"),
    "labels_float_1d": (_with(labels=np.zeros(3)), ValueError, r"float labels must be one-hot or soft"),
    "soft_not_summing_to_1": (_with(labels=np.full((3, 4), 0.2)), ValueError,
                              r"labels rows must be probability vectors summing to 1"),
    "soft_negative": (_with(labels=np.array([[1.2, -0.2, 0, 0]] * 3)), ValueError,
                      r"labels rows must be probability vectors, found a negative entry"),
    "soft_nan": (_with(labels=np.array([[0.5, np.nan, 0.5, 0]] * 3)), ValueError,
                 r"labels contains NaN or inf"),
    "soft_inf": (_with(labels=np.array([[0.5, np.inf, 0.5, 0]] * 3)), ValueError,
                 r"labels contains NaN or inf"),
    "labels_bool": (_with(labels=np.array([True, False, True])), TypeError, r"labels must be None, integer"),
    "labels_float16": (_with(labels=np.full((3, 4), 0.25, np.float16)), TypeError, r"labels must be None"),
    # hyperparameters
    **{f"temperature_{name}": (_with(temperature=val), exc, pattern)
       for name, val, exc, pattern in (
           ("zero", 0.0, ValueError, r"temperature must be > 0"),
           ("negative", -3.0, ValueError, r"temperature must be > 0"),
           ("nan", float("nan"), ValueError, r"temperature must be finite"),
           ("inf", float("inf"), ValueError, r"temperature must be finite"),
           ("bool", True, TypeError, r"temperature must be a real number, got bool"),
           ("str", "3", TypeError, r"temperature must be a real number"),
           ("none", None, TypeError, r"temperature must be a real number"))},
    **{f"alpha_{name}": (_with(labels=np.array([0, 1, 2]), alpha=val), exc, pattern)
       for name, val, exc, pattern in (
           ("negative", -0.1, ValueError, r"alpha must be in \[0, 1\]"),
           ("above_one", 1.1, ValueError, r"alpha must be in \[0, 1\]"),
           ("nan", float("nan"), ValueError, r"alpha must be finite"),
           ("bool", True, TypeError, r"alpha must be a real number"))},
    "alpha_bad_even_without_labels": (_with(alpha=2.0), ValueError, r"alpha must be in \[0, 1\]"),
    # device
    **{f"device_{name}": (_with(device=val), ValueError,
                          r"device must be one of \('cpu', 'cuda', 'auto'\)")
       for name, val in (("gpu", "gpu"), ("upper", "CPU"), ("none", None), ("int", 0))},
    # out=
    "out_shape": (_with(out=np.empty((3, 5))), ValueError,
                  r"out must be a C-contiguous float64 array of shape \(3, 4\), got float64 \(3, 5\)"),
    "out_dtype": (_with(out=np.empty((3, 4), np.float32)), ValueError,
                  r"out must be a C-contiguous float64 array of shape \(3, 4\), got float32"),
    "out_not_contiguous": (_with(out=np.empty((3, 8))[:, ::2]), ValueError, r"out must be a C-contiguous"),
    "out_list": (_with(out=[[0.0] * 4] * 3), TypeError, r"out must be a NumPy array, got list"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=str)
def test_kd_loss_bad_input(case):
    ((s, t), kwargs), exc, pattern = BAD_INPUTS[case]
    kwargs = dict(kwargs)
    labels = kwargs.pop("labels", None)

    def failing_call():
        with pytest.raises(exc, match=pattern):
            kd_loss(s, t, labels, **kwargs)

    # a failed call does not touch the inputs either
    assert_inputs_untouched(failing_call, *[a for a in (s, t, labels) if isinstance(a, np.ndarray)])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("which", ["student", "teacher"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_detected_everywhere(dtype, which, value):
    """Wherever the bad value sits (the row maximum or not, first/last column, any label
    kind, tiny or huge T) the error names the array that holds it."""
    name = "student_logits" if which == "student" else "teacher_logits"
    for row, col in [(0, 0), (1, 2), (2, 3)]:
        for labels in (None, np.array([0, 1, 2]), np.eye(4)[[3, 1, 0]]):
            for temperature in (0.05, 3.0, 100.0):
                s, t = _poisoned(which, value, row, col, dtype)
                with pytest.raises(ValueError, match=rf"{name} contains NaN or inf values"):
                    kd_loss(s, t, labels, temperature=temperature, alpha=0.5)


def test_finite_inputs_whose_loss_overflows():
    """Finite logits whose differences overflow the dtype: a clear error, not inf/NaN."""
    for dtype in (np.float32, np.float64):
        big = np.finfo(dtype).max
        s = np.array([[big, -big]], dtype=dtype)
        t = np.zeros((1, 2), dtype=dtype)
        with pytest.raises(ValueError, match=r"the loss overflowed although every input is finite"):
            kd_loss(s, t)
        # Equal extreme values are fine: softmax is uniform, the loss is 0.
        loss, grad = kd_loss(np.full((1, 2), big, dtype=dtype), t)
        assert loss == 0.0 and not grad.any()


# --- dispatch -------------------------------------------------------------------------------

def test_check_device():
    for device in _dispatch.DEVICES:
        assert _dispatch.check_device(device) == device
    with pytest.raises(ValueError, match=r"device must be one of \('cpu', 'cuda', 'auto'\), got 'tpu'"):
        _dispatch.check_device("tpu")


def test_resolve_device():
    host, gpu = np.ones(3), FakeCudaArray()
    assert _dispatch.is_cuda_array(gpu) and not _dispatch.is_cuda_array(host)
    assert _dispatch.resolve_device("auto", host, None) == "cpu"
    assert _dispatch.resolve_device("auto", host, gpu) == "cuda"
    assert _dispatch.resolve_device("auto") == "cpu"
    assert _dispatch.resolve_device("cpu", gpu) == "cpu"
    assert _dispatch.resolve_device("cuda", host) == "cuda"
    with pytest.raises(ValueError, match=r"device must be one of"):
        _dispatch.resolve_device("gpu", host)


def test_backend_fast_path():
    from kdnumba._backend_host import HOST
    host = np.ones(3)
    assert _dispatch.backend("auto", host, None, host) is HOST
    assert _dispatch.backend("cpu", FakeCudaArray()) is HOST  # the array is refused later
    assert _dispatch.backend("auto", [1.0, 2.0]) is HOST  # lists: the general path
    with pytest.raises(ValueError, match=r"device must be one of"):
        _dispatch.backend("gpu", host)
    with pytest.raises(ValueError, match=r"device must be one of"):
        _dispatch.backend(None, host)


def test_kernels_lookup():
    module = _dispatch.kernels("softmax_kl", "cpu")
    assert module.__name__ == "kdnumba.kernels.cpu.softmax_kl" and hasattr(module, "kd_rows")
    with pytest.raises(ValueError, match=r"device must be 'cpu' or 'cuda' here, got 'auto'"):
        _dispatch.kernels("softmax_kl", "auto")
