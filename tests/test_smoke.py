import subprocess
import sys

import numpy as np
import pytest

import kdnumba
from kdnumba import reference


def test_kd_loss_matches_reference_small():
    rng = np.random.default_rng(0)
    s, t = rng.standard_normal((2, 8, 5))
    y = np.array([0, 1, 2, 3, 4, 0, 1, 2])
    loss, grad = kdnumba.functional.kd_loss(s, t, y)
    ref_loss, ref_grad = reference.kd_loss(s, t, y)
    assert np.isclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-10, atol=1e-14)


# --- the framework bridges are optional (run whether PyTorch / JAX are installed or not) ---

def test_importing_kdnumba_imports_no_framework():
    code = ("import sys, kdnumba, kdnumba.bridges, kdnumba.functional, kdnumba.strategies; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'jax', 'jaxlib')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_missing_framework_gets_an_install_hint(framework):
    code = f"import sys; sys.modules[{framework!r}] = None; import kdnumba.{framework}"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0
    assert f"pip install 'kdnumba[{framework}]'" in run.stderr
