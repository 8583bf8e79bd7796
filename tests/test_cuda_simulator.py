"""The CUDA path, from the main test run (which has no GPU and no simulator).

* ``tests/cuda`` runs in its own process under the Numba CUDA simulator
  (``NUMBA_ENABLE_CUDASIM`` must be set before Numba is imported);
* every CUDA kernel compiles to PTX for a real GPU (sm_90) when NVVM is
  installed: the simulator runs kernels as Python and would not notice code
  the CUDA compiler rejects;
* without a GPU, ``device="cuda"`` raises a ``RuntimeError`` saying what is
  missing;
* the CPU path never imports ``numba.cuda``.

Each check runs in a subprocess so that this process never imports
``numba.cuda`` (other tests may rely on that).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, *, timeout=300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter, with the real (not simulated) CUDA target."""
    env = {k: val for k, val in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cuda_suite_passes_under_the_simulator():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/cuda", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) > 0, tail
    assert not re.search(r"\d+ (failed|errors?)\b", proc.stdout.splitlines()[-1]), tail


_NO_GPU_PROBE = """
    import sys
    {prelude}
    import numpy as np
    from kdnumba import _dispatch
    from kdnumba.functional import kd_loss
    reason = _dispatch.cuda_unavailable_reason()
    if reason is None:
        print("GPU-PRESENT")
        sys.exit(0)
    try:
        kd_loss(np.zeros((2, 3)), np.zeros((2, 3)), device="cuda")
    except RuntimeError as exc:
        print("RUNTIME-ERROR:", exc)
    else:
        print("NO-ERROR")
    try:
        _dispatch.kernels("softmax_kl", "cuda")
    except RuntimeError as exc:
        print("KERNELS-RUNTIME-ERROR:", exc)
"""


def test_device_cuda_without_a_gpu_raises_runtime_error():
    proc = _python(_NO_GPU_PROBE.format(prelude=""))
    assert proc.returncode == 0, proc.stderr
    if "GPU-PRESENT" in proc.stdout:
        pytest.skip("a usable CUDA GPU is present: tests/cuda ran on it")
    assert "RUNTIME-ERROR:" in proc.stdout, proc.stdout + proc.stderr
    assert "no usable CUDA GPU/driver was found" in proc.stdout, proc.stdout
    assert "RUNTIME-ERROR: device='cuda'" in proc.stdout, proc.stdout
    assert "KERNELS-RUNTIME-ERROR: device='cuda'" in proc.stdout, proc.stdout


def test_device_cuda_without_numba_cuda_names_the_package():
    # ``sys.modules[name] = None`` makes ``import numba.cuda`` fail, as it does
    # where the CUDA target is not installed.
    proc = _python(_NO_GPU_PROBE.format(prelude="sys.modules['numba.cuda'] = None"))
    assert proc.returncode == 0, proc.stderr
    assert "RUNTIME-ERROR:" in proc.stdout, proc.stdout + proc.stderr
    assert "numba-cuda" in proc.stdout and "kdnumba[cuda]" in proc.stdout, proc.stdout


def test_numba_cuda_that_cannot_compile_with_this_numpy_is_named():
    # The H200 machine of 2026-12-04 had numba-cuda 0.30.4 with NumPy 2.5, which
    # removed np.row_stack: every first compile died with a bare AttributeError.
    # Faked here: a GPU "present", numba-cuda "installed", its array module failing.
    proc = _python("""
        import importlib, sys, types
        import numpy as np
        fake = types.ModuleType("numba_cuda")
        fake.__version__ = "0.30.4"
        sys.modules["numba_cuda"] = fake
        from numba import cuda
        cuda.is_available = lambda: True
        real_import = importlib.import_module
        def failing_import(name, *args):
            if name == "numba.cuda.np.arrayobj":
                raise AttributeError("module 'numpy' has no attribute 'row_stack'")
            return real_import(name, *args)
        importlib.import_module = failing_import
        from kdnumba.functional import kd_loss
        try:
            kd_loss(np.zeros((2, 3)), np.zeros((2, 3)), device="cuda")
        except RuntimeError as exc:
            print("RUNTIME-ERROR:", exc)
    """)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "RUNTIME-ERROR: device='cuda'" in out, out + proc.stderr
    assert "numba-cuda 0.30.4" in out and "row_stack" in out and "numpy<2.5" in out, out


def test_cpu_path_never_imports_numba_cuda():
    proc = _python("""
        import sys
        import numpy as np
        import kdnumba
        from kdnumba.functional import kd_loss
        s = np.random.default_rng(0).standard_normal((4, 5))
        kd_loss(s, s[::-1], np.arange(4), device="auto")
        kd_loss(s.astype(np.float32), s, device="cpu")
        kdnumba.DistillationLoss().loss_and_gradient(s, s)
        from kdnumba import functional as fn
        fn.selectivity_loss(s, s[::-1])
        fn.nt_xent(s, s[::-1])
        fn.feature_loss(s, s[::-1])
        fn.attention_transfer(s.reshape(4, 1, 5), s.reshape(4, 1, 5)[::-1])
        fn.rkd_loss(s, s[::-1])
        print("CUDA-MODULES:", sorted(m for m in sys.modules
                                      if m.startswith(("numba.cuda", "kdnumba._cuda",
                                                       "kdnumba.kernels.cuda"))))
    """)
    assert proc.returncode == 0, proc.stderr
    assert "CUDA-MODULES: []" in proc.stdout, proc.stdout


_PTX_CHECK = """
    import importlib, pkgutil, types
    from numba import cuda
    from numba.cuda.cudadrv import nvvm
    if not nvvm.is_available():
        print("NO-NVVM")
        raise SystemExit(0)
    # Device functions compile for the current device; there is none here.
    import numba.cuda.dispatcher as dispatcher
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
    import kdnumba.kernels.cuda as pkg
    n = 0
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"kdnumba.kernels.cuda.{info.name}")
        for pyfunc, signature in getattr(module, "KERNELS", []):
            for F in ("float32", "float64"):
                cuda.compile_ptx(pyfunc, signature.format(F=F), cc=(9, 0))
                n += 1
                print("MODULE", info.name)
    print("COMPILED", n)
"""


def test_cuda_kernels_compile_to_ptx():
    proc = _python(_PTX_CHECK, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    if "NO-NVVM" in proc.stdout:
        pytest.skip("NVVM (CUDA toolkit) not installed: cannot compile CUDA kernels here")
    compiled = re.search(r"COMPILED (\d+)", proc.stdout)
    assert compiled and int(compiled.group(1)) >= 2, proc.stdout
    for family in ("softmax_kl", "selectivity", "contrastive", "feature", "attention",
                   "relational"):
        assert f"MODULE {family}" in proc.stdout, proc.stdout
