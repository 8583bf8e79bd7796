"""What every strategy shares (``kdnumba/strategies/base.py``): ``IntermediateActivations``,
the ``IntermediateActivationStrategy`` protocol, ``DistillationStrategy``,
``IntermediateStrategyMixin`` and ``check_activations``."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from types import SimpleNamespace

import numpy as np
import pytest

import kdnumba
from kdnumba.strategies import (
    DistillationStrategy,
    IntermediateActivations,
    IntermediateActivationStrategy,
    IntermediateStrategyMixin,
)
from kdnumba.strategies.base import check_activations


# --- IntermediateActivations ----------------------------------------------------------------

def test_is_a_mutable_mapping():
    acts = IntermediateActivations()
    assert isinstance(acts, MutableMapping) and isinstance(acts, Mapping)
    assert len(acts) == 0 and list(acts) == [] and "x" not in acts


def test_add_stores_without_copying_and_chains():
    a, b = np.zeros((4, 3), np.float32), np.ones((4, 2, 2))
    acts = IntermediateActivations()
    assert acts.add("layer1", a) is acts
    acts.add("layer2", b).add("layer3", a)
    assert list(acts) == ["layer1", "layer2", "layer3"]  # insertion order
    assert acts["layer1"] is a and acts["layer2"] is b
    assert len(acts) == 3 and "layer2" in acts
    assert dict(acts.items())["layer3"] is a


def test_add_replaces_and_mapping_methods_work():
    a, b, c = np.zeros(2), np.ones(2), np.full(2, 2.0)
    acts = IntermediateActivations().add("x", a).add("y", b)
    acts.add("x", c)
    assert acts["x"] is c and list(acts) == ["x", "y"]
    acts["z"] = a
    del acts["y"]
    assert list(acts.keys()) == ["x", "z"]
    assert acts.pop("z") is a and list(acts) == ["x"]
    assert acts.get("missing") is None
    with pytest.raises(KeyError):
        acts["missing"]
    with pytest.raises(KeyError):
        del acts["missing"]
    acts.update({"u": a}, w=b)
    assert list(acts) == ["x", "u", "w"]
    assert acts.setdefault("x", a) is c


def test_constructor_from_mapping_and_keywords():
    a, b = np.zeros(2), np.ones(2)
    acts = IntermediateActivations({"layer1": a, "layer2": a}, layer2=b, emb=a)
    assert acts["layer1"] is a and acts["layer2"] is b and acts["emb"] is a
    copy = IntermediateActivations(acts)
    assert list(copy) == list(acts) and copy["layer2"] is b
    copy.add("new", a)
    assert "new" not in acts  # a new container, the arrays shared


@pytest.mark.parametrize("name", [0, 1.5, None, ("a",), b"layer", ""])
def test_non_string_or_empty_names_are_rejected(name):
    acts = IntermediateActivations()
    with pytest.raises(TypeError, match=r"layer name must be a non-empty string"):
        acts.add(name, np.zeros(2))
    with pytest.raises(TypeError, match=r"layer name must be a non-empty string"):
        acts[name] = np.zeros(2)
    with pytest.raises(TypeError, match=r"layer name must be a non-empty string"):
        IntermediateActivations({name: np.zeros(2)})
    with pytest.raises(TypeError, match=r"layer name must be a non-empty string"):
        acts.update({name: np.zeros(2)})
    assert len(acts) == 0


def test_repr_shows_names_and_shapes():
    acts = IntermediateActivations().add("layer3", np.zeros((32, 128))).add("odd", [1, 2])
    text = repr(acts)
    assert text.startswith("IntermediateActivations(")
    assert "'layer3': (32, 128)" in text and "'odd': ?" in text
    assert repr(IntermediateActivations()) == "IntermediateActivations({})"


# --- the protocol ---------------------------------------------------------------------------

class BothMethods:
    def compute_intermediate_loss(self, student_acts, teacher_acts):
        return 0.0

    def compute_intermediate_gradient(self, student_acts, teacher_acts):
        return IntermediateActivations()


class OnlyLoss:
    def compute_intermediate_loss(self, student_acts, teacher_acts):
        return 0.0


class OnlyGradient:
    def compute_intermediate_gradient(self, student_acts, teacher_acts):
        return IntermediateActivations()


def test_protocol_is_runtime_checkable():
    assert isinstance(BothMethods(), IntermediateActivationStrategy)
    assert isinstance(SimpleNamespace(compute_intermediate_loss=lambda s, t: 0.0,
                                      compute_intermediate_gradient=lambda s, t: {}),
                      IntermediateActivationStrategy)
    for obj in (OnlyLoss(), OnlyGradient(), object(), None, np.zeros(2),
                kdnumba.DistillationLoss(), IntermediateActivations()):
        assert not isinstance(obj, IntermediateActivationStrategy), obj
    assert kdnumba.IntermediateActivationStrategy is IntermediateActivationStrategy


# --- base classes ---------------------------------------------------------------------------

class Fixed(DistillationStrategy):
    """A strategy whose loss and gradient are known: 0.5*|s - t|^2 / B."""

    def loss_and_gradient(self, student_output, teacher_output, labels=None):
        s, t = np.asarray(student_output), np.asarray(teacher_output)
        return float(0.5 * np.sum((s - t) ** 2) / len(s)), (s - t) / len(s)


def test_distillation_strategy_is_abstract():
    with pytest.raises(TypeError):
        DistillationStrategy()

    class Incomplete(DistillationStrategy):
        pass

    with pytest.raises(TypeError):
        Incomplete()


def test_compute_loss_and_gradient_derive_from_the_fused_method():
    s, t = np.array([[1.0, 2.0], [0.0, 0.0]]), np.zeros((2, 2))
    strategy = Fixed()
    assert strategy.device == "auto"
    loss, grad = strategy.loss_and_gradient(s, t)
    assert strategy.compute_loss(s, t) == loss == 1.25
    np.testing.assert_array_equal(strategy.compute_gradient(s, t), grad)
    assert isinstance(kdnumba.DistillationLoss(), DistillationStrategy)
    assert kdnumba.DistillationStrategy is DistillationStrategy


@pytest.mark.parametrize("device", ["cpu", "cuda", "auto"])
def test_base_validates_device(device):
    assert Fixed(device=device).device == device
    with pytest.raises(ValueError, match=r"device must be one of \('cpu', 'cuda', 'auto'\)"):
        Fixed(device="gpu")


class Intermediate(IntermediateStrategyMixin, Fixed):
    def intermediate_loss_and_gradient(self, student_acts, teacher_acts):
        grads = IntermediateActivations()
        total = 0.0
        for name in student_acts:
            loss, grad = self.loss_and_gradient(student_acts[name], teacher_acts[name])
            total += 0.25 * loss
            grads.add(name, 0.25 * grad)
        return total, grads


def test_mixin_implements_the_protocol():
    strategy = Intermediate()
    assert isinstance(strategy, IntermediateActivationStrategy)
    s = IntermediateActivations().add("h", np.ones((2, 3)))
    t = IntermediateActivations().add("h", np.zeros((2, 3)))
    fused_loss, fused_grad = strategy.intermediate_loss_and_gradient(s, t)
    assert strategy.compute_intermediate_loss(s, t) == fused_loss == 0.25 * 1.5
    grad = strategy.compute_intermediate_gradient(s, t)
    assert isinstance(grad, IntermediateActivations) and list(grad) == ["h"]
    np.testing.assert_array_equal(grad["h"], fused_grad["h"])


def test_mixin_without_implementation_raises():
    class Bare(IntermediateStrategyMixin):
        pass

    with pytest.raises(NotImplementedError):
        Bare().compute_intermediate_loss({}, {})
    with pytest.raises(NotImplementedError):
        Bare().compute_intermediate_gradient({}, {})
    with pytest.raises(NotImplementedError, match="compute_intermediate_loss"):
        Bare().intermediate_loss_and_gradient({}, {})


def test_mixin_fuses_the_two_protocol_methods_when_those_are_implemented():
    # A subclass written against the protocol (the two methods) still offers
    # the fused method that the trainer and the framework bridges call.
    class TwoMethods(IntermediateStrategyMixin):
        def compute_intermediate_loss(self, student_acts, teacher_acts):
            return float(np.sum(student_acts["h"] ** 2))

        def compute_intermediate_gradient(self, student_acts, teacher_acts):
            return IntermediateActivations(h=2.0 * student_acts["h"])

    s = IntermediateActivations(h=np.array([[1.0, -2.0]]))
    loss, grads = TwoMethods().intermediate_loss_and_gradient(s, s)
    assert loss == 5.0
    np.testing.assert_array_equal(grads["h"], [[2.0, -4.0]])

    from kdnumba.bridges._adapter import intermediate_loss_and_gradient
    loss, grads = intermediate_loss_and_gradient(TwoMethods())(s, s)
    assert loss == 5.0
    np.testing.assert_array_equal(grads["h"], [[2.0, -4.0]])


def test_check_activations():
    acts = IntermediateActivations().add("h", np.zeros(2))
    assert check_activations(acts, "student_acts") is acts
    plain = {"h": np.zeros(2)}
    assert check_activations(plain, "student_acts") is plain
    for bad in (None, [np.zeros(2)], np.zeros((2, 3)), "h"):
        with pytest.raises(TypeError, match=r"student_acts must be an IntermediateActivations"):
            check_activations(bad, "student_acts")


def test_public_names():
    for name in ("DistillationLoss", "DistillationStrategy", "IntermediateActivations",
                 "IntermediateActivationStrategy", "functional"):
        assert name in kdnumba.__all__ and hasattr(kdnumba, name)
    assert kdnumba.IntermediateActivations is IntermediateActivations
    assert kdnumba.functional.kd_loss.__doc__ and "T^2" in kdnumba.functional.kd_loss.__doc__


# --- parameters, repr, missing-layer helpers ---------------------------------------------------

def test_repr_and_get_params_come_from_the_constructor():
    from kdnumba.strategies import SelectivityMetric

    class Mine(DistillationStrategy):
        def __init__(self, layer="h", weight=0.5, metric=SelectivityMetric.SPARSITY,
                     table=None, *, device="auto"):
            super().__init__(device=device)
            self.layer, self.weight, self.metric = layer, weight, metric
            self.table = {} if table is None else table

        def loss_and_gradient(self, s, t, labels=None):
            return 0.0, np.zeros_like(s)

    m = Mine(weight=np.float64(0.25), table={"a": np.array([[0.1, 2.0]], np.float32)})
    assert list(m.get_params()) == ["layer", "weight", "metric", "table", "device"]
    text = repr(m)
    assert text == ("Mine(layer='h', weight=0.25, metric=SelectivityMetric.SPARSITY, "
                    "table={'a': array([[0.10000000149011612, 2.0]], dtype='float32')}, "
                    "device='auto')")
    rebuilt = eval(text, {"Mine": Mine, "SelectivityMetric": SelectivityMetric,  # noqa: S307
                          "array": np.array})
    assert rebuilt.table["a"].dtype == np.float32
    np.testing.assert_array_equal(rebuilt.table["a"], m.table["a"])
    big = Mine(table={"a": np.zeros((40, 40))})
    assert "<array of shape (40, 40), dtype float64>" in repr(big)


def test_repr_of_a_subclass_without_parameter_attributes_does_not_raise():
    class Sloppy(DistillationStrategy):
        def __init__(self, hidden=1.0):
            super().__init__()

        def loss_and_gradient(self, s, t, labels=None):
            return 0.0, np.zeros_like(s)

    assert repr(Sloppy()) == "Sloppy()"
    with pytest.raises(AttributeError, match="'hidden'"):
        Sloppy().get_params()


def test_missing_layer_helpers():
    from kdnumba.strategies.base import check_missing_layer, missing_layer_error

    assert check_missing_layer("raise") == "raise" and check_missing_layer("skip") == "skip"
    for bad in ("warn", None, True, "RAISE"):
        with pytest.raises(ValueError, match="missing_layer must be one of"):
            check_missing_layer(bad)
    exc = missing_layer_error("X", "conv3", "teacher_acts", {"fc": 1, "emb": 2})
    assert isinstance(exc, ValueError)
    assert str(exc) == ("X: layer 'conv3' is missing from teacher_acts (layers present: 'fc', "
                        "'emb'); check the layer name, or pass missing_layer='skip' to ignore "
                        "missing layers")
    assert "layers present: none" in str(missing_layer_error("X", "a", "student_acts", {}))
