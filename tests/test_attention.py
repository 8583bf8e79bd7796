"""Correctness of attention distillation: ``attention_transfer``, ``attention_map_loss``
and ``AttentionDistillationStrategy``.

Checked against the NumPy reference (float64, same dtype-rounded inputs),
central finite differences in float64, and -- where PyTorch is installed --
autograd of RepDistiller's ``AT.py`` formula (``F.normalize``,
``F.adaptive_avg_pool2d``) and of ``F.kl_div``. Tolerances: float64
``rtol = 1e-10``; float32 ``rtol = 1e-4`` (float32 channel sums over blocks).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from testkit import (
    assert_loss_grad_close,
    assert_same_loss_and_grad,
    central_difference,
    one_and_two_threads,
    softmax,
)

import kdnumba
from kdnumba import reference
from kdnumba.functional import attention_map_loss, attention_transfer, feature_loss, kd_loss
from kdnumba.strategies import AttentionDistillationStrategy, AttentionMode

F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)
DTYPES = [F32, F64]
RTOL = {F32: 1e-4, F64: 1e-10}


def assert_matches(loss, grad, ref_loss, ref_grad, dtype):
    assert_loss_grad_close(loss, grad, ref_loss, ref_grad, RTOL[np.dtype(dtype)])


# --- attention transfer -------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["repdistiller", "paper"])
@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("s_shape, t_shape", [
    ((3, 4, 5, 6), (3, 6, 5, 6)),      # channel counts differ
    ((2, 70, 3), (2, 2, 3)),           # 1-D spatial; > one 64-channel block
    ((2, 3, 2, 3, 2), (2, 3, 2, 3, 2)),  # 3-D spatial
    ((1, 1, 1), (1, 1, 1)),            # one position: a = 1, loss 0
])
def test_at_matches_reference(rng, dtype, variant, p, s_shape, t_shape):
    s = rng.standard_normal(s_shape).astype(dtype)
    t = rng.standard_normal(t_shape).astype(dtype)
    loss, grad = attention_transfer(s, t, p=p, variant=variant)
    ref_loss, ref_grad = reference.attention_transfer(s.astype(F64), t.astype(F64), p=p,
                                                      variant=variant)
    assert grad.dtype == dtype and grad.shape == s_shape
    assert_matches(loss, grad, ref_loss, ref_grad, dtype)


@pytest.mark.parametrize("variant", ["repdistiller", "paper"])
@pytest.mark.parametrize("p", [1, 2, 3])
def test_at_gradient_is_the_derivative(rng, variant, p):
    s = rng.standard_normal((2, 3, 2, 3))
    t = rng.standard_normal((2, 2, 2, 3))
    _, grad = attention_transfer(s, t, p=p, variant=variant)
    numeric = central_difference(lambda x: attention_transfer(x, t, p=p, variant=variant)[0],
                                 s.copy())
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


def _torch_at(s, t, p=2):
    """RepDistiller ``Attention.at_loss`` with autograd through the student."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    f_s = torch.tensor(s, requires_grad=True)
    f_t = torch.tensor(t)

    def at(f):
        return F.normalize(f.pow(p).mean(1).view(f.size(0), -1))

    x_s, x_t = f_s, f_t
    s_h, t_h = x_s.shape[2], x_t.shape[2]
    if s_h > t_h:
        x_s = F.adaptive_avg_pool2d(x_s, (t_h, t_h))
    elif s_h < t_h:
        x_t = F.adaptive_avg_pool2d(x_t, (s_h, s_h))
    loss = (at(x_s) - at(x_t)).pow(2).mean()
    loss.backward()
    return loss.item(), f_s.grad.numpy()


@pytest.mark.parametrize("s_hw, t_hw", [(4, 4), (8, 4), (2, 6)])
def test_at_matches_repdistiller_torch(rng, s_hw, t_hw):
    s = rng.standard_normal((3, 4, s_hw, s_hw))
    t = rng.standard_normal((3, 5, t_hw, t_hw))
    ref_loss, ref_grad = _torch_at(s, t)
    loss, grad = attention_transfer(s, t, pool=s_hw != t_hw)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-10, atol=1e-18)


def test_at_zero_student_matches_torch_clamp(rng):
    s = np.zeros((2, 3, 4, 4))
    t = rng.standard_normal((2, 3, 4, 4))
    ref_loss, ref_grad = _torch_at(s, t)
    loss, grad = attention_transfer(s, t)
    assert np.isfinite(loss) and loss == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_array_equal(grad, ref_grad)  # 0: d(f^2)/df = 0 at f = 0


def test_at_pool_is_block_average(rng):
    s = rng.standard_normal((2, 3, 6, 4))
    t = rng.standard_normal((2, 2, 3, 2))
    pooled = s.reshape(2, 3, 3, 2, 2, 2).mean(axis=(3, 5))
    loss, grad = attention_transfer(s, t, pool=True)
    ref_loss, ref_grad = attention_transfer(pooled, t)
    assert loss == pytest.approx(ref_loss, rel=1e-14)
    np.testing.assert_allclose(grad, np.repeat(np.repeat(ref_grad, 2, 2), 2, 3) / 4, rtol=1e-14)
    ref = reference.attention_transfer(s, t, pool=True)
    assert_matches(loss, grad, *ref, F64)


def test_at_paper_variant_is_scale_invariant_norm(rng):
    s = rng.standard_normal((3, 4, 5))
    t = rng.standard_normal((3, 2, 5))
    loss, _ = attention_transfer(s, t, variant="paper")
    a = lambda f: (f ** 2).sum(1) / np.linalg.norm((f ** 2).sum(1), axis=1, keepdims=True)
    assert loss == pytest.approx(np.linalg.norm(a(s) - a(t), axis=1).mean(), rel=1e-12)
    # equal maps: ||d|| = 0, where the gradient is defined as 0
    loss, grad = attention_transfer(s, 3 * s, variant="paper")
    assert loss == pytest.approx(0.0, abs=1e-15) and np.isfinite(grad).all()


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5), st.integers(1, 3),
       st.integers(0, 2**32 - 1))
def test_at_property_matches_reference(batch, c_s, c_t, size, seed):
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((batch, c_s, size, size + 1))
    t = rng.standard_normal((batch, c_t, size, size + 1))
    assert_matches(*attention_transfer(s, t), *reference.attention_transfer(s, t), F64)


def test_at_overflow_is_reported():
    s = np.full((1, 2, 2, 2), 1e30, np.float32)
    with pytest.raises(ValueError, match="overflowed although every input is finite"):
        attention_transfer(s, np.ones((1, 2, 2, 2), np.float32))


def test_at_pool_error_names_the_axis():
    # (the other bad inputs are the registry's, checked by tests/test_contract.py)
    with pytest.raises(ValueError, match="axis 3 has 4 .*and 3"):
        attention_transfer(np.ones((2, 3, 4, 4)), np.ones((2, 3, 2, 3)), pool=True)


# --- attention maps ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_map_mse_is_feature_loss(rng, dtype):
    s = softmax(rng.standard_normal((2, 3, 4, 4))).astype(dtype)
    t = softmax(rng.standard_normal((2, 3, 4, 4))).astype(dtype)
    loss, grad = attention_map_loss(s, t, kind="mse")
    ref = feature_loss(s, t)
    assert loss == ref[0]
    np.testing.assert_array_equal(grad, ref[1])
    assert_matches(loss, grad, *reference.attention_map_loss(s.astype(F64), t.astype(F64)), dtype)


def test_map_kl_matches_torch(rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    s = rng.standard_normal((2, 4, 6, 6))
    t = rng.standard_normal((2, 4, 6, 6))
    s_t = torch.tensor(s, requires_grad=True)
    ref = F.kl_div(F.log_softmax(s_t, -1), F.log_softmax(torch.tensor(t), -1),
                   log_target=True, reduction="sum") / (2 * 4 * 6)
    ref.backward()
    loss, grad = attention_map_loss(s, t, kind="kl", inputs="logits")
    assert loss == pytest.approx(ref.item(), rel=1e-12)
    np.testing.assert_allclose(grad, s_t.grad.numpy(), rtol=1e-10, atol=1e-17)
    p_s, p_t = softmax(s), softmax(t)
    assert attention_map_loss(p_s, p_t, kind="kl")[0] == pytest.approx(ref.item(), rel=1e-10)


def test_map_kl_probs_zero_entries():
    # masked key (0 in both): no cost, no gradient; student 0 where teacher has
    # mass: clamped at 1e-12, large finite loss, zero gradient there.
    t = np.array([[0.5, 0.5, 0.0], [0.2, 0.8, 0.0]])
    s = np.array([[0.25, 0.75, 0.0], [0.0, 1.0, 0.0]])
    loss, grad = attention_map_loss(s, t, kind="kl")
    expected = (0.5 * np.log(2) + 0.5 * np.log(0.5 / 0.75)
                + 0.2 * np.log(0.2 / 1e-12) + 0.8 * np.log(0.8)) / 2
    assert loss == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(grad, [[-1.0, -1 / 3, 0.0], [0.0, -0.4, 0.0]], rtol=1e-14)
    assert loss == pytest.approx(reference.attention_map_loss(s, t, kind="kl")[0], rel=1e-12)


def test_map_kl_deterministic_across_thread_counts(rng):
    s = softmax(rng.standard_normal((3, 4, 20, 20))).astype(np.float32)
    t = softmax(rng.standard_normal((3, 4, 20, 20))).astype(np.float32)
    assert_same_loss_and_grad(*one_and_two_threads(lambda: attention_map_loss(s, t, kind="kl")))


@pytest.mark.parametrize("s, t, kwargs, match", [
    # which row is at fault (the registry's bad inputs check the messages' first part)
    (np.array([[1 / 3] * 3, [0.5, 0.6, -0.1]]), np.full((2, 3), 1 / 3), dict(kind="kl"),
     r"student_attn must hold probabilities.*negative entry in row \(1,\)"),
    (np.full((2, 3), 0.3), np.full((2, 3), 1 / 3), dict(kind="kl"),
     r"student_attn rows must be probability vectors.*row \(0,\) sums to 0.9"),
    (np.full((2, 3), 1 / 3), np.array([[1 / 3] * 3, [0.5] * 3]), dict(kind="kl"),
     r"teacher_attn rows.*row \(1,\) sums to 1.5"),
    (np.full((1, 3), 1 / 3), np.array([[np.inf, 0.5, 0.5]]), dict(kind="kl", inputs="logits"),
     "teacher_attn contains NaN"),
])
def test_map_rejects_bad_input(s, t, kwargs, match):
    with pytest.raises(ValueError, match=match):
        attention_map_loss(s, t, **kwargs)


@pytest.mark.parametrize("kind, inputs", [("mse", "probs"), ("kl", "probs"), ("kl", "logits")])
def test_map_out_receives_the_gradient(rng, kind, inputs):
    # the contract suite checks out= on the default kind only
    s = softmax(rng.standard_normal((2, 2, 3, 4)))
    t = softmax(rng.standard_normal((2, 2, 3, 4)))
    loss, grad = attention_map_loss(s, t, kind=kind, inputs=inputs)
    out = np.full_like(s, np.nan)
    assert attention_map_loss(s, t, kind=kind, inputs=inputs, out=out) == (loss, out)
    np.testing.assert_array_equal(out, grad)


def test_at_pooled_out_receives_the_gradient(rng):
    s = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    t = rng.standard_normal((2, 5, 2, 2)).astype(np.float32)
    loss, grad = attention_transfer(s, t, pool=True)
    out = np.full_like(s, np.nan)
    assert attention_transfer(s, t, pool=True, out=out) == (loss, out)
    np.testing.assert_array_equal(out, grad)


# --- strategy ----------------------------------------------------------------------

@pytest.mark.parametrize("mode", list(AttentionMode))
def test_strategy_modes(rng, mode):
    if mode is AttentionMode.TRANSFER:
        s = {"l1": rng.standard_normal((2, 3, 4, 4)), "l2": rng.standard_normal((2, 2, 4, 4))}
        t = {"l1": rng.standard_normal((2, 5, 4, 4)), "l2": rng.standard_normal((2, 2, 4, 4))}
        fn = attention_transfer
    else:
        s = {k: softmax(rng.standard_normal((2, 2, 3, 3))) for k in ("l1", "l2")}
        t = {k: softmax(rng.standard_normal((2, 2, 3, 3))) for k in ("l1", "l2")}
        fn = lambda a, b: attention_map_loss(a, b, kind=mode.value)  # noqa: E731
    strategy = AttentionDistillationStrategy(["l1", "l2"], attention_weight=0.6, mode=mode.value)
    assert strategy.mode is mode
    loss, grads = strategy.intermediate_loss_and_gradient(s, t)
    (l1, g1), (l2, g2) = fn(s["l1"], t["l1"]), fn(s["l2"], t["l2"])
    assert loss == pytest.approx(0.6 * (l1 + l2) / 2, rel=1e-14)
    np.testing.assert_allclose(grads["l1"], 0.3 * g1, rtol=1e-14)
    np.testing.assert_allclose(grads["l2"], 0.3 * g2, rtol=1e-14)


def test_strategy_forwards_transfer_options(rng):
    s, t = rng.standard_normal((2, 3, 4, 4)), rng.standard_normal((2, 3, 2, 2))
    strategy = AttentionDistillationStrategy({"s": "t"}, attention_weight=1.0, mode="transfer",
                                             p=3, variant="paper", pool=True)
    loss, grads = strategy.intermediate_loss_and_gradient({"s": s}, {"t": t})
    ref = attention_transfer(s, t, p=3, variant="paper", pool=True)
    assert loss == ref[0]
    np.testing.assert_array_equal(grads["s"], ref[1])
    with pytest.raises(ValueError, match=r"layer 's' -> 't': spatial size mismatch"):
        AttentionDistillationStrategy({"s": "t"}, mode="transfer").intermediate_loss_and_gradient(
            {"s": s}, {"t": t})


def test_strategy_kl_logits(rng):
    s, t = rng.standard_normal((2, 2, 2, 3, 3))
    strategy = AttentionDistillationStrategy("a", attention_weight=1.0, mode=AttentionMode.KL,
                                             inputs="logits")
    loss, _ = strategy.intermediate_loss_and_gradient({"a": s}, {"a": t})
    assert loss == attention_map_loss(s, t, kind="kl", inputs="logits")[0]


def test_strategy_output_loss(rng):
    s, t = rng.standard_normal((2, 4, 6))
    loss, grad = AttentionDistillationStrategy("a").loss_and_gradient(s, t)
    ref_loss, ref_grad = kd_loss(s, t)
    assert loss == pytest.approx(0.7 * ref_loss, rel=1e-14)
    np.testing.assert_allclose(grad, 0.7 * ref_grad, rtol=1e-14)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(mode="cosine"), ValueError, "mode must be one of"),
    (dict(attention_weight=2), ValueError, "attention_weight"),
    (dict(p=0), ValueError, "p must be"),
    (dict(variant="x"), ValueError, "variant"),
    (dict(pool="yes"), TypeError, "pool"),
    (dict(inputs="scores"), ValueError, "inputs"),
])
def test_strategy_rejects_bad_configuration(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        AttentionDistillationStrategy("a", **kwargs)


def test_strategy_missing_layer(rng):
    strategy = AttentionDistillationStrategy(["a", "b"])
    x = softmax(rng.standard_normal((1, 2, 3, 3)))
    with pytest.raises(ValueError, match=r"'b' is missing from student_acts.*present: 'a'"):
        strategy.intermediate_loss_and_gradient({"a": x}, {"a": x, "b": x})
    skipping = AttentionDistillationStrategy(["a", "b"], missing_layer="skip")
    loss, grads = skipping.intermediate_loss_and_gradient({"a": x}, {"a": x, "b": x})
    assert list(grads) == ["a"]


def test_strategy_is_exported():
    assert kdnumba.AttentionDistillationStrategy is AttentionDistillationStrategy
    assert kdnumba.AttentionMode is AttentionMode
    assert "mode=AttentionMode.MSE" in repr(AttentionDistillationStrategy("a"))
