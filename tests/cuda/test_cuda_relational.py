"""Relational KD (``rkd_loss``) on the CUDA path against the CPU kernels."""

from __future__ import annotations

import numpy as np
import pytest
from cuda_support import device, foreign, to_host

from kdnumba.functional import rkd_loss

DTYPES = [np.float32, np.float64]
# Both paths compute in float64 in the same order; float32 differs only by the
# final rounding of the gradient (and the deterministic tree sums of the partials).
TOL = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-10, atol=1e-13)}


def _check(got, ref, dtype, shape):
    loss, grad = got
    assert isinstance(loss, float)
    tol = TOL[dtype]
    assert loss == pytest.approx(ref[0], rel=tol["rtol"], abs=tol["atol"])
    grad = to_host(grad)
    assert grad.dtype == np.dtype(dtype) and grad.shape == shape == ref[1].shape
    assert np.abs(grad).max() > 0  # a real gradient, not a zero buffer
    np.testing.assert_allclose(grad, ref[1], rtol=tol["rtol"],
                               atol=tol["atol"] * max(1.0, np.abs(ref[1]).max()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rkd_matches_cpu_with_coincident_rows(rng, dtype):
    # B = 5 (one and a bit simulator blocks for the pair kernels), unequal widths,
    # rows 1 and 3 coincident in the student, rows 0 and 2 in the teacher.
    s = rng.standard_normal((5, 2, 2)).astype(dtype)
    t = rng.standard_normal((5, 3)).astype(dtype)
    s[3] = s[1]
    t[2] = t[0]
    kw = dict(distance_weight=25.0, angle_weight=50.0)
    ref = rkd_loss(s, t, device="cpu", **kw)
    got = rkd_loss(device(s), device(t), device="cuda", **kw)
    assert not isinstance(got[1], np.ndarray)  # device student: device gradient
    _check(got, ref, dtype, s.shape)


def test_rkd_host_input_single_terms_and_out(rng):
    s = rng.standard_normal((4, 3))
    t = rng.standard_normal((4, 2)).astype(np.float32)  # cast to the student's dtype
    for kw in [dict(distance_weight=1.0, angle_weight=0.0),
               dict(distance_weight=0.0, angle_weight=2.0)]:
        got = rkd_loss(s, t, device="cuda", **kw)
        assert isinstance(got[1], np.ndarray)  # host student: NumPy gradient
        _check(got, rkd_loss(s, t, device="cpu", **kw), np.float64, s.shape)
    out = np.full_like(s, np.nan)
    loss, grad = rkd_loss(s, t, device="cuda", out=out)
    assert grad is out
    _check((loss, out), rkd_loss(s, t, device="cpu"), np.float64, s.shape)
    dev_out = device(np.zeros_like(s))
    loss, grad = rkd_loss(device(s), t, device="cuda", out=dev_out)
    assert grad is dev_out
    _check((loss, grad), rkd_loss(s, t, device="cpu"), np.float64, s.shape)


def test_rkd_foreign_device_arrays_and_routing(rng):
    s = rng.standard_normal((4, 3)).astype(np.float32)
    t = rng.standard_normal((4, 3))
    ref = rkd_loss(s, t, device="cpu")
    # device="auto" with GPU inputs (a Fortran-ordered float64 teacher) runs on the GPU.
    got = rkd_loss(foreign(s), foreign(t, order="F"))
    assert not isinstance(got[1], np.ndarray)
    _check(got, ref, np.float32, s.shape)
    # Deterministic: the same bits again.
    again = rkd_loss(foreign(s), foreign(t, order="F"), device="cuda")
    assert again[0] == got[0]
    np.testing.assert_array_equal(to_host(again[1]), to_host(got[1]))
    s_before = s.copy()
    rkd_loss(s, t, device="cuda")
    np.testing.assert_array_equal(s, s_before)  # caller's array untouched


def test_rkd_single_row_is_zero():
    s = np.array([[1.0, 2.0]])
    loss, grad = rkd_loss(device(s), device(s), device="cuda")
    assert loss == 0.0
    np.testing.assert_array_equal(to_host(grad), np.zeros_like(s))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_rkd_errors_match_cpu(rng):
    s = rng.standard_normal((3, 4))
    bad = s.copy()
    bad[2, 1] = np.nan
    huge = np.array([[1e200, 0.0], [-1e200, 0.0]])
    cases = [((s, s[:2]), {}, ValueError, "batch size mismatch"),
             ((s, bad), {}, ValueError, "teacher_emb contains NaN or inf"),
             ((bad, s), {}, ValueError, "student_emb contains NaN or inf"),
             ((huge, huge), {}, ValueError, "overflowed"),
             ((s.astype(bool), s), {}, TypeError, "float32 or float64"),
             ((s, s), dict(angle_weight=-1.0), ValueError, "angle_weight")]
    for (a, b), kw, exc, match in cases:
        with pytest.raises(exc, match=match) as cpu:
            rkd_loss(a, b, device="cpu", **kw)
        with pytest.raises(exc, match=match) as gpu:
            rkd_loss(device(a), device(b), device="cuda", **kw)
        assert str(gpu.value) == str(cpu.value)
