"""The Keras checks, run by tests/test_keras.py in one subprocess per backend.

    KERAS_BACKEND=jax python tests/keras_checks.py  ->  one JSON report on stdout

Keras fixes its backend when imported (and defaults to TensorFlow, absent
here), so each backend needs its own process; one process checks everything
for its backend, because importing JAX/PyTorch and compiling the train step
dominate the time. Every check is recorded (not raised) so one failure does
not hide the others; the pytest side asserts on the report.

The references are written in ``keras.ops`` only (no kdnumba, no NumPy
maths), from the papers' / reference code's formulas.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
import zlib

import numpy as np

START = time.perf_counter()
import keras  # noqa: E402

import kdnumba.keras as kdk  # noqa: E402

ops = keras.ops
BACKEND = keras.backend.backend()
EPS = 1e-12
REPORT: dict = {"backend": BACKEND, "included": list(kdk.INCLUDED),
                "excluded": dict(kdk.EXCLUDED), "checks": []}


def record(kind: str, name: str, fn):
    """Run one check; store ``ok`` and the failure's traceback."""
    began = time.perf_counter()
    try:
        detail = fn()
        REPORT["checks"].append({"kind": kind, "name": name, "ok": True, "detail": detail,
                                 "seconds": time.perf_counter() - began})
    except Exception:  # noqa: BLE001 - reported, asserted by pytest
        REPORT["checks"].append({"kind": kind, "name": name, "ok": False,
                                 "detail": traceback.format_exc()})


def num(x) -> float:
    """A 0-d backend tensor (that may require grad) as a Python float."""
    return float(ops.convert_to_numpy(x))


# --- keras.ops references ------------------------------------------------------

def _normalize(x, axis=-1):
    n = ops.sqrt(ops.sum(x * x, axis=axis, keepdims=True))
    return x / ops.maximum(n, EPS)


def _flat(x):
    return ops.reshape(x, (ops.shape(x)[0], -1))


def _nchw(x):  # channels_last (B, H, W, C) -> (B, C, H, W)
    return ops.transpose(x, (0, 3, 1, 2))


def ref_kd(t, s, temperature=3.0):
    T = temperature
    ls, lt = ops.log_softmax(s / T, axis=-1), ops.log_softmax(t / T, axis=-1)
    return T * T * ops.mean(ops.sum(ops.exp(lt) * (lt - ls), axis=-1))


def ref_dkd(t, s, alpha=1.0, beta=8.0, temperature=4.0):
    T = temperature
    n, c = ops.shape(s)
    gt = ops.one_hot(ops.argmax(t, axis=-1), c, dtype=s.dtype)
    p_s, p_t = ops.softmax(s / T, axis=-1), ops.softmax(t / T, axis=-1)
    b_s = ops.stack([ops.sum(p_s * gt, 1), ops.sum(p_s * (1 - gt), 1)], axis=1)
    b_t = ops.stack([ops.sum(p_t * gt, 1), ops.sum(p_t * (1 - gt), 1)], axis=1)
    tckd = ops.sum(b_t * (ops.log(b_t) - ops.log(b_s)))
    ls = ops.log_softmax(s / T - 1000.0 * gt, axis=-1)
    lt = ops.log_softmax(t / T - 1000.0 * gt, axis=-1)
    nckd = ops.sum(ops.exp(lt) * (lt - ls))
    return T * T / n * (alpha * tckd + beta * nckd)


def _pearson(a, b):
    a = a - ops.mean(a, axis=1, keepdims=True)
    b = b - ops.mean(b, axis=1, keepdims=True)
    na = ops.sqrt(ops.sum(a * a, axis=1))
    nb = ops.sqrt(ops.sum(b * b, axis=1))
    return ops.sum(a * b, axis=1) / (na * nb + 1e-8)


def ref_dist(t, s, beta=1.0, gamma=1.0, temperature=1.0):
    T = temperature
    ys, yt = ops.softmax(s / T, axis=-1), ops.softmax(t / T, axis=-1)
    inter = 1 - ops.mean(_pearson(ys, yt))
    intra = 1 - ops.mean(_pearson(ops.transpose(ys), ops.transpose(yt)))
    return T * T * (beta * inter + gamma * intra)


def ref_mse(t, s):
    return ops.mean((s - t) ** 2)


def ref_at(t, s, p=2):  # RepDistiller: normalize(mean_c f^p) flattened; maps channels_last
    def at(f):
        return _normalize(_flat(ops.mean(f ** p, axis=-1)))
    return ops.mean((at(s) - at(t)) ** 2)


def _cross_entropy_diag(logits):
    return -ops.mean(ops.diagonal(ops.log_softmax(logits, axis=-1)))


def ref_nt_xent(t, s, temperature=0.07):
    return _cross_entropy_diag(ops.matmul(_normalize(s), ops.transpose(_normalize(t)))
                               / temperature)


def ref_info_nce(t, s, temperature=0.07):
    return _cross_entropy_diag(ops.matmul(_normalize(t), ops.transpose(_normalize(s)))
                               / temperature)


def _smooth_l1(x):
    ax = ops.abs(x)
    return ops.where(ax < 1, 0.5 * x * x, ax - 0.5)


def ref_rkd(t, s, distance_weight=25.0, angle_weight=50.0):
    n = ops.shape(s)[0]
    off = 1.0 - ops.eye(n, dtype=s.dtype)

    def pdist(e):  # RepDistiller: Gram expansion, clamp 1e-12, zero diagonal
        sq = ops.sum(e * e, axis=1)
        q = sq[:, None] + sq[None, :] - 2 * ops.matmul(e, ops.transpose(e))
        d = ops.sqrt(ops.maximum(q, EPS)) * off
        return d / (ops.sum(d) / ops.sum(off))

    def angles(e):
        diff = e[None, :, :] - e[:, None, :]
        # rows a == b differ by exactly 0: give them norm 1 (u = 0 either way),
        # so autodiff does not take sqrt'(0)
        sq = ops.sum(diff * diff, axis=2) + (1.0 - off)
        u = diff / ops.maximum(ops.sqrt(sq), EPS)[:, :, None]
        return ops.matmul(u, ops.transpose(u, (0, 2, 1)))

    return (distance_weight * ops.mean(_smooth_l1(pdist(s) - pdist(t)))
            + angle_weight * ops.mean(_smooth_l1(angles(s) - angles(t))))


def ref_sp(t, s):
    b = ops.shape(s)[0]

    def gram(f):
        f = _flat(f)
        return _normalize(ops.matmul(f, ops.transpose(f)))

    return ops.sum((gram(s) - gram(t)) ** 2) / (b * b)


def ref_pkt(t, s, eps=1e-7):
    def kernel(x):
        x = _flat(x)
        x = x / (ops.sqrt(ops.sum(x * x, axis=1, keepdims=True)) + eps)
        k = (ops.matmul(x, ops.transpose(x)) + 1.0) / 2.0
        return k / ops.sum(k, axis=1, keepdims=True)

    p_s, p_t = kernel(s), kernel(t)
    return ops.mean(p_t * ops.log((p_t + eps) / (p_s + eps)))


def ref_nst(t, s):
    def channels(f):  # (B, C, HW), each channel's map L2-normalised
        f = _nchw(f)
        return _normalize(ops.reshape(f, (ops.shape(f)[0], ops.shape(f)[1], -1)))

    def k(a, b):
        return ops.mean(ops.matmul(a, ops.transpose(b, (0, 2, 1))) ** 2)

    fs, ft = channels(s), channels(t)
    return k(ft, ft) + k(fs, fs) - 2 * k(fs, ft)


def ref_hcl(t, s):  # maps channels_last (B, H, W, C), H and W divisible by the levels
    b, h, w, c = ops.shape(s)

    def pool(f, level):
        f = ops.reshape(f, (b, level, h // level, level, w // level, c))
        return ops.mean(f, axis=(2, 4))

    loss, cnt, tot = ref_mse(t, s), 1.0, 1.0
    for level in (4, 2, 1):
        if level >= h:
            continue
        cnt /= 2.0
        loss = loss + ref_mse(pool(t, level), pool(s, level)) * cnt
        tot += cnt
    return loss / tot


def ref_selectivity(t, s, weight=1.0):  # metric="variance"
    def sel(a):
        a = _flat(a)
        return ops.mean((a - ops.mean(a, axis=0)) ** 2, axis=0)

    return weight * ops.mean((sel(s) - sel(t)) ** 2)


# (class, options, reference, reference options, student shape, teacher shape)
LOGITS, EMB, EMB_T, FEAT, MAP = (16, 7), (12, 4), (12, 9), (12, 6), (4, 4, 4, 3)
CASES = {
    "kd_loss": (kdk.LogitsDistillation, {"temperature": 4.0}, ref_kd, {"temperature": 4.0},
                LOGITS, LOGITS),
    "dkd_loss": (kdk.DKDDistillation, {"alpha": 0.5, "beta": 2.0, "temperature": 2.0}, ref_dkd,
                 {"alpha": 0.5, "beta": 2.0, "temperature": 2.0}, LOGITS, LOGITS),
    "dist_loss": (kdk.DISTDistillation, {"temperature": 4.0, "beta": 2.0, "gamma": 0.5},
                  ref_dist, {"temperature": 4.0, "beta": 2.0, "gamma": 0.5}, LOGITS, LOGITS),
    "feature_loss": (kdk.FitNetsDistillation, {}, ref_mse, {}, FEAT, FEAT),
    "attention_transfer": (kdk.AttentionTransferDistillation, {}, ref_at, {}, MAP, (4, 4, 4, 5)),
    "attention_map_loss": (kdk.AttentionMapDistillation, {}, ref_mse, {}, FEAT, FEAT),
    "nt_xent": (kdk.NTXentDistillation, {"temperature": 0.2}, ref_nt_xent,
                {"temperature": 0.2}, FEAT, FEAT),
    "info_nce": (kdk.InfoNCEDistillation, {"temperature": 0.2}, ref_info_nce,
                 {"temperature": 0.2}, FEAT, FEAT),
    "rkd_loss": (kdk.RKDDistillation, {}, ref_rkd, {}, EMB, EMB_T),
    "sp_loss": (kdk.SPDistillation, {}, ref_sp, {}, EMB, EMB_T),
    "pkt_loss": (kdk.PKTDistillation, {}, ref_pkt, {}, EMB, EMB_T),
    "nst_loss": (kdk.NSTDistillation, {}, ref_nst, {}, MAP, (4, 4, 4, 5)),
    "hcl_loss": (kdk.HCLDistillation, {}, ref_hcl, {}, MAP, MAP),
    "selectivity_loss": (kdk.SelectivityDistillation, {"weight": 0.5}, ref_selectivity,
                         {"weight": 0.5}, FEAT, FEAT),
}


# --- backend autodiff for the gradient comparison ---------------------------------

def value_and_grad(fn, s):
    """``(fn(s), d fn / d s)`` by the backend's autodiff, as NumPy."""
    if BACKEND == "jax":
        import jax
        # jitted: one compilation instead of one per eager op
        v, g = jax.jit(jax.value_and_grad(fn))(ops.convert_to_tensor(s))
        return float(v), np.asarray(g)
    import torch
    x = torch.tensor(s, requires_grad=True)
    v = fn(x)
    v.backward()
    return float(v.detach()), x.grad.numpy()


def check_value(name):
    cls, options, ref, ref_options, s_shape, t_shape = CASES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    s = rng.standard_normal(s_shape).astype(np.float32)
    t = rng.standard_normal(t_shape).astype(np.float32)
    s_before, t_before = s.copy(), t.copy()
    loss = cls(**options)
    tt = ops.convert_to_tensor(t)
    ours, g_ours = value_and_grad(lambda x: loss.compute_loss(tt, x), s)
    theirs, g_ref = value_and_grad(lambda x: ref(tt, x, **ref_options), s)
    assert abs(ours - theirs) <= 1e-5 * max(1.0, abs(theirs)), (ours, theirs)
    scale = float(np.abs(g_ref).max())
    err = float(np.abs(g_ours - g_ref).max())
    assert err <= 1e-4 * scale + 1e-7, f"gradient max error {err} (max |g| {scale})"
    assert np.array_equal(s, s_before) and np.array_equal(t, t_before), "inputs modified"
    return {"loss": ours, "reference": theirs, "grad_max_err": err, "grad_scale": scale}


# --- one Distiller with every loss --------------------------------------------------

def models():
    """Teacher and student with distinctly shaped named layers, so the shape
    each loss receives shows which layer it read."""
    def build(prefix, emb):
        x = keras.Input((8,))
        e = keras.layers.Dense(emb, activation="tanh", name=f"{prefix}_emb")(x)
        f = keras.layers.Dense(6, activation="tanh", name=f"{prefix}_feat")(x)
        m = keras.layers.Reshape((4, 4, 3), name=f"{prefix}_map")(
            keras.layers.Dense(48, activation="tanh")(x))
        h = keras.layers.Concatenate()([e, f, keras.layers.Flatten()(m)])
        return keras.Model(x, keras.layers.Dense(5, name="logits")(h), name=f"{prefix}_model")

    keras.utils.set_random_seed(0)
    return build("t", 9), build("s", 4)


LAYERS = {  # loss -> (teacher layer, student layer); None: the outputs
    "kd_loss": None, "dkd_loss": None, "dist_loss": None,
    "feature_loss": ("t_feat", "s_feat"), "selectivity_loss": ("t_feat", "s_feat"),
    "nt_xent": ("t_feat", "s_feat"), "info_nce": ("t_feat", "s_feat"),
    "attention_map_loss": ("t_feat", "s_feat"),
    "rkd_loss": ("t_emb", "s_emb"), "sp_loss": ("t_emb", "s_emb"), "pkt_loss": ("t_emb", "s_emb"),
    "attention_transfer": ("t_map", "s_map"), "nst_loss": ("t_map", "s_map"),
    "hcl_loss": ("t_map", "s_map"),
}


def distillation_losses():
    out = []
    for name in kdk.INCLUDED:
        cls, options = CASES[name][:2]
        layers = LAYERS[name]
        kw = {} if layers is None else {"teacher_layer_name": layers[0],
                                        "student_layer_name": layers[1]}
        out.append(cls(**options, **kw))
    return out


def check_distiller():
    teacher, student = models()
    losses = distillation_losses()
    seen: dict = {}
    for loss in losses:  # record the shapes each loss receives (at trace time under jit)
        def spy(t, s, _loss=loss, _original=loss.compute_loss, **kw):
            seen[_loss.loss] = [list(ops.shape(t)), list(ops.shape(s))]
            return _original(t, s, **kw)
        loss.compute_loss = spy
    weights = [0.1 + 0.05 * i for i in range(len(losses))]
    distiller = keras.distillation.Distiller(teacher, student, losses,
                                             distillation_loss_weights=weights,
                                             student_loss_weight=0.3)
    distiller.compile(optimizer=keras.optimizers.SGD(0.05),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    y = rng.integers(0, 5, 64)
    t_before = [np.array(w) for w in teacher.get_weights()]
    s_before = [np.array(w) for w in student.get_weights()]
    history = distiller.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    result = {"history": {k: [float(v) for v in vals] for k, vals in history.items()},
              "seen": seen}

    assert all(np.isfinite(v).all() for v in history.values()), history
    unchanged = [i for i, (a, b) in enumerate(zip(s_before, student.get_weights()))
                 if np.array_equal(a, b)]
    assert not unchanged, f"student weights {unchanged} did not change"
    changed = [i for i, (a, b) in enumerate(zip(t_before, teacher.get_weights()))
               if not np.array_equal(a, b)]
    assert not changed, f"teacher weights {changed} changed"
    result["student_changed"] = True
    dims = {"t_emb": [9], "s_emb": [4], "t_feat": [6], "s_feat": [6], "t_map": [4, 4, 3],
            "s_map": [4, 4, 3]}
    for name in kdk.INCLUDED:
        layers = LAYERS[name]
        want = [[5], [5]] if layers is None else [dims[layers[0]], dims[layers[1]]]
        got_shapes = [shape[1:] for shape in seen[name]]
        assert got_shapes == want, f"{name} read {got_shapes}, expected {want}"
    result["teacher_unchanged"] = True

    # the layers each loss read, by value: the Distiller's loss on a batch
    # equals the references on the features extracted here
    def features(model, names):
        return keras.Model(model.inputs, [model.get_layer(n).output for n in names])

    xb, yb = x[:16], y[:16]
    t_names = ["t_emb", "t_feat", "t_map"]
    s_names = ["s_emb", "s_feat", "s_map"]
    t_feats = dict(zip(t_names, features(teacher, t_names)(xb)))
    s_feats = dict(zip(s_names, features(student, s_names)(xb)))
    t_out, s_out = teacher(xb), student(xb)
    distill = 0.0
    for name, w in zip(kdk.INCLUDED, weights):
        _, _, ref, ref_options, _, _ = CASES[name]
        layers = LAYERS[name]
        tt, ss = (t_out, s_out) if layers is None else (t_feats[layers[0]], s_feats[layers[1]])
        distill += w * num(ref(tt, ss, **ref_options))
    hard = num(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(yb, s_out))
    expected = 0.3 * hard + 0.7 * distill
    got = num(distiller.compute_loss(x=xb, y=yb, y_pred=s_out, training=False))
    assert abs(got - expected) <= 1e-5 * max(1.0, abs(expected)), (got, expected)
    result["compute_loss"] = [got, expected]

    # save / load round trip
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "distiller.keras")
        distiller.save(path)
        loaded = keras.saving.load_model(path)
    assert [type(a) for a in loaded.distillation_losses] == [type(a) for a in losses]
    assert [a.get_config() for a in loaded.distillation_losses] == [
        a.get_config() for a in losses]
    np.testing.assert_allclose(ops.convert_to_numpy(loaded.student(xb)), ops.convert_to_numpy(s_out), rtol=1e-6, atol=1e-6)
    loaded.compile(optimizer="sgd",
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    again = num(loaded.compute_loss(x=xb, y=yb, y_pred=loaded(xb), training=False))
    assert abs(again - got) <= 1e-5 * max(1.0, abs(got)), (again, got)
    result["reloaded_compute_loss"] = again
    return result


def check_errors():
    """Bad configuration raises a clear error at construction."""
    began = time.perf_counter()
    cases = [
        (lambda: kdk.LogitsDistillation(temperature=0), ValueError, "temperature"),
        (lambda: kdk.LogitsDistillation(temperature=-1.0), ValueError, "temperature"),
        (lambda: kdk.DKDDistillation(beta="x"), TypeError, "beta"),
        (lambda: kdk.LogitsDistillation(tempreature=2.0), TypeError, "tempreature"),
        (lambda: kdk.KDNumbaDistillation("no_such_loss"), ValueError, "no_such_loss"),
        (lambda: kdk.KDNumbaDistillation("triplet_loss"), ValueError, "labels"),
        (lambda: kdk.FitNetsDistillation(student_layer_name="s_feat"), ValueError,
         "teacher_layer_name"),
        (lambda: kdk.FitNetsDistillation(teacher_layer_name=3), TypeError, "teacher_layer_name"),
        (lambda: kdk.NSTDistillation(data_format="nchw"), ValueError, "data_format"),
    ]
    for make, error, word in cases:
        try:
            make()
        except error as exc:
            assert word in str(exc), (word, str(exc))
        else:
            raise AssertionError(f"no {error.__name__} mentioning {word}")
    REPORT["errors_config_s"] = time.perf_counter() - began
    teacher, student = models()
    try:
        keras.distillation.Distiller(teacher, student, kdk.FitNetsDistillation(
            teacher_layer_name="t_feat", student_layer_name="nope"))
    except ValueError as exc:
        assert "nope" in str(exc) and "student" in str(exc), str(exc)
    else:
        raise AssertionError("missing layer accepted")
    s = ops.convert_to_tensor(np.zeros((4, 5), np.float32))
    try:
        kdk.LogitsDistillation().compute_loss(ops.convert_to_tensor(np.zeros((4, 6), np.float32)), s)
    except ValueError as exc:
        assert "same shape" in str(exc), str(exc)
    else:
        raise AssertionError("shape mismatch accepted")
    return len(cases) + 2


def check_generic():
    """KDNumbaDistillation by name and wrap() agree with the named class."""
    rng = np.random.default_rng(3)
    s = ops.convert_to_tensor(rng.standard_normal((8, 5)).astype(np.float32))
    t = ops.convert_to_tensor(rng.standard_normal((8, 5)).astype(np.float32))
    a = num(kdk.DISTDistillation(temperature=2.0).compute_loss(t, s))
    b = num(kdk.KDNumbaDistillation("dist_loss", temperature=2.0).compute_loss(t, s))
    from kdnumba.functional import dist_loss
    c = num(kdk.wrap(dist_loss, temperature=2.0).compute_loss(t, s))
    assert a == b == c, (a, b, c)
    cfg = kdk.KDNumbaDistillation("dist_loss", temperature=2.0).get_config()
    assert kdk.KDNumbaDistillation.from_config(cfg).get_config() == cfg
    return [a, b, c]


def check_keras_default_claim():
    """Keras 3.15's LogitsDistillation vs the Hinton loss on one fixed input."""
    rng = np.random.default_rng(0)
    s = ops.convert_to_tensor((2 * rng.standard_normal((64, 10))).astype(np.float32))
    t = ops.convert_to_tensor((2 * rng.standard_normal((64, 10))).astype(np.float32))
    theirs = num(keras.distillation.LogitsDistillation(temperature=3.0).compute_loss(t, s))
    ours = num(kdk.LogitsDistillation(temperature=3.0).compute_loss(t, s))
    fixed = num(keras.distillation.LogitsDistillation(
        temperature=3.0, loss=keras.losses.KLDivergence()).compute_loss(t, s))
    assert abs(ours - num(ref_kd(t, s, 3.0))) <= 1e-5 * ours
    assert abs(ours - fixed) <= 1e-5 * ours
    return {"keras_default": theirs, "kdnumba": ours, "keras_with_KLDivergence_instance": fixed}


def main():
    REPORT["import_s"] = time.perf_counter() - START
    for name in kdk.INCLUDED:
        record("value", name, lambda name=name: check_value(name))
    record("errors", "errors", check_errors)
    record("generic", "generic", check_generic)
    record("claim", "keras_default", check_keras_default_claim)
    record("distiller", "distiller", check_distiller)
    REPORT["total_s"] = time.perf_counter() - START
    print("KERAS-REPORT " + json.dumps(REPORT))


if __name__ == "__main__":
    sys.exit(main())
