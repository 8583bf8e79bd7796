"""The training loop, the NumPy MLP and the teacher cache (kdnumba.training)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from testkit import central_difference

from kdnumba import DistillationLoss, IntermediateActivations
from kdnumba.strategies.base import DistillationStrategy, IntermediateStrategyMixin
from kdnumba.training import (
    MLP,
    Distiller,
    EarlyStopping,
    TeacherCache,
    TeacherOutputs,
    required_layers,
    run_teacher,
)
from kdnumba.training.loop import start_batch
from kdnumba.training.protocol import Student, Teacher


# -- helpers -------------------------------------------------------------------------------
class FeatureMSE(IntermediateStrategyMixin, DistillationStrategy):
    """A test strategy: KD on outputs + ``weight * mean((s - t)^2)`` per named layer
    (written here so the loop is tested independently of the other families)."""

    def __init__(self, layer_names, weight=0.7, temperature=2.0, alpha=0.4):
        super().__init__()
        self.layer_names = tuple(layer_names)
        self.weight = weight
        self.kd = DistillationLoss(temperature, alpha)

    def loss_and_gradient(self, s, t, labels=None):
        return self.kd.loss_and_gradient(s, t, labels)

    def intermediate_loss_and_gradient(self, student_acts, teacher_acts):
        loss, grads = 0.0, IntermediateActivations()
        for name in self.layer_names:
            d = np.asarray(student_acts[name]) - np.asarray(teacher_acts[name])
            loss += self.weight * float(np.mean(d * d))
            grads.add(name, self.weight * 2.0 * d / d.size)
        return loss, grads


class ProtocolOnly:
    """Intermediate-only strategy exposing just the protocol's two methods, with a
    label-dependent term (like a supervised contrastive strategy)."""

    layer_name = "h1"

    def _parts(self, s_acts, labels):
        a = np.asarray(s_acts[self.layer_name])
        w = (1.0 + np.asarray(labels, float))[:, None] / a.size
        return float(np.sum(w * a * a)), 2.0 * w * a

    def compute_intermediate_loss(self, student_acts, teacher_acts, labels=None):
        return self._parts(student_acts, labels)[0]

    def compute_intermediate_gradient(self, student_acts, teacher_acts, labels=None):
        return IntermediateActivations(h1=self._parts(student_acts, labels)[1])


class Hybridish(IntermediateStrategyMixin, DistillationStrategy):
    """Weighted sum over members, like HybridDistillationStrategy."""

    def __init__(self, members):
        super().__init__()
        self._members = members

    def get_strategies(self):
        return list(self._members)

    def loss_and_gradient(self, s, t, labels=None):
        loss, grad = 0.0, np.zeros_like(s)
        for m, w in self._members:
            if hasattr(m, "loss_and_gradient"):
                l, g = m.loss_and_gradient(s, t, labels)
                loss, grad = loss + w * l, grad + w * g
        return loss, grad

    def intermediate_loss_and_gradient(self, s_acts, t_acts):
        loss, grads = 0.0, IntermediateActivations()
        for m, w in self._members:
            if hasattr(m, "intermediate_loss_and_gradient"):
                l, g = m.intermediate_loss_and_gradient(s_acts, t_acts)
                loss += w * l
                for k, a in g.items():
                    grads.add(k, grads[k] + w * a if k in grads else w * a)
        return loss, grads


class CountingTeacher:
    """Wraps a model and counts forward calls."""

    def __init__(self, model):
        self.model = model
        self.calls = 0
        self.layer_names = model.layer_names

    def forward(self, x, collect=()):
        self.calls += 1
        return self.model.forward(x, collect)

    def fingerprint(self):
        return self.model.fingerprint()


class StubStudent:
    """A student that learns nothing: zero logits for two classes, no-op updates."""

    def forward(self, x, collect=()):
        return np.zeros((len(x), 2)), IntermediateActivations()

    def backward(self, g, inter=None):
        pass

    def step(self):
        pass

    def predict(self, x):
        return np.zeros((len(x), 2))


def blobs(rng, n=96, d=6, k=3, dtype=np.float64):
    centers = rng.standard_normal((k, d)) * 3.0
    y = rng.integers(0, k, n)
    x = centers[y] + rng.standard_normal((n, d))
    return x.astype(dtype), y


def tiny_mlp(seed=0, dtype=np.float64, sizes=(6, 8, 5, 3), lr=1e-2):
    return MLP(list(sizes), layer_names=["h1", "h2", "logits"], seed=seed, dtype=dtype,
               learning_rate=lr)


def jitter_biases(model, rng):
    """Non-zero biases: with zero biases a row whose inputs to a layer are all zero
    sits exactly on the ReLU kink, where finite differences disagree with any
    one-sided derivative."""
    for b in model.biases:
        b[...] = 0.1 * rng.standard_normal(b.shape)
    return model


def fd_gradients(model, loss_fn, eps=1e-6):
    """Central finite differences of ``loss_fn()`` w.r.t. every parameter (each
    perturbed in place, where the model reads it)."""
    return {name: central_difference(lambda _: loss_fn(), p, eps)
            for name, p in model.parameters.items()}


def loop_gradients(d, x, y, t_out, t_acts):
    """``(losses, analytic, numeric)`` for one batch: what ``d.compute_losses``
    reports, the parameter gradients the student gets from backpropagating
    them, and finite differences of the reported total."""
    student = d.student
    start_batch(d.strategy, np.arange(len(x)))  # the batch hooks, as fit runs them

    def total():
        s_out, s_acts = student.forward(x, collect=d.layers)
        return d.compute_losses(s_out, s_acts, t_out, t_acts, y).total

    s_out, s_acts = student.forward(x, collect=d.layers)
    losses = d.compute_losses(s_out, s_acts, t_out, t_acts, y)
    student.backward(losses.output_grad, losses.intermediate_grads)
    analytic = {k: g.copy() for k, g in student.gradients.items()}
    return losses, analytic, fd_gradients(student, total)


# -- the MLP ----------------------------------------------------------------------------------
def test_mlp_implements_protocol():
    m = tiny_mlp()
    assert isinstance(m, Student) and isinstance(m, Teacher)
    out, acts = m.forward(np.ones((4, 6)), collect=("h2",))
    assert out.shape == (4, 3) and list(acts) == ["h2"] and acts["h2"].shape == (4, 5)
    assert (acts["h2"] >= 0).all()  # ReLU output
    np.testing.assert_array_equal(m.predict(np.ones((4, 6))), out)


def test_mlp_backward_with_injected_gradients_matches_finite_differences(rng):
    m = jitter_biases(tiny_mlp(seed=3), rng)
    x = rng.standard_normal((7, 6))
    t = rng.standard_normal((7, 3))
    y = rng.integers(0, 3, 7)
    g1 = rng.standard_normal((7, 8))
    target2 = rng.standard_normal((7, 5))
    kd = DistillationLoss(temperature=2.0, alpha=0.5)

    def total(x_in=x):
        out, acts = m.forward(x_in, collect=("h1", "h2"))
        # a linear term on h1 and a quadratic one on h2, beside the KD loss on the logits
        return (kd.compute_loss(out, t, y) + float(np.sum(g1 * acts["h1"]))
                + 0.5 * float(np.sum((acts["h2"] - target2) ** 2)))

    out, acts = m.forward(x, collect=("h1", "h2"))
    _, g_out = kd.loss_and_gradient(out, t, y)
    inter = IntermediateActivations(h1=g1, h2=acts["h2"] - target2)
    g1_before, g_out_before = g1.copy(), g_out.copy()
    dx = m.backward(g_out, inter)
    np.testing.assert_array_equal(g1, g1_before)  # the caller's arrays are untouched
    np.testing.assert_array_equal(g_out, g_out_before)
    analytic = {k: g.copy() for k, g in m.gradients.items()}
    numeric = fd_gradients(m, total)
    for name in analytic:
        np.testing.assert_allclose(analytic[name], numeric[name], rtol=1e-6, atol=1e-8,
                                   err_msg=name)
    # dL/dx, the returned input gradient
    np.testing.assert_allclose(dx, central_difference(total, x.copy()), rtol=1e-6, atol=1e-8)


def test_intermediate_gradient_reaches_only_the_layers_below(rng):
    m = jitter_biases(tiny_mlp(seed=1), rng)
    x = rng.standard_normal((5, 6))
    out, _ = m.forward(x, collect=("h1",))
    g = rng.standard_normal((5, 8))
    m.backward(np.zeros_like(out), {"h1": g})
    grads = m.gradients
    assert np.abs(grads["h1.W"]).sum() > 0
    for name in ("h2.W", "h2.b", "logits.W", "logits.b"):
        assert not grads[name].any(), name
    # and it equals the gradient of sum(g * h1) alone
    numeric = fd_gradients(m, lambda: float(np.sum(g * m.forward(x, ("h1",))[1]["h1"])))
    np.testing.assert_allclose(grads["h1.W"], numeric["h1.W"], rtol=1e-6, atol=1e-8)


def test_mlp_rejects_bad_input():
    m = tiny_mlp()
    with pytest.raises(ValueError, match="unknown layer"):
        m.forward(np.ones((2, 6)), collect=("nope",))
    with pytest.raises(ValueError, match=r"shape \(B, 6\)"):
        m.forward(np.ones((2, 5)))
    with pytest.raises(RuntimeError, match="forward"):
        tiny_mlp().backward(np.zeros((2, 3)))
    out, _ = m.forward(np.ones((2, 6)))
    with pytest.raises(ValueError, match="output_grad"):
        m.backward(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="unknown layer"):
        m.backward(np.zeros((2, 3)), {"h9": np.zeros((2, 8))})
    with pytest.raises(ValueError, match=r"intermediate_grads\['h1'\]"):
        m.backward(np.zeros((2, 3)), {"h1": np.zeros((2, 7))})
    with pytest.raises(RuntimeError, match="backward"):
        tiny_mlp().step()
    with pytest.raises(ValueError, match="layer_names"):
        MLP([4, 3, 2], layer_names=["a"])
    with pytest.raises(TypeError, match="dtype"):
        MLP([4, 2], dtype=np.float16)


def test_adam_step_matches_the_textbook_update(rng):
    m = MLP([3, 2], seed=0, dtype=np.float64, learning_rate=0.01)
    w0 = m.weights[0].copy()
    x = rng.standard_normal((4, 3))
    for t in (1, 2):
        m.forward(x)
        m.backward(np.ones((4, 2)))
        g = m.weight_grads[0].copy()
        if t == 1:
            mom, vel, w = 0.1 * g, 0.001 * g * g, w0
        else:
            mom, vel = 0.9 * mom + 0.1 * g, 0.999 * vel + 0.001 * g * g
        mhat, vhat = mom / (1 - 0.9 ** t), vel / (1 - 0.999 ** t)
        w = w - 0.01 * mhat / (np.sqrt(vhat) + 1e-8)
        m.step()
        np.testing.assert_allclose(m.weights[0], w, rtol=1e-12, atol=1e-15)


def test_mlp_float32_stays_float32(rng):
    m = tiny_mlp(dtype=np.float32)
    out, acts = m.forward(rng.standard_normal((4, 6)), collect=("h1",))
    assert out.dtype == np.float32 and acts["h1"].dtype == np.float32
    m.backward(np.ones((4, 3), np.float64))
    m.step()
    assert all(p.dtype == np.float32 for p in m.parameters.values())


def test_mlp_save_load_state_and_fingerprint(tmp_path, rng):
    m = tiny_mlp(seed=5)
    x = rng.standard_normal((3, 6))
    path = tmp_path / "m.npz"
    m.save(path)
    m2 = MLP.load(path)
    np.testing.assert_array_equal(m2.predict(x), m.predict(x))
    assert m2.fingerprint() == m.fingerprint()
    state = m.state_dict()
    m.forward(x)
    m.backward(np.ones((3, 3)))
    m.step()
    assert m.fingerprint() != m2.fingerprint()
    m.load_state_dict(state)
    assert m.fingerprint() == m2.fingerprint()


# -- the loop -------------------------------------------------------------------------------------
def test_combined_gradient_of_the_loop_matches_finite_differences(rng):
    """What the Distiller feeds backward is the gradient of the loss it reports,
    for an output+intermediate strategy, a protocol-only one with labels, and a
    hybrid of both."""
    x, y = blobs(rng, n=9)
    teacher = tiny_mlp(seed=11)
    t_out, t_acts = teacher.forward(x, collect=("h1", "h2"))
    strategies = [FeatureMSE(["h1", "h2"]), ProtocolOnly(),
                  Hybridish([(FeatureMSE(["h2"]), 0.6), (ProtocolOnly(), 0.4)])]
    for strategy in strategies:
        student = jitter_biases(tiny_mlp(seed=2), rng)
        losses, analytic, numeric = loop_gradients(Distiller(student, teacher, strategy),
                                                   x, y, t_out, t_acts)
        assert losses.intermediate_loss > 0
        for name in analytic:
            np.testing.assert_allclose(analytic[name], numeric[name], rtol=1e-5, atol=1e-8,
                                       err_msg=f"{type(strategy).__name__}: {name}")


def test_required_layers_recurses_into_hybrids():
    h = Hybridish([(FeatureMSE(["h2", "h1"]), 0.5), (ProtocolOnly(), 0.3),
                   (DistillationLoss(), 0.2)])
    assert required_layers(h) == ("h1", "h2")
    mapped = FeatureMSE([])
    mapped.layers = {"h1": "t_wide", "h2": "t_emb"}  # student -> teacher, like LayerwiseStrategy
    assert required_layers(mapped) == ("h1", "h2")
    assert required_layers(mapped, teacher=True) == ("t_emb", "t_wide")
    assert required_layers(DistillationLoss()) == ()
    assert required_layers(None) == ()


class MappedMSE(FeatureMSE):
    """FeatureMSE between differently named layers (``layers = {student: teacher}``)."""

    def __init__(self, layers):
        super().__init__([])
        self.layers = dict(layers)

    def intermediate_loss_and_gradient(self, student_acts, teacher_acts):
        loss, grads = 0.0, IntermediateActivations()
        for s_name, t_name in self.layers.items():
            d = student_acts[s_name] - teacher_acts[t_name]
            loss += float(np.mean(d * d))
            grads.add(s_name, 2.0 * d / d.size)
        return loss, grads


def test_student_and_teacher_layers_may_have_different_names(rng, tmp_path):
    x, y = blobs(rng, n=30)
    teacher = CountingTeacher(MLP([6, 16, 5, 3], layer_names=["wide", "t_emb", "logits"], seed=1,
                                  dtype=np.float64))
    student = tiny_mlp(seed=2)
    d = Distiller(student, teacher, MappedMSE({"h2": "t_emb"}), epochs=3, batch_size=10,
                  cache=tmp_path)
    assert d.layers == ("h2",) and d.teacher_layers == ("t_emb",)
    hist = d.fit(x, y)
    assert all(v > 0 for v in hist["train_intermediate_loss"]) and teacher.calls == 1
    with pytest.raises(ValueError, match=r"teacher does not have"):
        Distiller(tiny_mlp(), teacher, MappedMSE({"h2": "emb"}))
    explicit = Distiller(tiny_mlp(), teacher, MappedMSE({"h2": "t_emb"}), layers={"h2": "t_emb"})
    assert explicit.layers == ("h2",) and explicit.teacher_layers == ("t_emb",)


def test_loss_decreases_and_student_learns(rng):
    x, y = blobs(rng, n=120, dtype=np.float32)
    teacher = tiny_mlp(seed=7, dtype=np.float32)
    Distiller(teacher, epochs=30, batch_size=16, progress=False).fit(x, y)
    student = tiny_mlp(seed=8, dtype=np.float32)
    d = Distiller(student, teacher, FeatureMSE(["h2"]), epochs=25, batch_size=16,
                  progress=False)
    hist = d.fit(x, y, validation=(x, y))
    assert hist.layers == ("h2",)
    losses = hist["train_loss"]
    assert losses[-1] < 0.5 * losses[0]
    assert all(i > 0 for i in hist["train_intermediate_loss"])
    np.testing.assert_allclose(np.add(hist["train_output_loss"], hist["train_intermediate_loss"]),
                               losses, rtol=1e-6)
    assert hist["val_accuracy"][-1] > 0.9
    assert hist["val_loss"][-1] < hist["val_loss"][0]
    assert 0 < hist.strategy_seconds <= hist.total_seconds


def test_label_only_baseline_uses_cross_entropy(rng):
    x, y = blobs(rng, n=60)
    student = tiny_mlp(seed=1)
    d = Distiller(student, epochs=1, batch_size=60, shuffle=False)
    out = student.predict(x)
    ce = float(np.mean(np.log(np.exp(out).sum(1)) - out[np.arange(60), y]))
    hist = d.fit(x, y)
    np.testing.assert_allclose(hist["train_loss"][0], ce, rtol=1e-10)
    with pytest.raises(ValueError, match="needs labels"):
        Distiller(tiny_mlp()).fit(x)


def test_seeded_shuffling_is_reproducible(rng):
    x, y = blobs(rng, n=50)
    teacher = tiny_mlp(seed=4)

    def train(seed):
        student = tiny_mlp(seed=0)
        d = Distiller(student, teacher, FeatureMSE(["h1"]), epochs=3, batch_size=8, seed=seed,
                      progress=False)
        return d.fit(x, y), student

    (h1, s1), (h2, s2), (_, s3) = train(5), train(5), train(6)
    assert h1["train_loss"] == h2["train_loss"]
    for k, p in s1.parameters.items():
        np.testing.assert_array_equal(p, s2.parameters[k])
    assert not np.array_equal(s1.parameters["h1.W"], s3.parameters["h1.W"])


def test_batches_are_a_fresh_permutation_each_epoch(rng):
    x = np.arange(20, dtype=np.float64).reshape(20, 1)
    y = np.zeros(20, np.int64)

    class Recorder(StubStudent):
        def __init__(self):
            self.rows = []

        def forward(self, xb, collect=()):
            self.rows.extend(np.asarray(xb)[:, 0].astype(int).tolist())
            return super().forward(xb, collect)

    rec = Recorder()
    Distiller(rec, epochs=2, batch_size=6, seed=3).fit(x, y)
    e1, e2 = rec.rows[:20], rec.rows[20:]
    assert sorted(e1) == list(range(20)) and sorted(e2) == list(range(20))
    assert e1 != e2 and e1 != list(range(20))
    rec2 = Recorder()
    Distiller(rec2, epochs=1, batch_size=6, shuffle=False).fit(x, y)
    assert rec2.rows == list(range(20))


class ScriptedStudent(StubStudent):
    """A student whose validation loss follows a script, one value per epoch."""

    def __init__(self, val_losses):
        self.val_losses = val_losses
        self.epoch = 0
        self.loaded = None

    def predict(self, x):
        # cross-entropy of logits (0, z) on class 0 is log(1 + e^z): pick z for the script
        target = self.val_losses[self.epoch]
        self.epoch += 1
        z = np.log(np.expm1(target))
        return np.tile([0.0, z], (len(x), 1))

    def state_dict(self):
        return {"epoch": self.epoch - 1}

    def load_state_dict(self, state):
        self.loaded = state


def test_early_stopping_stops_and_restores_the_best_epoch():
    x, y = np.zeros((8, 1)), np.zeros(8, np.int64)
    script = [1.0, 0.8, 0.5, 0.6, 0.7, 0.9, 1.1, 1.2]
    s = ScriptedStudent(script)
    d = Distiller(s, epochs=8, batch_size=4,
                  early_stopping=EarlyStopping("val_loss", patience=2))
    hist = d.fit(x, y, validation=(x, y))
    assert hist.stopped_early and len(hist) == 5 and hist.best_epoch == 2
    np.testing.assert_allclose(hist["val_loss"], script[:5], rtol=1e-12)
    assert s.loaded == {"epoch": 2}
    # min_delta: 0.8 -> 0.5 is an improvement, 1.0 -> 0.95 is not with min_delta 0.1
    s2 = ScriptedStudent([1.0, 0.95, 0.92, 0.5])
    hist2 = Distiller(s2, epochs=4, batch_size=8, early_stopping=EarlyStopping(
        "val_loss", patience=2, min_delta=0.1, restore_best=False)).fit(x, y, validation=(x, y))
    assert hist2.stopped_early and len(hist2) == 3 and hist2.best_epoch == 0 and s2.loaded is None
    with pytest.raises(ValueError, match="no validation"):
        Distiller(ScriptedStudent(script), early_stopping=EarlyStopping()).fit(x, y)
    with pytest.raises(ValueError, match="monitor"):
        EarlyStopping("accuracy")


def test_callback_can_stop_training(rng):
    x, y = blobs(rng, n=20)
    seen = []
    hist = Distiller(tiny_mlp(), epochs=10).fit(
        x, y, callback=lambda epoch, m: seen.append(epoch) or epoch == 2)
    assert seen == [0, 1, 2] and len(hist) == 3


# -- the teacher cache --------------------------------------------------------------------------
def test_teacher_cache_round_trip_skips_the_teacher(tmp_path, rng):
    x, y = blobs(rng, n=40)
    teacher = CountingTeacher(tiny_mlp(seed=9))
    kw = dict(epochs=2, batch_size=8, cache=tmp_path / "cache", progress=False)
    d1 = Distiller(tiny_mlp(seed=1), teacher, FeatureMSE(["h2"]), **kw)
    h1 = d1.fit(x, y)
    assert teacher.calls == 1 and h1.teacher_cache_hit is False  # offline: once, not per epoch
    files = list((tmp_path / "cache").glob("teacher-*.npz"))
    assert len(files) == 1
    d2 = Distiller(tiny_mlp(seed=1), teacher, FeatureMSE(["h2"]), **kw)
    h2 = d2.fit(x, y)
    assert teacher.calls == 1 and h2.teacher_cache_hit is True
    assert h1["train_loss"] == h2["train_loss"]
    direct = run_teacher(teacher.model, x, ("h2",))
    cached = TeacherCache(tmp_path / "cache").get(teacher, x, ("h2",))
    np.testing.assert_array_equal(cached.outputs, direct.outputs)
    np.testing.assert_array_equal(cached.activations["h2"], direct.activations["h2"])
    calls = teacher.calls
    # other layers, other data, or a changed teacher: a miss
    TeacherCache(tmp_path / "cache").get(teacher, x, ("h1",))
    TeacherCache(tmp_path / "cache").get(teacher, x[:-1], ("h2",))
    teacher.model.weights[0][0, 0] += 1.0
    TeacherCache(tmp_path / "cache").get(teacher, x, ("h2",))
    assert teacher.calls == calls + 3


def test_teacher_cache_recovers_from_a_damaged_file(tmp_path, rng):
    x, _ = blobs(rng, n=10)
    teacher = CountingTeacher(tiny_mlp(seed=9))
    cache = TeacherCache(tmp_path)
    first = cache.get(teacher, x, ("h1",))
    path = cache.path(cache.key(x, ("h1",), teacher))
    with open(path, "wb") as f:
        f.write(b"not a zip file")
    with pytest.warns(UserWarning, match="unreadable"):
        again = TeacherCache(tmp_path).get(teacher, x, ("h1",))
    assert teacher.calls == 2
    np.testing.assert_array_equal(first.outputs, again.outputs)
    assert cache.clear() == 1


def test_online_mode_runs_the_teacher_every_batch(rng):
    x, y = blobs(rng, n=24)
    teacher = CountingTeacher(tiny_mlp(seed=9))
    Distiller(tiny_mlp(), teacher, DistillationLoss(), epochs=2, batch_size=8,
              offline=False).fit(x, y)
    assert teacher.calls == 2 * 3


def test_precomputed_teacher_outputs_are_accepted(rng):
    x, y = blobs(rng, n=24)
    teacher = tiny_mlp(seed=9)
    pre = run_teacher(teacher, x, ("h2",), batch_size=5)
    h_pre = Distiller(tiny_mlp(), pre, FeatureMSE(["h2"]), epochs=2, batch_size=8).fit(x, y)
    h_live = Distiller(tiny_mlp(), teacher, FeatureMSE(["h2"]), epochs=2, batch_size=8).fit(x, y)
    np.testing.assert_allclose(h_pre["train_loss"], h_live["train_loss"], rtol=1e-12)
    with pytest.raises(ValueError, match="aligned"):
        Distiller(tiny_mlp(), pre, FeatureMSE(["h2"])).fit(x[:10], y[:10])
    with pytest.raises(ValueError, match="lack the layer"):
        Distiller(tiny_mlp(), pre, FeatureMSE(["h1"]))
    with pytest.raises(ValueError, match="rows"):
        TeacherOutputs(np.zeros((3, 2)), IntermediateActivations(h=np.zeros((4, 2))))


def test_distiller_validates_its_arguments(rng):
    class ForwardOnly:
        def forward(self, x, collect=()):
            return x, IntermediateActivations()

        def predict(self, x):
            return x

    with pytest.raises(TypeError, match="lacks backward, step"):
        Distiller(ForwardOnly())
    with pytest.raises(ValueError, match="needs a teacher"):
        Distiller(tiny_mlp(), None, DistillationLoss())
    with pytest.raises(ValueError, match=r"layer\(s\) \['h9'\]"):
        Distiller(tiny_mlp(), tiny_mlp(), FeatureMSE(["h9"]))
    with pytest.raises(TypeError, match="loss_and_gradient"):
        Distiller(tiny_mlp(), tiny_mlp(), object())
    with pytest.raises(ValueError, match="class indices"):
        Distiller(tiny_mlp()).fit(np.zeros((4, 6)), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="batch_size"):
        Distiller(tiny_mlp(), batch_size=0)


# -- the kdnumba strategies, as far as this build has them ---------------------------------------
def _real_strategies():
    from kdnumba import demo
    from kdnumba.demo import DemoConfig, Unavailable
    # weights large enough that the intermediate terms weigh in the check
    cfg = DemoConfig(selectivity_weight=0.5, contrastive_weight=0.5, relational_weight=0.5)
    out = []
    for name in demo.DEFAULT_STRATEGIES:
        try:
            # labels: CRD's memory rows and sampler (the 12 rows of the check below)
            out.append(pytest.param(demo.build_strategy(name, cfg, labels=np.arange(12) % 3),
                                    id=name))
        except Unavailable as exc:
            out.append(pytest.param(None, id=name, marks=pytest.mark.skip(
                reason=f"{name}: {exc} (built by another family)")))
    return out


@pytest.mark.parametrize("strategy", _real_strategies())
def test_loop_gradient_with_each_kdnumba_strategy(strategy, rng):
    """Each bundled strategy, plugged into the loop, gives the MLP the gradient of
    the loss the loop reports (finite differences in float64)."""
    from kdnumba.demo import EMBEDDING_LAYER
    sizes = (6, 5, 4, 3)
    names = ["h1", EMBEDDING_LAYER, "logits"]
    x, y = blobs(rng, n=12)
    teacher = MLP(list(sizes), layer_names=names, seed=3, dtype=np.float64)
    student = jitter_biases(MLP(list(sizes), layer_names=names, seed=4, dtype=np.float64), rng)
    d = Distiller(student, teacher, strategy)
    t_out, t_acts = teacher.forward(x, collect=d.layers)
    losses, analytic, numeric = loop_gradients(d, x, y, t_out, t_acts)
    if d.layers:
        assert d.layers == (EMBEDDING_LAYER,)
        assert losses.intermediate_loss > 0 and EMBEDDING_LAYER in losses.intermediate_grads
    for name in analytic:
        np.testing.assert_allclose(analytic[name], numeric[name], rtol=1e-5, atol=1e-7,
                                   err_msg=name)


def test_progress_bar_shows_with_tqdm_and_falls_back_silently_without(rng, capsys, monkeypatch):
    x, y = blobs(rng, n=16)
    pytest.importorskip("tqdm", reason="tqdm not installed: the bar itself cannot be checked")
    Distiller(tiny_mlp(), epochs=3, batch_size=8, progress=True).fit(x, y)
    assert "training:" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "tqdm.auto", None)  # import fails
    hist = Distiller(tiny_mlp(), epochs=3, batch_size=8, progress=True).fit(x, y)
    assert len(hist) == 3 and capsys.readouterr().err == ""


# -- nothing lost: divergence, checks before training, checkpoints ---------------------------
class NaNAt(FeatureMSE):
    """FeatureMSE whose output gradient turns NaN at one (epoch, batch)."""

    def __init__(self, epoch, batch, n_batches, layer_names=("h2",)):
        super().__init__(layer_names)
        self.when, self.n_batches, self.calls = epoch * n_batches + batch, n_batches, 0

    def loss_and_gradient(self, s, t, labels=None):
        loss, grad = super().loss_and_gradient(s, t, labels)
        self.calls += 1
        if self.calls - 1 == self.when:
            grad = grad.copy()
            grad[0, 0] = np.nan
        return loss, grad


def test_nan_mid_training_stops_naming_epoch_and_batch_and_restores_the_best(rng):
    x, y = blobs(rng, n=24)
    teacher = tiny_mlp(seed=9)
    student = tiny_mlp(seed=1)
    states = []
    d = Distiller(student, teacher, NaNAt(epoch=3, batch=1, n_batches=3), epochs=6,
                  batch_size=8, early_stopping=EarlyStopping("val_loss", patience=5))
    with pytest.raises(FloatingPointError, match=r"epoch 3, batch 1 .*gradient.* nan") as err:
        d.fit(x, y, validation=(x, y), callback=lambda e, m: states.append(student.state_dict()))
    assert (err.value.epoch, err.value.batch) == (3, 1)
    hist = d.history  # the completed epochs, consistent with the restored weights
    assert len(hist) == 3 and hist.best_epoch == int(np.argmin(hist["val_loss"]))
    for k, p in student.parameters.items():
        assert np.isfinite(p).all(), k
        np.testing.assert_array_equal(p, states[hist.best_epoch][k], err_msg=k)


def test_nan_loss_stops_before_updating_the_student(rng):
    x, y = blobs(rng, n=16)

    class NaNLoss(FeatureMSE):
        def intermediate_loss_and_gradient(self, s_acts, t_acts):
            loss, grads = super().intermediate_loss_and_gradient(s_acts, t_acts)
            return float("nan"), grads

    student = tiny_mlp(seed=1)
    before = student.state_dict()
    with pytest.raises(FloatingPointError, match=r"epoch 0, batch 0 .*intermediate loss is nan"):
        Distiller(student, tiny_mlp(seed=9), NaNLoss(["h2"]), epochs=3, batch_size=8).fit(x, y)
    for k, p in student.parameters.items():
        np.testing.assert_array_equal(p, before[k], err_msg=k)


def test_label_and_validation_checks_happen_before_training(rng):
    x, y = blobs(rng, n=24)  # 3 classes
    epochs_run = []

    def fit(student=None, **kw):
        student = student if student is not None else tiny_mlp(seed=1)
        d = Distiller(student, epochs=50, batch_size=8)
        return d.fit(x, kw.pop("y", y), callback=lambda e, m: epochs_run.append(e), **kw)

    cases = [
        (dict(validation=(x, y + 5)), r"validation y_val holds class index 7.* 3 outputs"),
        (dict(validation=(x[:0], y[:0])), r"validation x_val is empty"),
        (dict(validation=(x, y[:-1])), r"validation y_val must be class indices of shape"),
        (dict(validation=(x, -y - 1)), r"validation y_val must be non-negative"),
        (dict(y=np.where(y == 0, 3, y)), r"^y holds class index 3"),
        (dict(validation=(np.full_like(x, np.nan), y)), r"validation x_val contains NaN"),
        (dict(validation=(x, np.eye(4)[y])), r"same kind as y"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            fit(**kw)
    x_bad = x.copy()
    x_bad[5, 2] = np.inf
    with pytest.raises(ValueError, match=r"^x contains NaN or inf \(first in row 5\)"):
        Distiller(tiny_mlp()).fit(x_bad, y)
    # a student that does not declare its outputs: checked on the first forward, before
    # the first update
    stub = StubStudent()  # 2 outputs
    stub.step = lambda: epochs_run.append("step")
    with pytest.raises(ValueError, match=r"validation y_val holds class index 2.* 2 outputs"):
        fit(stub, y=np.zeros(24, np.int64), validation=(x, y))
    assert epochs_run == []


def _resumable(student, **kw):
    return Distiller(student, tiny_mlp(seed=9), FeatureMSE(["h2"]), batch_size=8, seed=4,
                     progress=False, **kw)


def test_checkpoint_resume_continues_exactly(tmp_path, rng):
    x, y = blobs(rng, n=30)
    es = dict(early_stopping=EarlyStopping("val_accuracy", patience=20))
    whole_student = tiny_mlp(seed=1)
    whole = _resumable(whole_student, **es).fit(x, y, validation=(x, y), epochs=5)
    ckpt = tmp_path / "runs" / "a.npz"  # the folder is created
    first = _resumable(tiny_mlp(seed=1), **es).fit(x, y, validation=(x, y), epochs=2,
                                                    checkpoint=ckpt)
    assert len(first) == 2 and ckpt.exists()
    student = tiny_mlp(seed=5)
    hist = _resumable(student, **es).fit(x, y, validation=(x, y), epochs=5, checkpoint=ckpt,
                                         resume=True)
    assert len(hist) == 5 and hist.best_epoch == whole.best_epoch
    for metric in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert hist[metric] == whole[metric], metric
    for k, p in whole_student.parameters.items():
        np.testing.assert_array_equal(student.parameters[k], p, err_msg=k)
    np.testing.assert_array_equal(student._m[0], whole_student._m[0])  # Adam state too
    # a finished run resumes to its history at once, without training
    again = tiny_mlp(seed=6)
    done = _resumable(again).fit(x, y, validation=(x, y), epochs=5, checkpoint=ckpt,
                                 resume=True, callback=lambda e, m: pytest.fail("trained"))
    assert done["train_loss"] == whole["train_loss"]
    # resume=True without a checkpoint file: a fresh start
    folder = str(tmp_path / "dir") + os.sep  # a trailing separator names a folder
    fresh = _resumable(tiny_mlp(seed=1)).fit(x, y, epochs=1, checkpoint=folder, resume=True)
    assert len(fresh) == 1 and (tmp_path / "dir" / "distiller-checkpoint.npz").exists()


def test_checkpoint_errors_are_clear(tmp_path, rng):
    x, y = blobs(rng, n=16)
    ckpt = tmp_path / "c.npz"
    _resumable(tiny_mlp(seed=1)).fit(x, y, epochs=1, checkpoint=ckpt)
    with pytest.raises(ValueError, match=r"belongs to another run .*data, labels"):
        _resumable(tiny_mlp()).fit(x[::-1], y[::-1], epochs=2, checkpoint=ckpt, resume=True)
    with pytest.raises(ValueError, match=r"belongs to another run .*batch_size"):
        Distiller(tiny_mlp(), tiny_mlp(seed=9), FeatureMSE(["h2"]), batch_size=4,
                  seed=4).fit(x, y, epochs=2, checkpoint=ckpt, resume=True)
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(ValueError, match="unreadable"):
        _resumable(tiny_mlp()).fit(x, y, epochs=2, checkpoint=ckpt, resume=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match="cannot write"):
        _resumable(tiny_mlp()).fit(x, y, epochs=2, checkpoint=tmp_path / "file" / "c.npz")
    with pytest.raises(ValueError, match="resume=True needs checkpoint"):
        _resumable(tiny_mlp()).fit(x, y, resume=True)
    with pytest.raises(TypeError, match="state_dict"):
        Distiller(StubStudent(), epochs=1).fit(x, np.zeros(16, np.int64), checkpoint=ckpt)


def test_failed_checkpoint_write_warns_and_keeps_the_previous(tmp_path, rng, monkeypatch):
    from kdnumba.training import _atomic
    x, y = blobs(rng, n=16)
    ckpt = tmp_path / "c.npz"
    real, calls = _atomic.atomic_write, []

    def full_disk_after_two(path, write):
        calls.append(path)
        if len(calls) > 2:
            raise OSError(28, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(_atomic, "atomic_write", full_disk_after_two)
    with pytest.warns(UserWarning, match=r"could not write the checkpoint") as record:
        hist = _resumable(tiny_mlp(seed=1)).fit(x, y, epochs=4, checkpoint=ckpt)
    assert len(hist) == 4
    assert ["after epoch 2" in str(w.message) for w in record] == [True, False]
    from kdnumba.training.checkpoint import load_checkpoint
    assert load_checkpoint(ckpt).epoch == 2
