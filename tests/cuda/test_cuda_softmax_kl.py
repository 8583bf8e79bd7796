"""kd_loss on the CUDA path (simulator or GPU) against the CPU kernel."""

from __future__ import annotations

import numpy as np
import pytest
from cuda_support import CudaArrayLike, assert_matches_cpu, device, foreign, to_host

from kdnumba import DistillationLoss
from kdnumba.functional import kd_loss

DTYPES = [np.float32, np.float64]
TOL = {np.float32: dict(rtol=2e-5, atol=2e-7), np.float64: dict(rtol=1e-12, atol=1e-15)}


def _inputs(rng, dtype, n_rows=3, n_cols=70, scale=3.0):
    s = (scale * rng.standard_normal((n_rows, n_cols))).astype(dtype)
    t = (scale * rng.standard_normal((n_rows, n_cols))).astype(dtype)
    idx = rng.integers(0, n_cols, n_rows)
    idx[0] = n_cols - 1  # the last column: owned by a thread's last stride
    dense = rng.random((n_rows, n_cols))
    dense = (dense / dense.sum(axis=1, keepdims=True)).astype(dtype)
    return s, t, {"none": None, "index": idx, "dense": dense}


def _check(got, ref, dtype):
    assert_matches_cpu(got, ref, dtype, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["none", "index", "dense"])
def test_host_inputs_match_cpu(rng, dtype, kind):
    s, t, labels = _inputs(rng, dtype)
    s0, t0 = s.copy(), t.copy()
    loss, grad = kd_loss(s, t, labels[kind], temperature=2.5, alpha=0.4, device="cuda")
    ref = kd_loss(s, t, labels[kind], temperature=2.5, alpha=0.4, device="cpu")
    assert isinstance(grad, np.ndarray) and isinstance(loss, float)
    _check((loss, grad), ref, dtype)
    np.testing.assert_array_equal(s, s0)
    np.testing.assert_array_equal(t, t0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_numba_device_arrays_stay_on_device(rng, dtype):
    s, t, labels = _inputs(rng, dtype)
    ds, dt, dy = device(s), device(t), device(labels["index"])
    loss, grad = kd_loss(ds, dt, dy, temperature=4.0, alpha=0.25, device="cuda")
    assert not isinstance(grad, np.ndarray) and hasattr(grad, "copy_to_host")
    ref = kd_loss(s, t, labels["index"], temperature=4.0, alpha=0.25, device="cpu")
    _check((loss, grad), ref, dtype)
    np.testing.assert_array_equal(to_host(ds), s)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_array_interface_objects_are_read_in_place(rng, dtype):
    s, t, labels = _inputs(rng, dtype)
    fs, ft, fy = foreign(s), foreign(t), foreign(labels["dense"])
    # "auto" sees __cuda_array_interface__ and runs on the GPU.
    loss, grad = kd_loss(fs, ft, fy, temperature=1.5, alpha=0.6)
    assert not isinstance(grad, np.ndarray)
    ref = kd_loss(s, t, labels["dense"], temperature=1.5, alpha=0.6, device="cpu")
    _check((loss, grad), ref, dtype)
    np.testing.assert_array_equal(to_host(fs), s)
    np.testing.assert_array_equal(to_host(ft), t)


def test_numba_device_arrays_select_cuda_under_auto(rng):
    s, t, _ = _inputs(rng, np.float64, n_rows=2, n_cols=9)
    ds, dt = device(s), device(t)
    loss, grad = kd_loss(ds, dt)
    assert not isinstance(grad, np.ndarray)
    _check((loss, grad), kd_loss(s, t, device="cpu"), np.float64)


def test_teacher_of_other_dtype_and_strided_layout_are_converted_on_device(rng):
    s, t, labels = _inputs(rng, np.float32, n_rows=2, n_cols=40)
    t64 = t.astype(np.float64)
    fs = foreign(s)
    ft = foreign(t64, order="F")  # float64, not C-contiguous
    fy = foreign(labels["index"].astype(np.int32))
    loss, grad = kd_loss(fs, ft, fy, device="cuda")
    ref = kd_loss(s, t64, labels["index"], device="cpu")
    _check((loss, grad), ref, np.float32)
    np.testing.assert_array_equal(to_host(ft), t64)


def test_mixed_host_and_device_inputs(rng):
    s, t, labels = _inputs(rng, np.float64, n_rows=2, n_cols=33)
    # GPU student, host teacher and labels: the gradient follows the student.
    loss, grad = kd_loss(foreign(s), t, labels["index"], device="auto")
    assert not isinstance(grad, np.ndarray)
    _check((loss, grad), kd_loss(s, t, labels["index"], device="cpu"), np.float64)
    # Host student, GPU teacher: a host gradient.
    loss, grad = kd_loss(s, foreign(t), device="auto")
    assert isinstance(grad, np.ndarray)
    _check((loss, grad), kd_loss(s, t, device="cpu"), np.float64)


@pytest.mark.parametrize("n_cols", [1, 5, 32, 129])
def test_row_lengths_around_the_block_size(rng, n_cols):
    # 1 and 5: most threads own no column; 129: uneven strides.
    s, t, labels = _inputs(rng, np.float64, n_rows=2, n_cols=n_cols)
    got = kd_loss(s, t, labels["index"], alpha=0.5, device="cuda")
    _check(got, kd_loss(s, t, labels["index"], alpha=0.5, device="cpu"), np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_offsets_and_magnitudes_are_stable(rng, dtype):
    s, t, labels = _inputs(rng, dtype, n_rows=2, n_cols=20, scale=30.0)
    s = s + dtype(1e4)
    t = t - dtype(2e4)
    loss, grad = kd_loss(s, t, labels["index"], device="cuda")
    ref = kd_loss(s, t, labels["index"], device="cpu")
    assert np.isfinite(loss) and np.isfinite(grad).all()
    tol = dict(rtol=1e-3, atol=1e-4) if dtype == np.float32 else TOL[dtype]
    np.testing.assert_allclose(grad, ref[1], **tol)
    assert loss == pytest.approx(ref[0], rel=tol["rtol"], abs=tol["atol"])


def test_results_are_deterministic(rng):
    s, t, labels = _inputs(rng, np.float32, n_rows=2, n_cols=100)
    a = kd_loss(s, t, labels["dense"], device="cuda")
    b = kd_loss(s, t, labels["dense"], device="cuda")
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])


def test_out_buffers(rng):
    s, t, _ = _inputs(rng, np.float64, n_rows=2, n_cols=12)
    ref_loss, ref_grad = kd_loss(s, t, device="cpu")
    # Host student: a NumPy out receives the gradient.
    host_out = np.full_like(s, np.nan)
    loss, grad = kd_loss(s, t, device="cuda", out=host_out)
    assert grad is host_out
    np.testing.assert_allclose(host_out, ref_grad, **TOL[np.float64])
    # GPU student: a GPU out is written in place and returned as given.
    dev_out = foreign(np.zeros_like(s))
    loss, grad = kd_loss(foreign(s), foreign(t), out=dev_out)
    assert grad is dev_out
    np.testing.assert_allclose(to_host(dev_out), ref_grad, **TOL[np.float64])


def test_out_buffer_errors(rng):
    s, t, _ = _inputs(rng, np.float64, n_rows=2, n_cols=12)
    ds, dt = device(s), device(t)
    with pytest.raises(TypeError, match="out must be a GPU array"):
        kd_loss(ds, dt, device="cuda", out=np.empty_like(s))
    with pytest.raises(ValueError, match="out must be a C-contiguous float64 array"):
        kd_loss(ds, dt, device="cuda", out=device(np.zeros((2, 11))))
    with pytest.raises(ValueError, match="out must be a C-contiguous float32"):
        kd_loss(ds.copy_to_host().astype(np.float32), t, device="cuda", out=s.copy())
    with pytest.raises(ValueError, match="must not share memory"):
        kd_loss(ds, dt, device="cuda", out=ds)
    with pytest.raises(ValueError, match="must not share memory"):
        kd_loss(s, t, device="cuda", out=s)
    with pytest.raises(TypeError, match="out must be a NumPy array"):
        kd_loss(s, t, device="cuda", out=device(np.zeros_like(s)))


def test_strategy_runs_on_device(rng):
    s, t, labels = _inputs(rng, np.float64, n_rows=2, n_cols=10)
    strategy = DistillationLoss(temperature=2.0, alpha=0.5, device="cuda")
    loss, grad = strategy.loss_and_gradient(s, t, labels["index"])
    ref = DistillationLoss(temperature=2.0, alpha=0.5, device="cpu").loss_and_gradient(
        s, t, labels["index"])
    _check((loss, grad), ref, np.float64)


# --- validation ----------------------------------------------------------------------

def _cpu_and_cuda_errors(exc, match, make_args, **kw):
    """The CUDA path (device arrays) raises what the CPU path (host arrays) raises."""
    host_args, dev_args = make_args()
    with pytest.raises(exc, match=match):
        kd_loss(*host_args, device="cpu", **kw)
    with pytest.raises(exc, match=match):
        kd_loss(*dev_args, device="cuda", **kw)


def test_dtype_and_shape_errors_match_cpu(rng):
    s = rng.standard_normal((2, 6))
    t = rng.standard_normal((2, 6))
    cases = [
        (TypeError, "student_logits must be a float32 or float64 array, got dtype int32",
         (s.astype(np.int32), t)),
        (TypeError, "teacher_logits must be a float32 or float64 array, got dtype float16",
         (s, t.astype(np.float16))),
        (ValueError, r"student_logits must be 2-D, got shape \(12,\)", (s.ravel(), t)),
        (ValueError, "student_logits is empty", (s[:0], t[:0])),
        (ValueError, "batch size mismatch: student_logits has 2 rows", (s, t[:1])),
        (ValueError, "shape mismatch", (s, t[:, :5])),
    ]
    for exc, match, (a, b) in cases:
        _cpu_and_cuda_errors(exc, match, lambda: ((a, b), (foreign(a), foreign(b))))


def test_label_errors_match_cpu(rng):
    s = rng.standard_normal((3, 6))
    t = rng.standard_normal((3, 6))
    dense = np.full((3, 6), 1 / 6)
    bad_sum = dense.copy()
    bad_sum[1, 0] += 0.5
    negative = dense.copy()
    negative[2, :2] = [-0.1, 0.1 + 1 / 6]
    nan_dense = dense.copy()
    nan_dense[0, 3] = np.nan
    cases = [
        (ValueError, r"labels must be class indices in \[0, 6\), found 6", np.array([0, 6, 1])),
        (ValueError, r"labels must be class indices in \[0, 6\), found -1", np.array([0, 1, -1])),
        (ValueError, "integer labels must be 1-D", np.zeros((3, 1), dtype=np.int64)),
        (ValueError, "batch size mismatch: labels has 2 entries", np.array([0, 1])),
        (ValueError, "row 1 sums to 1.5", bad_sum),
        (ValueError, "found a negative entry", negative),
        (ValueError, "labels contains NaN", nan_dense),
        (ValueError, r"float labels must be one-hot or soft targets of shape \(3, 6\)",
         dense[:, :5]),
        (TypeError, "labels must be None, integer class indices", np.ones(3, dtype=bool)),
    ]
    for exc, match, y in cases:
        _cpu_and_cuda_errors(exc, match,
                             lambda: ((s, t, y), (device(s), device(t), foreign(y))))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # simulator: NumPy scalar NaN/inf
@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_are_named(rng, where, bad):
    s = rng.standard_normal((2, 7))
    t = rng.standard_normal((2, 7))
    (s if where == "student" else t)[1, 3] = bad
    name = f"{where}_logits contains NaN or inf"
    _cpu_and_cuda_errors(ValueError, name,
                         lambda: ((s, t), (device(s), device(t))))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_overflow_with_finite_inputs_is_explained():
    s = np.array([[3e38, -3e38, 0.0]], dtype=np.float32)
    t = np.zeros((1, 3), dtype=np.float32)
    _cpu_and_cuda_errors(ValueError, "overflowed although every input is finite",
                         lambda: ((s, t), (device(s), device(t))))


def test_bad_hyperparameters_and_device_name():
    s = np.zeros((1, 3))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kd_loss(foreign(s), foreign(s), temperature=0.0)
    with pytest.raises(ValueError, match="alpha must be in"):
        kd_loss(foreign(s), foreign(s), alpha=1.5)
    with pytest.raises(ValueError, match="device must be one of"):
        kd_loss(s, s, device="gpu")


def test_cpu_device_rejects_gpu_arrays():
    s = np.zeros((1, 3))
    with pytest.raises(TypeError, match="pass device='cuda'"):
        kd_loss(CudaArrayLike(s), s, device="cpu")
