"""kdnumba.jax: custom_vjp losses over pure_callback into the CPU kernels."""

from __future__ import annotations

import inspect
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from testkit import SquaredGap, kd_labels, weighted_squares

jax = pytest.importorskip("jax", reason="JAX is not installed: pip install 'kdnumba[jax]'")
jnp = jax.numpy
from jax.test_util import check_grads  # noqa: E402

import kdnumba  # noqa: E402
import kdnumba.jax as kdj  # noqa: E402
from kdnumba import functional  # noqa: E402
from kdnumba.bridges import REGISTERED, registered_losses  # noqa: E402

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "jax.md"


@pytest.fixture
def x64():
    """float64 in JAX for one test, restored afterwards (no leak into other tests)."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def jax_kd(s, t, y, temperature, alpha):
    """KD written in plain JAX (autodiff reference)."""
    log_p_s = jax.nn.log_softmax(s / temperature, axis=1)
    log_p_t = jax.nn.log_softmax(t / temperature, axis=1)
    soft = temperature ** 2 * jnp.mean(jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=1))
    hard = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(s, axis=1), y[:, None], axis=1))
    return alpha * hard + (1 - alpha) * soft


# --- import hygiene (importing kdnumba without JAX: tests/test_smoke.py) -------

def test_module_named_jax_imports_the_real_jax():
    assert kdj.jax is sys.modules["jax"]
    assert hasattr(kdj.jax, "custom_vjp")
    assert pathlib.Path(kdj.__file__).name == "jax.py"


# --- values and gradients --------------------------------------------------------

@pytest.mark.parametrize("kind", ["none", "index", "dense"])
def test_float32_equals_the_functional_layer(rng, kind):
    s, t = rng.standard_normal((2, 6, 5)).astype(np.float32) * 3
    y = kd_labels(kind, rng, 6, 5, np.float32)
    want_loss, want_grad = functional.kd_loss(s, t, y, temperature=2.5, alpha=0.4)
    f = lambda v: kdj.kd_loss(v, t, y, temperature=2.5, alpha=0.4)  # noqa: E731
    for loss, grad in (jax.value_and_grad(f)(s), jax.jit(jax.value_and_grad(f))(s)):
        assert loss.dtype == jnp.float32 and loss.shape == ()
        assert float(loss) == pytest.approx(want_loss, rel=1e-6)
        assert grad.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(grad), want_grad)


@pytest.mark.parametrize("kind", ["none", "index", "dense"])
def test_float64_equals_the_functional_layer_and_passes_check_grads(rng, x64, kind):
    s, t = rng.standard_normal((2, 5, 4)) * 2
    y = kd_labels(kind, rng, 5, 4, np.float64)
    want_loss, want_grad = functional.kd_loss(s, t, y)
    f = lambda v: kdj.kd_loss(v, jnp.asarray(t), y)  # noqa: E731
    loss, grad = jax.jit(jax.value_and_grad(f))(jnp.asarray(s))
    assert loss.dtype == jnp.float64
    assert float(loss) == want_loss
    np.testing.assert_array_equal(np.asarray(grad), want_grad)
    check_grads(f, (jnp.asarray(s),), order=1, modes=["rev"])


def test_cotangent_scales_the_gradient_and_teacher_is_constant(rng, x64):
    s, t = (jnp.asarray(a) for a in rng.standard_normal((2, 3, 4)))
    _, grad = functional.kd_loss(np.asarray(s), np.asarray(t))

    def f(v, w):
        loss = kdj.kd_loss(v, w)
        return 3.0 * loss + loss ** 2

    gs, gt = jax.grad(f, argnums=(0, 1))(s, t)
    loss = float(kdj.kd_loss(s, t))
    np.testing.assert_allclose(np.asarray(gs), (3.0 + 2 * loss) * grad, rtol=1e-13)
    np.testing.assert_array_equal(np.asarray(gt), 0.0)


def test_vmap_over_independent_problems(rng, x64):
    s, t = rng.standard_normal((2, 3, 4, 5))
    y = rng.integers(0, 5, (3, 4))
    losses = jax.vmap(lambda a, b, c: kdj.kd_loss(a, b, c, temperature=2.0))(s, t, y)
    grads = jax.jit(jax.vmap(jax.grad(lambda a, b, c: kdj.kd_loss(a, b, c, temperature=2.0))))(s, t, y)
    for k in range(3):
        want_loss, want_grad = functional.kd_loss(s[k], t[k], y[k], temperature=2.0)
        assert float(losses[k]) == want_loss
        np.testing.assert_array_equal(np.asarray(grads[k]), want_grad)


def test_options_are_static_and_cached_by_type(rng):
    s, t = rng.standard_normal((2, 3, 4)).astype(np.float32)
    assert float(kdj.kd_loss(s, t, temperature=1.0)) != float(kdj.kd_loss(s, t, temperature=2.0))
    assert float(kdj.kd_loss(s, t, temperature=2)) == float(kdj.kd_loss(s, t, temperature=2.0))
    y = np.array([0, 1, 2])
    kdj.kd_loss(s, t, y, alpha=1)
    with pytest.raises(Exception, match="alpha must be a real number"):
        kdj.kd_loss(s, t, y, alpha=True)   # not served from alpha=1's cache entry
    with pytest.raises(TypeError, match="option temperature must be a Python value"):
        jax.jit(lambda a, temp: kdj.kd_loss(a, t, temperature=temp))(s, 2.0)
    assert jax.jit(lambda a: kdj.kd_loss(a, t, temperature=2.0))(s) == kdj.kd_loss(s, t, temperature=2.0)


def test_errors(rng):
    s = rng.standard_normal((3, 4)).astype(np.float32)
    with pytest.raises(TypeError, match="student_logits must be float32 or float64, got float16"):
        kdj.kd_loss(jnp.asarray(s, jnp.float16), s)
    with pytest.raises(TypeError, match="teacher_logits must be float32 or float64, got bfloat16"):
        kdj.kd_loss(s, jnp.asarray(s, jnp.bfloat16))
    with pytest.raises(TypeError, match="student_logits must be an array, got None"):
        kdj.kd_loss(None, s)
    with pytest.raises(TypeError, match="kd_loss\\(\\).*device"):
        kdj.kd_loss(s, s, device="cpu")
    # validation inside the callback: JAX re-raises it with the original message
    with pytest.raises(Exception, match="batch size mismatch"):
        kdj.kd_loss(s, s[:2])
    with pytest.raises(Exception, match="labels must be class indices"):
        jax.jit(jax.grad(lambda v: kdj.kd_loss(v, s, jnp.array([0, 1, 7]))))(s)



# --- the XLA FFI path (kd_loss, KL, no labels: kdnumba.bridges._xla_ffi) ---------------

def _hlo(f, *args) -> str:
    return jax.jit(f).lower(*args).as_text()


def kd_t4(v, t):
    return kdj.kd_loss(v, t, temperature=4.0)


def test_kl_kd_loss_without_labels_runs_as_an_ffi_call_and_others_as_callbacks(rng, monkeypatch):
    s, t = rng.standard_normal((2, 6, 5)).astype(np.float32)
    y = np.arange(6) % 5
    assert "kdnumba_kd_loss_float32" in _hlo(jax.value_and_grad(kd_t4), s, t)
    assert "python_cpu_callback" not in _hlo(jax.value_and_grad(kd_t4), s, t)
    assert kdj.ffi_status()["float32"] == "kdnumba_kd_loss_float32"
    for other in (lambda v, w: kdj.kd_loss(v, w, y),                     # labels
                  lambda v, w: kdj.kd_loss(v, w, divergence="jsd"),
                  lambda v, w: kdj.kd_loss(v, w, standardize=True),
                  lambda v, w: kdj.kd_loss(v, w[:, :4])):                # bad shape: its error
        assert "kdnumba_kd_loss" not in _hlo(other, s, t)
    monkeypatch.setenv(kdj.FFI_ENV, "0")
    hlo = _hlo(lambda v, w: kdj.kd_loss(v, w, temperature=4.5), s, t)   # a new option set
    assert "python_cpu_callback" in hlo and "kdnumba_kd_loss" not in hlo


@pytest.mark.parametrize("shape, temperature", [((4096, 1000), 4.0), ((3, 7), 0.7), ((1, 1), 2.0)])
def test_ffi_path_is_bit_identical_to_the_functional_loss_and_the_callback(
        rng, x64, monkeypatch, shape, temperature):
    for dtype in (np.float32, np.float64):
        s, t = (3 * rng.standard_normal((2, *shape))).astype(dtype)
        want_loss, want_grad = functional.kd_loss(s, t, temperature=temperature)
        f = jax.jit(jax.value_and_grad(lambda v, w: kdj.kd_loss(v, w, temperature=temperature)))
        loss, grad = f(s, t)
        assert loss.dtype == dtype and grad.dtype == dtype
        assert float(loss) == float(dtype(want_loss))
        np.testing.assert_array_equal(np.asarray(grad), want_grad)
        # the teacher is cast to the student's dtype, as by the functional loss
        other = np.float64 if dtype is np.float32 else np.float32
        np.testing.assert_array_equal(
            np.asarray(jax.grad(
                lambda v: kdj.kd_loss(v, t.astype(other), temperature=temperature))(s)),
            functional.kd_loss(s, t.astype(other), temperature=temperature)[1])
    monkeypatch.setenv(kdj.FFI_ENV, "0")
    s, t = rng.standard_normal((2, *shape)).astype(np.float32)
    callback = jax.value_and_grad(lambda v, w: kdj.kd_loss(v, w, temperature=temperature + 1.0))
    monkeypatch.delenv(kdj.FFI_ENV)
    ffi = jax.value_and_grad(lambda v, w: kdj.kd_loss(v, w, temperature=temperature + 1.0))
    monkeypatch.setenv(kdj.FFI_ENV, "0")
    by_callback = jax.jit(callback)(s, t)
    monkeypatch.delenv(kdj.FFI_ENV)
    by_ffi = jax.jit(ffi)(s, t)
    assert float(by_ffi[0]) == float(by_callback[0])
    np.testing.assert_array_equal(np.asarray(by_ffi[1]), np.asarray(by_callback[1]))


def test_ffi_path_under_vmap_cotangents_and_check_grads(rng, x64):
    s, t = rng.standard_normal((2, 3, 4, 5))
    grads = jax.jit(jax.vmap(jax.grad(kd_t4)))(s, t)
    for k in range(3):
        np.testing.assert_array_equal(np.asarray(grads[k]),
                                      functional.kd_loss(s[k], t[k], temperature=4.0)[1])
    g = jax.grad(lambda v: 3.0 * kd_t4(v, t[0]))(s[0])
    np.testing.assert_array_equal(np.asarray(g),
                                  3.0 * functional.kd_loss(s[0], t[0], temperature=4.0)[1])
    check_grads(lambda v: kd_t4(v, jnp.asarray(t[0])), (jnp.asarray(s[0]),), order=1, modes=["rev"])


def test_ffi_path_reports_errors(rng):
    s, t = rng.standard_normal((2, 4, 5)).astype(np.float32)
    f = jax.jit(jax.value_and_grad(kd_t4))
    for bad, name in ((s, "teacher_logits"), (t, "student_logits")):
        poisoned = bad.copy()
        poisoned[1, 2] = np.nan
        args = (s, poisoned) if name == "teacher_logits" else (poisoned, t)
        with pytest.raises(Exception, match=f"{name} contains NaN or inf values"):
            f(*args)
    with pytest.raises(Exception, match="overflowed although every input is finite"):
        f(np.full((2, 3), 3e38, np.float32) * np.array([1, -1, 1], np.float32), t[:2, :3])
    # options are checked when the function is built, before any call
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kdj.kd_loss(s, t, temperature=0.0)
    # a malformed call of the handler itself is an error, not a crash
    target = kdj.ffi_target(np.float32)
    shapes = (jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct(s.shape, jnp.float32))
    with pytest.raises(Exception, match="unexpected operands"):
        jax.ffi.ffi_call(target, shapes)(s, t, jnp.zeros(3, jnp.uint32))
    with pytest.raises(Exception, match="unexpected operands"):
        jax.ffi.ffi_call(target, shapes)(s, t[:3], jnp.zeros(12, jnp.uint32))


def test_ffi_registration_failure_falls_back_to_the_callback(rng, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("no typed FFI here")

    monkeypatch.setattr(kdj, "_ffi_targets", {})
    monkeypatch.setattr(jax.ffi, "register_ffi_target", refuse)
    s, t = rng.standard_normal((2, 4, 5)).astype(np.float32)
    f = lambda v, w: kdj.kd_loss(v, w, temperature=5.5)  # noqa: E731  (a new option set)
    hlo = _hlo(jax.value_and_grad(f), s, t)
    assert "python_cpu_callback" in hlo and "kdnumba_kd_loss" not in hlo
    assert kdj.ffi_status() == {"float32": "RuntimeError: no typed FFI here"}
    assert kdj.ffi_target(np.float32) is None
    np.testing.assert_array_equal(np.asarray(jax.grad(f)(s, t)),
                                  functional.kd_loss(s, t, temperature=5.5)[1])

def test_signature_hides_device_and_out():
    params = dict(inspect.signature(functional.kd_loss).parameters)
    del params["out"], params["device"]
    assert list(inspect.signature(kdj.kd_loss).parameters.values()) == list(params.values())
    assert kdj.kd_loss.__name__ == "kd_loss" and "JAX version" in kdj.kd_loss.__doc__


# --- every registered loss ------------------------------------------------------



def test_registered_losses_are_exported():
    present = registered_losses()
    assert "kd_loss" in present and set(present) <= set(REGISTERED)
    assert set(present) <= set(kdj.__all__)


@pytest.mark.parametrize("name", sorted(registered_losses()))
def test_every_registered_loss_matches_and_passes_check_grads(loss_cases, x64, name):
    args, kwargs = loss_cases[name]   # a KeyError: add the new loss to loss_cases (conftest)
    want_loss, want_grad = getattr(functional, name)(*args, **kwargs)
    f = lambda v: getattr(kdj, name)(v, *args[1:], **kwargs)  # noqa: E731
    loss, grad = jax.jit(jax.value_and_grad(f))(jnp.asarray(args[0]))
    assert float(loss) == pytest.approx(want_loss, rel=1e-14, abs=1e-300)
    np.testing.assert_array_equal(np.asarray(grad), want_grad)
    check_grads(f, (jnp.asarray(args[0]),), order=1, modes=["rev"])


# --- wrap() and intermediate strategies --------------------------------------------

def test_wrap_any_loss_and_gradient_function(rng, x64):
    f = kdj.wrap(weighted_squares)
    assert str(inspect.signature(f)) == "(x, target=None, *, k=1.0)"
    x, target = (jnp.asarray(a) for a in rng.standard_normal((2, 3, 2)))
    check_grads(lambda v: f(v, target, k=0.5), (x,), order=1, modes=["rev"])
    assert float(f(x, k=2.0)) == pytest.approx(2.0 * float((x ** 2).sum()), rel=1e-14)
    strategy = kdnumba.DistillationLoss(2.0, 0.5)
    g = jax.grad(kdj.wrap(strategy.loss_and_gradient))(x, target)
    np.testing.assert_array_equal(np.asarray(g), strategy.compute_gradient(x, target))


def test_intermediate_loss_over_dicts(rng, x64):
    f = kdj.intermediate_loss(SquaredGap("mid", 0.7))
    student = {"mid": jnp.asarray(rng.standard_normal((3, 2, 2))),
               "other": jnp.asarray(rng.standard_normal((3, 5)))}
    teacher = {"mid": jnp.asarray(rng.standard_normal((3, 2, 2)))}
    loss, grads = jax.jit(jax.value_and_grad(f))(student, teacher)
    d = np.asarray(student["mid"] - teacher["mid"])
    assert float(loss) == pytest.approx(0.7 * np.mean(d * d), rel=1e-14)
    np.testing.assert_allclose(np.asarray(grads["mid"]), 0.7 * 2.0 * d / d.size, rtol=1e-14)
    np.testing.assert_array_equal(np.asarray(grads["other"]), 0.0)
    check_grads(lambda s: f(s, teacher), (student,), order=1, modes=["rev"])
    with pytest.raises(TypeError, match="student_acts must be a mapping"):
        f([student["mid"]], teacher)
    with pytest.raises(TypeError, match="not an intermediate-activation strategy"):
        kdj.intermediate_loss(kdnumba.DistillationLoss())


@pytest.mark.parametrize("mode", ["supervised", "triplet"])
def test_intermediate_loss_forwards_labels(rng, x64, mode):
    """SUPERVISED/TRIPLET need labels: f(..., labels=) passes them on, under jit too."""
    strategy = kdnumba.ContrastiveDistillationStrategy("emb", 0.6, mode=mode,
                                                       negatives_sample_size=0)
    f = kdj.intermediate_loss(strategy)
    s = rng.standard_normal((6, 4))
    t = rng.standard_normal((6, 4))
    y = np.array([0, 1, 0, 1, 2, 2])
    expected, grads = strategy.intermediate_loss_and_gradient({"emb": s}, {"emb": t}, labels=y)
    student, teacher = {"emb": jnp.asarray(s)}, {"emb": jnp.asarray(t)}
    loss, g = jax.jit(jax.value_and_grad(f))(student, teacher, jnp.asarray(y))
    assert float(loss) == pytest.approx(expected, rel=1e-14)
    np.testing.assert_allclose(np.asarray(g["emb"]), grads["emb"], rtol=1e-14)
    assert float(f(student, teacher, y)) == pytest.approx(expected, rel=1e-14)
    check_grads(lambda a: f(a, teacher, jnp.asarray(y)), (student,), order=1, modes=["rev"])
    # the strategy's own error, raised in the host callback (JAX re-raises it as
    # its runtime error, with the message)
    with pytest.raises(Exception, match="needs labels"):
        f(student, teacher)
    with pytest.raises(TypeError, match="labels must be integer"):
        f(student, teacher, jnp.asarray(y, jnp.float32))


# --- training end to end ------------------------------------------------------

def test_training_matches_plain_jax_kd_step_by_step(x64):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((32, 6)))
    teacher = jnp.asarray(rng.standard_normal((32, 5)) * 2)
    y = jnp.argmax(teacher, axis=1)
    w0 = jnp.asarray(rng.standard_normal((6, 5)) * 0.1)

    def train(loss_fn):
        step = jax.jit(jax.value_and_grad(lambda w: loss_fn(x @ w, teacher, y)))
        w, losses = w0, []
        for _ in range(30):
            loss, g = step(w)
            w = w - 0.5 * g
            losses.append(float(loss))
        return w, np.array(losses)

    w_ours, ours = train(lambda s, t, y: kdj.kd_loss(s, t, y, temperature=2.0, alpha=0.3))
    w_ref, ref = train(lambda s, t, y: jax_kd(s, t, y, 2.0, 0.3))
    np.testing.assert_allclose(ours, ref, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(w_ours), np.asarray(w_ref), rtol=1e-9, atol=1e-12)
    assert np.all(np.diff(ours) < 0) and ours[-1] < 0.8 * ours[0]


# --- docs ---------------------------------------------------------------------

def test_docs_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert blocks, "docs/jax.md has no python example"
    code = "\n".join(blocks)
    # in a subprocess: the page enables float64, which must not leak into this process
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)
