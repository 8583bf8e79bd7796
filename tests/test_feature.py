"""Correctness of FitNets feature matching: ``feature_loss`` and ``FeatureDistillationStrategy``.

Checked against the NumPy reference (float64 on the same dtype-rounded
inputs), central finite differences in float64, and ``torch.nn.MSELoss``
where PyTorch is installed. Tolerances: float64 ``rtol = 1e-12``; float32
``rtol = 1e-5`` (float32 differences, float64 sums).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from testkit import (
    assert_inputs_untouched,
    assert_loss_grad_close,
    assert_same_loss_and_grad,
    central_difference,
    one_and_two_threads,
)

import kdnumba
from kdnumba import reference
from kdnumba.functional import feature_loss, kd_loss
from kdnumba.kernels.cpu import feature as kern
from kdnumba.strategies import (
    FeatureDistillationStrategy,
    IntermediateActivations,
    IntermediateActivationStrategy,
)

F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)
DTYPES = [F32, F64]
RTOL = {F32: 1e-5, F64: 1e-12}
# (1,): a single number; 40000 elements span three kernel chunks.
SHAPES = [(1,), (3,), (4, 7), (2, 3, 4, 5), (5, 8000)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_feature_loss_matches_reference(rng, dtype, shape):
    s = rng.standard_normal(shape).astype(dtype)
    t = rng.standard_normal(shape).astype(dtype)
    loss, grad = feature_loss(s, t)
    ref_loss, ref_grad = reference.feature_loss(s.astype(F64), t.astype(F64))
    assert grad.dtype == dtype and grad.shape == shape
    assert_loss_grad_close(loss, grad, ref_loss, ref_grad, RTOL[dtype], loss_atol=1e-12,
                           grad_floor=0.0)


def test_feature_loss_gradient_is_the_derivative(rng):
    s = rng.standard_normal((3, 2, 4))
    t = rng.standard_normal((3, 2, 4))
    _, grad = feature_loss(s, t)
    numeric = central_difference(lambda x: feature_loss(x, t)[0], s.copy())
    np.testing.assert_allclose(grad, numeric, rtol=1e-7, atol=1e-9)


def test_feature_loss_matches_torch_mse(rng):
    torch = pytest.importorskip("torch")
    s = rng.standard_normal((4, 3, 5, 5))
    t = rng.standard_normal((4, 3, 5, 5))
    st_ = torch.tensor(s, requires_grad=True)
    ref = torch.nn.MSELoss()(st_, torch.tensor(t))
    ref.backward()
    loss, grad = feature_loss(s, t)
    assert loss == pytest.approx(ref.item(), rel=1e-13)
    np.testing.assert_allclose(grad, st_.grad.numpy(), rtol=1e-12, atol=1e-16)


def test_feature_loss_teacher_is_cast_to_student_dtype(rng):
    s = rng.standard_normal((6, 5)).astype(np.float32)
    t = rng.standard_normal((6, 5))
    loss, grad = feature_loss(s, t)
    ref_loss, _ = feature_loss(s, t.astype(np.float32))
    assert grad.dtype == np.float32 and loss == ref_loss


def test_feature_loss_is_zero_for_equal_inputs(rng):
    s = rng.standard_normal((5, 3))
    loss, grad = feature_loss(s, s.copy())
    assert loss == 0.0 and not grad.any()


def test_feature_loss_large_values_are_finite():
    s = np.full((2, 3), 1e150)
    loss, grad = feature_loss(s, -s)
    assert np.isfinite(loss) and np.isfinite(grad).all()


@settings(max_examples=25, deadline=None)
@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=3, max_side=6),
                  elements=st.floats(-1e3, 1e3)), st.floats(-2, 2))
def test_feature_loss_property_matches_reference(s, shift):
    t = s * 0.5 + shift
    loss, grad = feature_loss(s, t)
    ref_loss, ref_grad = reference.feature_loss(s, t)
    assert loss == pytest.approx(ref_loss, rel=1e-12, abs=1e-300)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-12, atol=1e-300)


def test_feature_loss_deterministic_across_thread_counts(rng):
    s = rng.standard_normal((7, 9000)).astype(np.float32)  # 4 chunks
    t = rng.standard_normal((7, 9000)).astype(np.float32)
    assert kern.n_chunks(s.size) > 2
    assert_same_loss_and_grad(*one_and_two_threads(lambda: feature_loss(s, t)))


def test_feature_loss_does_not_modify_inputs(rng):
    s = rng.standard_normal((4, 6)).astype(np.float32)
    t = rng.standard_normal((4, 6))
    assert_inputs_untouched(lambda: feature_loss(s, t), s, t)


@pytest.mark.parametrize("s, t, exc, match", [
    (np.zeros((2, 3), np.int64), np.zeros((2, 3)), TypeError, "student_feats.*float32 or float64"),
    (np.zeros((2, 3)), np.zeros((2, 3), np.float16), TypeError, "teacher_feats"),
    (np.zeros((2, 3)), np.zeros((2, 3), bool), TypeError, "teacher_feats"),
    (np.zeros((2, 3)), np.zeros((3, 3)), ValueError, "batch size mismatch"),
    (np.zeros((2, 3)), np.zeros((2, 4)), ValueError, "shape mismatch"),
    (np.zeros((0, 3)), np.zeros((0, 3)), ValueError, "empty"),
    (np.zeros(()), np.zeros(()), ValueError, "empty"),
    (np.array([[np.nan, 1.0]]), np.zeros((1, 2)), ValueError, "student_feats contains NaN"),
    (np.zeros((1, 2)), np.array([[np.inf, 1.0]]), ValueError, "teacher_feats contains NaN or inf"),
])
def test_feature_loss_rejects_bad_input(s, t, exc, match):
    with pytest.raises(exc, match=match):
        feature_loss(s, t)


# --- strategy ----------------------------------------------------------------------

def _acts(**layers):
    return IntermediateActivations(layers)


@pytest.mark.parametrize("spec, expected", [
    ("h", {"h": "h"}),
    (["a", "b"], {"a": "a", "b": "b"}),
    ({"s3": "t5"}, {"s3": "t5"}),
])
def test_strategy_layer_specs(spec, expected):
    assert FeatureDistillationStrategy(spec).layers == expected


def test_strategy_intermediate_is_weighted_mean_over_layers(rng):
    s1, t1 = rng.standard_normal((2, 4, 3))
    s2, t2 = rng.standard_normal((2, 4, 5))
    strategy = FeatureDistillationStrategy({"a": "ta", "b": "tb"}, feature_weight=0.4)
    assert isinstance(strategy, IntermediateActivationStrategy)
    loss, grads = strategy.intermediate_loss_and_gradient(
        _acts(a=s1, b=s2, unused=s1), _acts(ta=t1, tb=t2))
    (l1, g1), (l2, g2) = feature_loss(s1, t1), feature_loss(s2, t2)
    assert loss == pytest.approx(0.4 * (l1 + l2) / 2, rel=1e-14)
    assert set(grads) == {"a", "b"}
    np.testing.assert_allclose(grads["a"], 0.2 * g1, rtol=1e-14)
    np.testing.assert_allclose(grads["b"], 0.2 * g2, rtol=1e-14)
    assert strategy.compute_intermediate_loss({"a": s1, "b": s2}, {"ta": t1, "tb": t2}) == loss


def test_strategy_output_loss_is_scaled_kd(rng):
    s, t = rng.standard_normal((2, 5, 7)).astype(np.float32)
    y = rng.integers(0, 7, 5)
    strategy = FeatureDistillationStrategy("h", feature_weight=0.25, temperature=2.0, alpha=0.4)
    loss, grad = strategy.loss_and_gradient(s, t, y)
    ref_loss, ref_grad = kd_loss(s, t, y, temperature=2.0, alpha=0.4)
    assert loss == pytest.approx(0.75 * ref_loss, rel=1e-6)
    assert grad.dtype == np.float32
    np.testing.assert_allclose(grad, 0.75 * ref_grad, rtol=1e-6)
    assert strategy.compute_loss(s, t, y) == loss


@pytest.mark.parametrize("dtype", DTYPES)
def test_strategy_projection_gradient(rng, dtype):
    s = rng.standard_normal((3, 2, 2)).astype(dtype)   # N_s = 4
    t = rng.standard_normal((3, 6)).astype(dtype)      # N_t = 6
    proj = rng.standard_normal((4, 6))
    strategy = FeatureDistillationStrategy({"s": "t"}, feature_weight=1.0, projections={"s": proj})

    def f(x):
        return strategy.compute_intermediate_loss({"s": x}, {"t": t})

    loss, grads = strategy.intermediate_loss_and_gradient({"s": s}, {"t": t})
    s64, t64 = s.astype(F64), t.astype(F64)
    ref_loss = np.mean((s64.reshape(3, 4) @ proj - t64) ** 2)
    assert loss == pytest.approx(ref_loss, rel=RTOL[dtype] * 10)
    assert grads["s"].shape == s.shape and grads["s"].dtype == dtype
    numeric = central_difference(f, s64.copy())
    np.testing.assert_allclose(grads["s"], numeric, rtol=1e-4 if dtype == F32 else 1e-7,
                               atol=1e-8)


def test_strategy_projection_is_copied(rng):
    proj = rng.standard_normal((3, 2))
    strategy = FeatureDistillationStrategy("h", projections={"h": proj})
    s, t = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    before = strategy.compute_intermediate_loss({"h": s}, {"h": t})
    proj[:] = 0
    assert strategy.compute_intermediate_loss({"h": s}, {"h": t}) == before


def test_strategy_does_not_modify_activations(rng):
    s = rng.standard_normal((4, 3)).astype(np.float32)
    t = rng.standard_normal((4, 3)).astype(np.float32)
    strategy = FeatureDistillationStrategy("h")
    assert_inputs_untouched(
        lambda: strategy.intermediate_loss_and_gradient({"h": s}, {"h": t}), s, t)


def test_strategy_missing_layer_names_available_ones(rng):
    strategy = FeatureDistillationStrategy({"block2": "block4"})
    x = rng.standard_normal((2, 3))
    with pytest.raises(ValueError,
                       match=r"'block2' is missing from student_acts.*'block1', 'head'"):
        strategy.intermediate_loss_and_gradient({"block1": x, "head": x}, {"block4": x})
    with pytest.raises(ValueError, match=r"'block4' is missing from teacher_acts.*'block2'"):
        strategy.intermediate_loss_and_gradient({"block2": x}, {"block2": x})


def test_strategy_skips_missing_layers_when_asked(rng):
    a, b = rng.standard_normal((2, 4, 3))
    kw = dict(layer_mapping=["h1", "h2"], feature_weight=0.6)
    both = FeatureDistillationStrategy(**kw).intermediate_loss_and_gradient(
        {"h1": a, "h2": b}, {"h1": b, "h2": a})
    loss, grads = FeatureDistillationStrategy(**kw, missing_layer="skip") \
        .intermediate_loss_and_gradient({"h1": a}, {"h1": b, "h2": a})
    # the missing pair contributes nothing; the other keeps its 1/L share
    assert list(grads) == ["h1"]
    assert loss == pytest.approx(0.6 / 2 * feature_loss(a, b)[0], rel=1e-15)
    np.testing.assert_array_equal(grads["h1"], both[1]["h1"])
    with pytest.raises(ValueError, match="missing_layer"):
        FeatureDistillationStrategy("h", missing_layer="warn")


def test_strategy_width_mismatch_asks_for_projection(rng):
    strategy = FeatureDistillationStrategy("h")
    match = r"layer 'h'.*projections=\{'h': matrix of shape \(3, 5\)\}"
    with pytest.raises(ValueError, match=match):
        strategy.intermediate_loss_and_gradient({"h": rng.standard_normal((2, 3))},
                                                {"h": rng.standard_normal((2, 5))})


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(layer_mapping=[]), ValueError, "at least one layer"),
    (dict(layer_mapping=3), TypeError, "layer_mapping must be"),
    (dict(layer_mapping={"a": ""}), TypeError, "teacher layer name"),
    (dict(layer_mapping=["a", "a"]), ValueError, "twice"),
    (dict(layer_mapping="a", feature_weight=1.5), ValueError, "feature_weight"),
    (dict(layer_mapping="a", feature_weight=-0.1), ValueError, "feature_weight"),
    (dict(layer_mapping="a", temperature=0), ValueError, "temperature"),
    (dict(layer_mapping="a", alpha=2), ValueError, "alpha"),
    (dict(layer_mapping="a", projections={"b": np.eye(2)}), ValueError, "not a student layer"),
    (dict(layer_mapping="a", projections={"a": np.eye(2, dtype=int)}), TypeError, "projections"),
    (dict(layer_mapping="a", projections={"a": np.ones(3)}), ValueError, "2-D"),
    (dict(layer_mapping="a", projections={"a": np.full((2, 2), np.nan)}), ValueError, "NaN"),
    (dict(layer_mapping="a", projections=[np.eye(2)]), TypeError, "projections must be"),
    (dict(layer_mapping="a", device="tpu"), ValueError, "device"),
])
def test_strategy_rejects_bad_configuration(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        FeatureDistillationStrategy(**kwargs)


def test_strategy_projection_shape_mismatch(rng):
    strategy = FeatureDistillationStrategy("h", projections={"h": np.eye(3)})
    match = r"projections\['h'\] has shape \(3, 3\), expected \(3, 4\)"
    with pytest.raises(ValueError, match=match):
        strategy.intermediate_loss_and_gradient({"h": rng.standard_normal((2, 3))},
                                                {"h": rng.standard_normal((2, 4))})


def test_strategy_bad_activation_names_the_layer():
    strategy = FeatureDistillationStrategy("h")
    with pytest.raises(TypeError, match=r"layer 'h'.*float32 or float64"):
        strategy.intermediate_loss_and_gradient({"h": np.zeros((2, 3), int)},
                                                {"h": np.zeros((2, 3))})
    with pytest.raises(TypeError, match="student_acts must be"):
        strategy.intermediate_loss_and_gradient([np.zeros(3)], {"h": np.zeros(3)})


def test_strategy_is_exported():
    assert kdnumba.FeatureDistillationStrategy is FeatureDistillationStrategy
    assert "feature_weight=0.5" in repr(FeatureDistillationStrategy("h"))
