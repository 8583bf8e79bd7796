"""The register-tiled softmax kernel of ``kernels.cuda.contrastive`` against NumPy.

``softmax_tiles`` directly, on shapes that cut every tile raggedly (the
simulator's tiles are tiny: ``BM = BN = 4`` rows/columns, K chunks of 4
(float32) or 2 (float64) embedding columns, ``ACC_DIM = 8`` accumulator
columns per launch), in both modes, with and without the accumulator.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from numba import cuda
from numba.core import config

from kdnumba.kernels.cuda import contrastive as K

DTYPES = [np.float32, np.float64]
TOL = {np.float32: dict(rtol=2e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-14)}

# (rows, columns, D): rows and columns span several ragged tiles and differ
# (negatives); D = 5 is several ragged K chunks, D = 11 > ACC_DIM (two
# launches, the second with a partial group).
SHAPES = [(9, 6, 5), (3, 10, 11)]


def _reference(a, c):
    """``(m, S, acc)`` of the ONLINE pass and ``z`` in float64."""
    z = a.astype(np.float64) @ c.astype(np.float64).T
    m = z.max(axis=1)
    e = np.exp(z - m[:, None])
    return m, e.sum(axis=1), e @ c.astype(np.float64), z


def _run(rows, cols, mode, **kw):
    out = K.softmax_tiles(cuda.to_device(rows), cuda.to_device(cols), mode, **kw)
    return tuple(None if x is None else x.copy_to_host() for x in out)


def test_geometry_fits_the_hardware():
    assert K.BM % K._TM == 0 and K.BN % K._TN == 0
    assert K._X_BYTES + K._P_BYTES <= 48 * 1024
    if not config.ENABLE_CUDASIM:
        assert (K._NTX, K._NTY, K._TM, K._TN, K.ACC_DIM) == (16, 16, 4, 4, 128)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_both_modes_match_numpy(rng, dtype, shape):
    n_rows, n_cols, dim = shape
    a = rng.standard_normal((n_rows, dim)).astype(dtype)
    c = rng.standard_normal((n_cols, dim)).astype(dtype)
    ref_m, ref_s, ref_acc, z = _reference(a, c)
    tol = TOL[dtype]

    m, s, acc = _run(a, c, K.ONLINE)
    assert m.dtype == s.dtype == acc.dtype == np.float64 and acc.shape == (n_rows, dim)
    np.testing.assert_allclose(m, ref_m, **tol)
    np.testing.assert_allclose(s, ref_s, **tol)
    np.testing.assert_allclose(acc, ref_acc, **tol)

    # Without the accumulator: the same statistics, bit for bit.
    m2, s2, none = _run(a, c, K.ONLINE, want_acc=False)
    assert none is None
    assert m2.tobytes() == m.tobytes() and s2.tobytes() == s.tobytes()

    # FIXED: rows = the columns above, columns = the anchors with known lse.
    lse = ref_m + np.log(ref_s)
    m3, s3, acc3 = _run(c, a, K.FIXED, lse_cols=cuda.to_device(lse))
    assert m3 is None and s3 is None and acc3.shape == (n_cols, dim)
    np.testing.assert_allclose(acc3, np.exp(z.T - lse[None, :]) @ a.astype(np.float64), **tol)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_propagates_per_row_and_column(rng):
    a = rng.standard_normal((6, 3))
    c = rng.standard_normal((5, 3))
    # A NaN anchor poisons its own row only (the maxima are per row).
    bad_a = a.copy()
    bad_a[2, 1] = np.nan
    m, s, acc = _run(bad_a, c, K.ONLINE)
    ref_m, ref_s, ref_acc, _ = _reference(a, c)
    # A NaN wins the maximum (as before the rewrite), and reaches S and acc.
    assert np.isnan(m[2]) and np.isnan(s[2]) and np.isnan(acc[2]).all()
    keep = np.arange(6) != 2
    np.testing.assert_allclose(m[keep], ref_m[keep], rtol=1e-12)
    np.testing.assert_allclose(acc[keep], ref_acc[keep], rtol=1e-12)
    # A NaN candidate (in the last, ragged column tile) poisons every row.
    bad_c = c.copy()
    bad_c[4, 0] = np.nan
    m, s, acc = _run(a, bad_c, K.ONLINE)
    assert np.isnan(m).all() and np.isnan(s).all() and np.isnan(acc).all()
    m, s, _ = _run(a, bad_c, K.ONLINE, want_acc=False)
    assert np.isnan(m).all() and np.isnan(s).all()
    # FIXED: a NaN lse reaches every accumulator row.
    lse = ref_m + np.log(ref_s)
    lse[4] = np.nan
    _, _, acc = _run(c, a, K.FIXED, lse_cols=cuda.to_device(lse))
    assert np.isnan(acc).all()


def test_bit_identical_across_runs_and_grids(rng, monkeypatch):
    a = rng.standard_normal((9, 7)).astype(np.float32)
    c = rng.standard_normal((11, 7)).astype(np.float32)
    first = _run(a, c, K.ONLINE)
    second = _run(a, c, K.ONLINE)
    monkeypatch.setattr(K, "grid_size", lambda n_blocks: 1)  # one block, all row tiles
    third = _run(a, c, K.ONLINE)
    for x, y, w in zip(first, second, third):
        assert x.tobytes() == y.tobytes() == w.tobytes()


_PTXAS_PROBE = """
    import re, shutil, subprocess, sys, tempfile, types
    from numba import cuda
    from numba.cuda.cudadrv import nvvm
    ptxas = sys.argv[1]
    if not nvvm.is_available():
        print("NO-NVVM")
        raise SystemExit(0)
    import numba.cuda.dispatcher as dispatcher
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
    from kdnumba.kernels.cuda import contrastive as K
    for F in ("float32", "float64"):
        ptx, _ = cuda.compile_ptx(K._tiles_kernel, K._TILES_SIG.format(F=F), cc=(9, 0))
        wide = {"float32": "ld.shared.v4.f32", "float64": "ld.shared.v2.f64"}[F]
        assert wide in ptx, F + " fragment reads are not 128-bit"
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as fh:
            fh.write(ptx)
            fh.flush()
            out = subprocess.run([ptxas, "-arch=sm_90", "-v", fh.name, "-o", "/dev/null"],
                                 capture_output=True, text=True, check=True).stderr
        regs = int(re.search(r"Used (\\d+) registers", out).group(1))
        spills = re.search(r"(\\d+) bytes spill stores, (\\d+) bytes spill loads", out)
        print(F, "REGS", regs, "SPILLS", spills.group(1), spills.group(2))
"""


def _ptxas():
    found = shutil.which("ptxas")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", *sorted(
            map(str, Path("/usr/local").glob("cuda-*")), reverse=True)):
        if root and (Path(root) / "bin" / "ptxas").exists():
            return str(Path(root) / "bin" / "ptxas")
    return None


def test_gpu_build_has_no_spills():
    """The real (sm_90) build: 128-bit shared reads, no local-memory spills,
    within the 255-register limit (``ptxas -v``; the simulator cannot tell)."""
    ptxas = _ptxas()
    if ptxas is None:
        pytest.skip("ptxas (CUDA toolkit) not found")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_PTXAS_PROBE), ptxas],
                          cwd=Path(__file__).resolve().parents[2], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    if "NO-NVVM" in proc.stdout:
        pytest.skip("NVVM (CUDA toolkit) not installed")
    lines = [ln.split() for ln in proc.stdout.splitlines() if "REGS" in ln]
    assert len(lines) == 2, proc.stdout
    for _, _, regs, _, stores, loads in lines:
        assert int(regs) <= 255 and stores == loads == "0", proc.stdout
