"""Correctness of relational KD: ``rkd_loss`` and ``RelationalDistillationStrategy``.

The kernel works on Gram matrices only; it is checked against the NumPy
port of RepDistiller's ``RKDLoss`` (which materialises ``B x B x D``
differences and ``B^3`` angles, gradient back-propagated by hand), against
autograd of RepDistiller's exact code where PyTorch is installed, and
against central finite differences. Tolerances: float64 ``rtol = 1e-10``;
float32 ``rtol = 1e-5`` against the float64 reference on the same
float32-rounded inputs (the kernel computes in float64 and rounds the
gradient once).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from testkit import assert_loss_grad_close, central_difference

import kdnumba
from kdnumba import reference
from kdnumba.functional import kd_loss, rkd_loss
from kdnumba.strategies import RelationalDistillationStrategy

F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)
DTYPES = [F32, F64]
RTOL = {F32: 1e-5, F64: 1e-10}


def assert_matches(loss, grad, ref_loss, ref_grad, dtype):
    # B = 2 gives exactly 0 in exact arithmetic: rounding leaves ~1e-31
    assert_loss_grad_close(loss, grad, ref_loss, ref_grad, RTOL[np.dtype(dtype)],
                           loss_atol=1e-14, grad_floor=1e-12)


def torch_rkd(s, t, w_d=25.0, w_a=50.0):
    """RepDistiller ``RKDLoss.forward`` (``reference.relational.rkd_loss_torch``),
    autograd on the student."""
    torch = pytest.importorskip("torch")
    from kdnumba.reference.relational import rkd_loss_torch

    f_s = torch.tensor(s, requires_grad=True)
    loss = rkd_loss_torch(f_s, torch.tensor(t), distance_weight=w_d, angle_weight=w_a)
    loss.backward()
    return loss.item(), f_s.grad.numpy()


# The contract suite (tests/test_contract.py) checks the registry's inputs; these add
# B = 2, a 3-D student, and 21 rows: three kernel tasks, the last one partial.
SHAPES = [((2, 3), (2, 3)), ((3, 4), (3, 7)), ((5, 2, 3), (5, 4)), ((21, 5), (21, 3))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s_shape, t_shape", SHAPES)
def test_rkd_matches_reference(rng, dtype, s_shape, t_shape):
    s = rng.standard_normal(s_shape).astype(dtype)
    t = (2 * rng.standard_normal(t_shape)).astype(dtype)
    loss, grad = rkd_loss(s, t)
    assert grad.dtype == dtype and grad.shape == s_shape
    assert_matches(loss, grad, *reference.rkd_loss(s.astype(F64), t.astype(F64)), dtype)


@pytest.mark.parametrize("s_shape, t_shape", SHAPES)
def test_rkd_matches_repdistiller_torch(rng, s_shape, t_shape):
    s = rng.standard_normal(s_shape)
    t = 3 * rng.standard_normal(t_shape) + 1
    ref_loss, ref_grad = torch_rkd(s, t)
    loss, grad = rkd_loss(s, t)
    assert_matches(loss, grad, ref_loss, ref_grad, F64)


def test_rkd_gradient_is_exact_per_row(rng):
    # AiDotNet adds one batch-averaged gradient to every row; the exact one differs per row.
    s, t = rng.standard_normal((2, 6, 3))
    _, grad = rkd_loss(s, t)
    assert np.abs(grad - grad.mean(axis=0)).max() > 0.1 * np.abs(grad).max()
    # translation invariance: the rows' gradients sum to zero
    np.testing.assert_allclose(grad.sum(axis=0), 0, atol=1e-12 * np.abs(grad).max() * 6)


def test_rkd_is_translation_and_scale_invariant(rng):
    s, t = rng.standard_normal((2, 7, 4))
    loss, _ = rkd_loss(s, t)
    assert rkd_loss(s + 1e3, t)[0] == pytest.approx(loss, rel=1e-9)
    assert rkd_loss(5 * s, t - 2)[0] == pytest.approx(loss, rel=1e-12)


def test_rkd_terms_add_up(rng):
    s, t = rng.standard_normal((2, 6, 3))
    both = rkd_loss(s, t, distance_weight=2.0, angle_weight=3.0)
    dist = rkd_loss(s, t, distance_weight=2.0, angle_weight=0.0)
    angle = rkd_loss(s, t, distance_weight=0.0, angle_weight=3.0)
    assert both[0] == pytest.approx(dist[0] + angle[0], rel=1e-13)
    np.testing.assert_allclose(both[1], dist[1] + angle[1], rtol=1e-12, atol=1e-15)
    zero = rkd_loss(s, t, distance_weight=0.0, angle_weight=0.0)
    assert zero[0] == 0.0 and not zero[1].any()


def test_rkd_coincident_rows_match_reference_without_nan(rng):
    s = rng.standard_normal((6, 4))
    s[3] = s[1]
    t = rng.standard_normal((6, 5))
    t[4] = t[2]
    loss, grad = rkd_loss(s, t)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    assert_matches(loss, grad, *reference.rkd_loss(s, t), F64)
    # the loss value is RepDistiller's (F.normalize(0) = 0 as well)
    assert loss == pytest.approx(torch_rkd(s, t)[0], rel=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rkd_all_coincident_rows_have_zero_gradient(rng, dtype):
    # every distance is clamped (pdist) and every unit difference is 0 (normalize):
    # where the reference clamps, the gradient is zero.
    s = np.tile(rng.standard_normal((1, 3)), (4, 1)).astype(dtype)
    t = rng.standard_normal((4, 3)).astype(dtype)
    loss, grad = rkd_loss(s, t)
    assert np.isfinite(loss) and loss > 0
    assert not grad.any()
    assert loss == pytest.approx(reference.rkd_loss(s.astype(F64), t.astype(F64))[0], rel=1e-6)


def test_rkd_near_coincident_rows_keep_the_float64_accuracy(rng):
    # two rows 1e-7 apart, far from the origin: distances from differences keep them apart
    # (a Gram expansion would lose ~1e-16 * 100^2 / 3e-14 of their squared distance)
    s = rng.standard_normal((5, 3)) + 100.0
    s[4] = s[0] + 1e-7 * rng.standard_normal(3)
    t = rng.standard_normal((5, 3))
    ref_loss, ref_grad = reference.rkd_loss(s - s.mean(axis=0), t)
    loss, grad = rkd_loss(s, t)
    assert loss == pytest.approx(ref_loss, rel=1e-8)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-6 * np.abs(ref_grad).max())


def test_rkd_single_row_is_zero():
    loss, grad = rkd_loss(np.ones((1, 4)), np.zeros((1, 2)))
    assert loss == 0.0 and grad.shape == (1, 4) and not grad.any()


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 12), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**32 - 1),
       st.floats(1e-3, 1e3))
def test_rkd_property_matches_reference(n_rows, d_s, d_t, seed, scale):
    rng = np.random.default_rng(seed)
    s = scale * rng.standard_normal((n_rows, d_s))
    t = rng.standard_normal((n_rows, d_t))
    assert_matches(*rkd_loss(s, t), *reference.rkd_loss(s, t), F64)


# --- strategy ----------------------------------------------------------------------

def test_strategy_intermediate_and_output(rng):
    s_emb, t_emb = rng.standard_normal((6, 4)), rng.standard_normal((6, 9))
    strategy = RelationalDistillationStrategy("emb", relational_weight=0.4, distance_weight=1.0,
                                              angle_weight=2.0, temperature=2.0)
    loss, grads = strategy.intermediate_loss_and_gradient({"emb": s_emb}, {"emb": t_emb})
    ref_loss, ref_grad = rkd_loss(s_emb, t_emb, distance_weight=1.0, angle_weight=2.0)
    assert loss == pytest.approx(0.4 * ref_loss, rel=1e-14)
    np.testing.assert_allclose(grads["emb"], 0.4 * ref_grad, rtol=1e-14)

    s, t = rng.standard_normal((2, 6, 5))
    out_loss, out_grad = strategy.loss_and_gradient(s, t)
    kd = kd_loss(s, t, temperature=2.0)
    assert out_loss == pytest.approx(0.6 * kd[0], rel=1e-14)
    np.testing.assert_allclose(out_grad, 0.6 * kd[1], rtol=1e-14)


def test_strategy_defaults_and_errors(rng):
    strategy = RelationalDistillationStrategy()
    assert strategy.layers == {"embeddings": "embeddings"}
    assert strategy.distance_weight == 25 and strategy.angle_weight == 50
    assert strategy.relational_weight == 0.5
    with pytest.raises(ValueError, match=r"'embeddings' is missing from student_acts.*'pooled'"):
        strategy.intermediate_loss_and_gradient({"pooled": np.ones((2, 2))}, {})
    with pytest.raises(ValueError, match=r"layer 'embeddings'.*batch size mismatch"):
        strategy.intermediate_loss_and_gradient({"embeddings": np.ones((2, 2))},
                                                {"embeddings": np.ones((3, 2))})
    with pytest.raises(ValueError, match="angle_weight"):
        RelationalDistillationStrategy(angle_weight=-1)
    with pytest.raises(ValueError, match="relational_weight"):
        RelationalDistillationStrategy(relational_weight=1.1)
    assert kdnumba.RelationalDistillationStrategy is RelationalDistillationStrategy
    assert "angle_weight=50.0" in repr(strategy)


def test_benchmark_cases_are_well_formed():
    from kdnumba.benchmarking import all_cases

    cases = all_cases(("relational",))
    assert len({c.name for c in cases}) == len(cases)
    assert "rkd_loss/B512_D128/float32" in {c.name for c in cases if c.quick}
    # the large case has no reference column (it would need 32 GiB)
    (large,) = [c for c in cases if c.name == "rkd_loss/B2048_D128/float32"]
    assert large.numpy is None and large.torch is None
    # the small relational case: kdnumba agrees with the NumPy reference on its inputs
    (small,) = [c for c in cases if c.name == "rkd_loss/B128_D64/float64"]
    inputs = small.make_inputs(np.random.default_rng(0))
    assert_matches(*small.kdnumba(inputs), *small.numpy(inputs), F64)


def test_rkd_overflow_is_reported():
    s = np.array([[1e200, 0.0], [0.0, 1e200], [1.0, 1.0]])
    with pytest.raises(ValueError, match="overflowed although every input is finite"):
        rkd_loss(s, np.eye(3))
