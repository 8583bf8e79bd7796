"""kdnumba.keras: the Keras 3 distillation losses on the JAX and PyTorch backends.

Keras picks its backend once, at import, and defaults to TensorFlow (not
installed here), so the checks run in subprocesses with ``KERAS_BACKEND``
set: ``tests/keras_checks.py`` checks everything for one backend and prints a
JSON report, which the tests below assert on. All subprocesses start at once
(a module fixture) because importing JAX/PyTorch and compiling the Keras
train step dominate; they run in parallel on a multi-core machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECKS = pathlib.Path(__file__).with_name("keras_checks.py")
BACKENDS = ("jax", "torch")
MARK = "KERAS-REPORT "


def _missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


def _env(backend: str) -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": path}


def _skip_reason(backend: str | None = None) -> str | None:
    if _missing("keras"):
        return "Keras is not installed: pip install 'kdnumba[keras]'"
    if backend is not None and _missing(backend):
        return f"{backend} is not installed (the Keras {backend} backend needs it)"
    return None


@pytest.fixture(scope="module")
def runs() -> dict:
    """``name -> (returncode, stdout, stderr)`` of every subprocess, started together."""
    commands = {}
    for backend in BACKENDS:
        if _skip_reason(backend) is None:
            commands[backend] = ([sys.executable, str(CHECKS)], backend)
    if _skip_reason() is None:
        # TensorFlow is not installable here: keras itself fails to import; with
        # TensorFlow present our own check refuses it. "numpy" imports but cannot train.
        for backend in ("tensorflow", "numpy"):
            commands[f"import:{backend}"] = ([sys.executable, "-c", "import kdnumba.keras"],
                                             backend)
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, env=_env(backend), text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (cmd, backend) in commands.items()}
    results = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results[name] = (proc.returncode, out, err)
    return results


@pytest.fixture(params=BACKENDS)
def report(request, runs) -> dict:
    reason = _skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    code, out, err = runs[request.param]
    lines = [line for line in out.splitlines() if line.startswith(MARK)]
    assert code == 0 and lines, f"keras_checks.py failed on {request.param}:\n{err[-4000:]}"
    return json.loads(lines[-1][len(MARK):])


def _checks(report: dict, kind: str) -> list[dict]:
    found = [c for c in report["checks"] if c["kind"] == kind]
    assert found, f"no {kind} check in the report"
    return found


def _assert_ok(checks: list[dict]) -> None:
    failed = {c["name"]: c["detail"] for c in checks if not c["ok"]}
    assert not failed, "\n\n".join(f"{name}:\n{detail}" for name, detail in failed.items())


# --- the registry split ---------------------------------------------------------

def test_every_registered_loss_is_included_or_excluded_with_a_reason(report):
    from kdnumba import functional

    names = [spec.name for spec in functional.specs()]
    included, excluded = report["included"], report["excluded"]
    assert not set(included) & set(excluded)
    assert sorted(included + list(excluded)) == sorted(names)
    # label-free logits losses, DKD (teacher-argmax target) and every feature loss
    assert {"kd_loss", "dkd_loss", "dist_loss", "rkd_loss", "attention_transfer",
            "selectivity_loss", "nt_xent", "info_nce"} <= set(included)
    assert set(excluded) == {"sparse_kd_loss", "supervised_contrastive", "triplet_loss",
                             "crd_loss"}
    assert all(len(reason) > 20 for reason in excluded.values())


# --- per loss: value and gradient against keras.ops --------------------------------

def test_every_loss_matches_its_keras_ops_reference(report):
    """Loss to 1e-5 and gradient to 1e-4 (relative to the largest entry), float32,
    against a reference written in keras.ops and differentiated by the backend;
    inputs left untouched."""
    checks = _checks(report, "value")
    assert sorted(c["name"] for c in checks) == sorted(report["included"])
    _assert_ok(checks)


# --- a Distiller with all of them ---------------------------------------------------

def test_distiller_fits_with_every_loss_trains_only_the_student_and_round_trips(report):
    """compile + fit; the student's weights change and the teacher's do not; each
    loss reads the layers it names (by the shapes it receives and by value: the
    Distiller's loss equals the references on features extracted by hand);
    save / load keeps the losses' configs and the loss value."""
    (check,) = _checks(report, "distiller")
    _assert_ok([check])
    detail = check["detail"]
    assert detail["student_changed"] and detail["teacher_unchanged"]
    assert detail["seen"]["rkd_loss"] == [[16, 9], [16, 4]]          # t_emb, s_emb
    assert detail["seen"]["attention_transfer"] == [[16, 4, 4, 3], [16, 4, 4, 3]]
    got, expected = detail["compute_loss"]
    assert got == pytest.approx(expected, rel=1e-5)
    assert detail["reloaded_compute_loss"] == pytest.approx(got, rel=1e-5)


def test_bad_configuration_raises_naming_the_argument(report):
    _assert_ok(_checks(report, "errors"))


def test_generic_wrappers_agree_with_the_named_class(report):
    _assert_ok(_checks(report, "generic"))


def test_logits_distillation_is_hinton_unlike_keras_default(report):
    """Keras 3.15's default LogitsDistillation (``"kl_divergence"`` string) is not
    the Hinton loss; ours is, and equals Keras's with a KLDivergence instance."""
    (check,) = _checks(report, "claim")
    _assert_ok([check])
    detail = check["detail"]
    assert detail["kdnumba"] == pytest.approx(detail["keras_with_KLDivergence_instance"],
                                              rel=1e-5)
    assert detail["keras_default"] > 3 * detail["kdnumba"]


# --- import hygiene and unsupported backends --------------------------------------------

def test_importing_kdnumba_imports_no_keras_or_framework():
    code = ("import sys, kdnumba, kdnumba.bridges, kdnumba.functional, kdnumba.strategies; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('keras', 'torch', 'jax', 'jaxlib', 'tensorflow')); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=_env("jax"))


@pytest.mark.parametrize("backend", ["tensorflow", "numpy"])
def test_unsupported_backend_raises_a_clear_import_error(backend, runs):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    code, _, err = runs[f"import:{backend}"]
    assert code != 0
    assert "ImportError" in err
    assert f"{backend!r} backend" in err and "'jax', 'torch'" in err, err[-2000:]


# --- the JAX bridge's in-place read of callback operands (kdnumba/jax.py) -------------------

def test_jax_callback_operands_reach_registered_kernels_without_a_copy():
    """JAX hands callbacks read-only buffers; kdnumba's own losses read them in
    place (writable alias, no copy), any other wrapped function gets them read-only,
    and the caller's arrays are never modified either way."""
    jax = pytest.importorskip("jax", reason="JAX is not installed: pip install 'kdnumba[jax]'")
    import numpy as np

    import kdnumba.jax as kdj
    from kdnumba.functional import kd_loss

    frozen = np.arange(12, dtype=np.float32).reshape(3, 4)
    frozen.flags.writeable = False
    alias = kdj._kernel_view(frozen, trusted=True)
    assert alias.flags.writeable and np.shares_memory(alias, frozen)
    assert not kdj._kernel_view(frozen, trusted=False).flags.writeable

    rng = np.random.default_rng(0)
    s = rng.standard_normal((64, 10)).astype(np.float32)
    t = rng.standard_normal((64, 10)).astype(np.float32)
    s_j, t_j = jax.numpy.asarray(s), jax.numpy.asarray(t)
    seen = []

    def spy(student, teacher, *, temperature=3.0):
        seen.append(student.flags.writeable)
        return kd_loss(student, teacher, temperature=temperature)

    for fn in (kdj.kd_loss, kdj.wrap(spy, "spy")):
        value, grad = jax.jit(jax.value_and_grad(lambda a, b: fn(a, b, temperature=2.0)))(s_j, t_j)
        want_value, want_grad = kd_loss(s, t, temperature=2.0)
        assert float(value) == pytest.approx(want_value, rel=1e-6)
        np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-8)
    assert seen == [False]  # a user's function never gets a writable alias
    np.testing.assert_array_equal(np.asarray(s_j), s)
    np.testing.assert_array_equal(np.asarray(t_j), t)
