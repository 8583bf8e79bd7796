"""``HybridDistillationStrategy``: validation, weighted sums, one fused call per
member, forwarding of the intermediate protocol and per-layer summing."""

from __future__ import annotations

import numpy as np
import pytest
from testkit import softmax

import kdnumba
from kdnumba.functional import attention_map_loss, feature_loss, kd_loss, rkd_loss
from kdnumba.strategies import (
    AttentionDistillationStrategy,
    DistillationLoss,
    FeatureDistillationStrategy,
    HybridDistillationStrategy,
    IntermediateActivations,
    IntermediateActivationStrategy,
    RelationalDistillationStrategy,
)


class Counting:
    """A duck-typed member (no base class) that counts its calls."""

    def __init__(self, strategy):
        self.strategy = strategy
        self.calls = {"output": 0, "intermediate": 0}

    def loss_and_gradient(self, s, t, labels=None):
        self.calls["output"] += 1
        return self.strategy.loss_and_gradient(s, t, labels)


class CountingIntermediate(Counting):
    def intermediate_loss_and_gradient(self, s_acts, t_acts):
        self.calls["intermediate"] += 1
        return self.strategy.intermediate_loss_and_gradient(s_acts, t_acts)

    def compute_intermediate_loss(self, s_acts, t_acts):
        raise AssertionError("the hybrid must use the fused method")

    def compute_intermediate_gradient(self, s_acts, t_acts):
        raise AssertionError("the hybrid must use the fused method")


class ProtocolOnly(Counting):
    """Implements only the two protocol methods (no fused one)."""

    def compute_intermediate_loss(self, s_acts, t_acts):
        self.calls["intermediate"] += 1
        return self.strategy.compute_intermediate_loss(s_acts, t_acts)

    def compute_intermediate_gradient(self, s_acts, t_acts):
        self.calls["intermediate"] += 1
        return self.strategy.compute_intermediate_gradient(s_acts, t_acts)


@pytest.fixture
def batch(rng):
    s = rng.standard_normal((6, 5))
    t = rng.standard_normal((6, 5))
    y = rng.integers(0, 5, 6)
    s_acts = IntermediateActivations(
        emb=rng.standard_normal((6, 8)), attn=softmax(rng.standard_normal((6, 2, 3, 3))))
    t_acts = IntermediateActivations(
        emb=rng.standard_normal((6, 8)), attn=softmax(rng.standard_normal((6, 2, 3, 3))))
    return s, t, y, s_acts, t_acts


def transformer_hybrid():
    """AiDotNet's example: 40% response, 30% attention, 30% feature (+ a relational member)."""
    response = DistillationLoss(temperature=2.0, alpha=0.5)
    attention = AttentionDistillationStrategy("attn", attention_weight=0.3)
    feature = FeatureDistillationStrategy("emb", feature_weight=0.5)
    relational = RelationalDistillationStrategy("emb", relational_weight=0.2)
    members = [(response, 0.4), (attention, 0.3), (feature, 0.2), (relational, 0.1)]
    return HybridDistillationStrategy(members), members


def test_loss_and_gradient_are_weighted_sums(batch):
    s, t, y, _, _ = batch
    hybrid, members = transformer_hybrid()
    loss, grad = hybrid.loss_and_gradient(s, t, y)
    exp_loss = sum(w * m.compute_loss(s, t, y) for m, w in members)
    exp_grad = sum(w * m.compute_gradient(s, t, y) for m, w in members)
    assert loss == pytest.approx(exp_loss, rel=1e-14)
    np.testing.assert_allclose(grad, exp_grad, rtol=1e-13, atol=1e-16)
    assert hybrid.compute_loss(s, t, y) == loss
    np.testing.assert_array_equal(hybrid.compute_gradient(s, t, y), grad)
    # and, member by member, in terms of the functional layer
    kd2 = kd_loss(s, t, y, temperature=2.0, alpha=0.5)
    kd3 = kd_loss(s, t, y)
    assert loss == pytest.approx(0.4 * kd2[0] + (0.3 * 0.7 + 0.2 * 0.5 + 0.1 * 0.8) * kd3[0],
                                 rel=1e-13)


def test_intermediate_is_forwarded_weighted_and_summed_per_layer(batch):
    _, _, _, s_acts, t_acts = batch
    hybrid, _ = transformer_hybrid()
    assert isinstance(hybrid, IntermediateActivationStrategy)
    loss, grads = hybrid.intermediate_loss_and_gradient(s_acts, t_acts)
    att = attention_map_loss(s_acts["attn"], t_acts["attn"])
    feat = feature_loss(s_acts["emb"], t_acts["emb"])
    rel = rkd_loss(s_acts["emb"], t_acts["emb"])
    assert loss == pytest.approx(0.3 * 0.3 * att[0] + 0.2 * 0.5 * feat[0] + 0.1 * 0.2 * rel[0],
                                 rel=1e-13)
    assert set(grads) == {"attn", "emb"}
    np.testing.assert_allclose(grads["attn"], 0.09 * att[1], rtol=1e-13)
    # "emb" gets the feature and the relational gradients, summed
    np.testing.assert_allclose(grads["emb"], 0.1 * feat[1] + 0.02 * rel[1], rtol=1e-12,
                               atol=1e-16)
    assert hybrid.compute_intermediate_loss(s_acts, t_acts) == loss
    np.testing.assert_array_equal(hybrid.compute_intermediate_gradient(s_acts, t_acts)["emb"],
                                  grads["emb"])


def test_member_without_intermediate_part_contributes_nothing(batch):
    s, t, y, s_acts, t_acts = batch
    feature = FeatureDistillationStrategy("emb")
    hybrid = HybridDistillationStrategy([(DistillationLoss(), 0.5), (feature, 0.5)])
    loss, grads = hybrid.intermediate_loss_and_gradient(s_acts, t_acts)
    ref_loss, ref_grads = feature.intermediate_loss_and_gradient(s_acts, t_acts)
    assert loss == pytest.approx(0.5 * ref_loss, rel=1e-15)
    assert list(grads) == ["emb"]
    np.testing.assert_allclose(grads["emb"], 0.5 * ref_grads["emb"], rtol=1e-15)

    only_output = HybridDistillationStrategy([(DistillationLoss(), 1.0)])
    loss, grads = only_output.intermediate_loss_and_gradient(s_acts, t_acts)
    assert loss == 0.0 and len(grads) == 0


def test_each_member_is_computed_once_per_call(batch):
    s, t, y, s_acts, t_acts = batch
    a = CountingIntermediate(FeatureDistillationStrategy("emb"))
    b = Counting(DistillationLoss())
    c = ProtocolOnly(FeatureDistillationStrategy("emb"))
    zero = CountingIntermediate(FeatureDistillationStrategy("emb"))
    hybrid = HybridDistillationStrategy([(a, 0.5), (b, 0.25), (c, 0.25), (zero, 0.0)])
    hybrid.loss_and_gradient(s, t, y)
    hybrid.intermediate_loss_and_gradient(s_acts, t_acts)
    assert a.calls == {"output": 1, "intermediate": 1}
    assert b.calls == {"output": 1, "intermediate": 0}
    # a protocol-only member has no fused method: its two methods, once each
    assert c.calls == {"output": 1, "intermediate": 2}
    assert zero.calls == {"output": 0, "intermediate": 0}


def test_nested_hybrid(batch):
    s, t, y, s_acts, t_acts = batch
    inner, _ = transformer_hybrid()
    feature = FeatureDistillationStrategy("emb")
    outer = HybridDistillationStrategy([(inner, 0.5), (feature, 0.5)])
    loss, grad = outer.loss_and_gradient(s, t, y)
    assert loss == pytest.approx(0.5 * inner.compute_loss(s, t, y)
                                 + 0.5 * feature.compute_loss(s, t, y), rel=1e-14)
    i_loss, grads = outer.intermediate_loss_and_gradient(s_acts, t_acts)
    assert i_loss == pytest.approx(0.5 * inner.compute_intermediate_loss(s_acts, t_acts)
                                   + 0.5 * feature.compute_intermediate_loss(s_acts, t_acts),
                                   rel=1e-14)
    assert set(grads) == {"emb", "attn"}


def test_float32_gradients_stay_float32(batch):
    s, t, y, s_acts, t_acts = batch
    hybrid, _ = transformer_hybrid()
    _, grad = hybrid.loss_and_gradient(s.astype(np.float32), t.astype(np.float32), y)
    assert grad.dtype == np.float32
    acts32 = IntermediateActivations({k: v.astype(np.float32) for k, v in s_acts.items()})
    _, grads = hybrid.intermediate_loss_and_gradient(acts32, t_acts)
    assert all(g.dtype == np.float32 for g in grads.values())


def test_gradient_shape_mismatch_between_members(batch):
    s, t, y, s_acts, t_acts = batch

    class WrongShape:
        def loss_and_gradient(self, s, t, labels=None):
            return 0.0, np.zeros((1, 1))

        def intermediate_loss_and_gradient(self, s_acts, t_acts):
            return 0.0, IntermediateActivations(emb=np.zeros((2, 2)))

        compute_intermediate_loss = compute_intermediate_gradient = None

    class WrongShapeIntermediate(WrongShape):
        def compute_intermediate_loss(self, s_acts, t_acts):
            return 0.0

        def compute_intermediate_gradient(self, s_acts, t_acts):
            return IntermediateActivations(emb=np.zeros((2, 2)))

    hybrid = HybridDistillationStrategy([(FeatureDistillationStrategy("emb"), 0.5),
                                         (WrongShapeIntermediate(), 0.5)])
    with pytest.raises(ValueError, match=r"strategies\[1\] returned a gradient of shape \(1, 1\)"):
        hybrid.loss_and_gradient(s, t, y)
    with pytest.raises(ValueError, match=r"strategies\[1\].*layer 'emb'.*\(2, 2\).*\(6, 8\)"):
        hybrid.intermediate_loss_and_gradient(s_acts, t_acts)


def test_get_strategies_returns_a_copy():
    hybrid, members = transformer_hybrid()
    got = hybrid.get_strategies()
    assert got == members and got is not members
    got.clear()
    assert len(hybrid.get_strategies()) == 4
    members.pop()
    assert len(hybrid.get_strategies()) == 4


def test_temperature_and_alpha_are_validated_and_inert(batch):
    s, t, y, _, _ = batch
    members = [(DistillationLoss(), 1.0)]
    a = HybridDistillationStrategy(members, temperature=1.5, alpha=0.9)
    b = HybridDistillationStrategy(members)
    assert (a.temperature, a.alpha) == (1.5, 0.9)
    assert a.compute_loss(s, t, y) == b.compute_loss(s, t, y)
    with pytest.raises(ValueError, match="temperature"):
        HybridDistillationStrategy(members, temperature=0.0)
    with pytest.raises(ValueError, match="alpha"):
        HybridDistillationStrategy(members, alpha=1.5)
    with pytest.raises(ValueError, match="device"):
        HybridDistillationStrategy(members, device="tpu")


def test_weights_sum_tolerance():
    d = DistillationLoss()
    HybridDistillationStrategy([(d, 0.3333333), (d, 0.3333333), (d, 0.3333334)])
    HybridDistillationStrategy([(d, 0.5), (d, 0.5 + 9e-7)])
    with pytest.raises(ValueError, match=r"sum to 1 \(within 1e-06\), got 1.000002"):
        HybridDistillationStrategy([(d, 0.5), (d, 0.500002)])


@pytest.mark.parametrize("members, exc, match", [
    ([], ValueError, "at least one"),
    ([(DistillationLoss(), 1.2), (DistillationLoss(), -0.2)], ValueError,
     r"weight of strategies\[0\] must be in \[0, 1\], got 1.2"),
    ([(DistillationLoss(), -0.5), (DistillationLoss(), 1.5)], ValueError,
     r"weight of strategies\[0\] must be in \[0, 1\]"),
    ([(DistillationLoss(), 0.4)], ValueError, "sum to 1"),
    ([(DistillationLoss(), "1")], TypeError, r"weight of strategies\[0\] must be a real number"),
    ([(DistillationLoss(), True)], TypeError, "real number"),
    ([(DistillationLoss(), float("nan"))], ValueError, "finite"),
    ([(object(), 1.0)], TypeError, r"strategies\[0\] holds object, which is not a distillation"),
    ([(kd_loss, 1.0)], TypeError, "not a distillation strategy"),
    ([DistillationLoss()], TypeError, r"strategies\[0\] must be a \(strategy, weight\) pair"),
    ([(DistillationLoss(), 0.5, 0.5)], TypeError, "pair"),
    (DistillationLoss(), TypeError, "list of"),
    ("abc", TypeError, "list of"),
])
def test_rejects_bad_members(members, exc, match):
    with pytest.raises(exc, match=match):
        HybridDistillationStrategy(members)


def test_rejects_bad_activations():
    hybrid, _ = transformer_hybrid()
    with pytest.raises(TypeError, match="teacher_acts must be"):
        hybrid.intermediate_loss_and_gradient({}, [1, 2])
    with pytest.raises(ValueError, match="layer 'attn' is missing from student_acts"):
        hybrid.intermediate_loss_and_gradient({"emb": np.ones((2, 3))}, {"emb": np.ones((2, 3))})


def test_exported_and_repr():
    assert kdnumba.HybridDistillationStrategy is HybridDistillationStrategy
    text = repr(HybridDistillationStrategy([(DistillationLoss(), 1.0)]))
    assert text.startswith("HybridDistillationStrategy(strategies=[(DistillationLoss(")
    assert "1.0)]" in text


def test_labels_are_forwarded_to_members_that_take_them(batch):
    s, t, y, s_acts, t_acts = batch
    contrastive = kdnumba.ContrastiveDistillationStrategy("emb", mode="supervised",
                                                          negatives_sample_size=0)
    feature = CountingIntermediate(FeatureDistillationStrategy("emb"))  # takes no labels
    hybrid = HybridDistillationStrategy([(contrastive, 0.5), (feature, 0.5)])
    loss, grads = hybrid.intermediate_loss_and_gradient(s_acts, t_acts, labels=y)
    c_loss, c_grads = contrastive.intermediate_loss_and_gradient(s_acts, t_acts, labels=y)
    f_loss, f_grads = FeatureDistillationStrategy("emb").intermediate_loss_and_gradient(
        s_acts, t_acts)
    assert loss == 0.5 * c_loss + 0.5 * f_loss
    np.testing.assert_array_equal(grads["emb"], 0.5 * c_grads["emb"] + 0.5 * f_grads["emb"])
    assert hybrid.compute_intermediate_loss(s_acts, t_acts, labels=y) == loss
    # no labels: the member that needs them says so (nothing is remembered)
    with pytest.raises(ValueError, match="needs labels"):
        hybrid.intermediate_loss_and_gradient(s_acts, t_acts)


@pytest.mark.parametrize("doc", ["hybrid", "feature", "attention", "relational"])
def test_doc_examples_run(doc):
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "docs" / f"{doc}.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, f"docs/{doc}.md has no python example"
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/{doc}.md[{i}]", "exec"), {})


def test_distiller_passes_labels_through_the_hybrid(batch):
    from kdnumba.training import MLP, Distiller

    s, t, y, s_acts, t_acts = batch
    contrastive = kdnumba.ContrastiveDistillationStrategy("emb", mode="triplet")
    hybrid = HybridDistillationStrategy([(contrastive, 0.5), (DistillationLoss(), 0.5)])
    net = MLP([4, 8, 5], layer_names=["emb", "out"])
    losses = Distiller(net, net, hybrid, progress=False).compute_losses(s, s_acts, t, t_acts, y)
    expected = hybrid.intermediate_loss_and_gradient(s_acts, t_acts, labels=y)
    assert losses.intermediate_loss == expected[0] > 0
    np.testing.assert_array_equal(losses.intermediate_grads["emb"], expected[1]["emb"])
