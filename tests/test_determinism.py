"""Determinism and thread safety: bit-identical results for any Numba thread count, any
memory alignment, repeated calls and concurrent calls from Python threads (under the
active threading layer and under ``workqueue``); the ordered reductions
(``kernels/cpu/reductions.py``) and ``_policy.kernel_launch`` they rely on."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import pytest

from kdnumba import _policy
from kdnumba.functional import kd_loss
from kdnumba.kernels.cpu import softmax_kl
from kdnumba.kernels.cpu.reductions import ordered_sum

DTYPES = [np.float32, np.float64]
KINDS = ["none", "index", "onehot", "soft"]


def problem(rng, n_rows, n_cols, dtype, kind):
    s = (3 * rng.standard_normal((n_rows, n_cols))).astype(dtype)
    t = (3 * rng.standard_normal((n_rows, n_cols))).astype(dtype)
    idx = rng.integers(0, n_cols, n_rows)
    labels = {
        "none": None,
        "index": idx,
        "onehot": np.eye(n_cols, dtype=dtype)[idx] if n_cols <= 2000 else None,
        "soft": rng.dirichlet(np.ones(n_cols), n_rows).astype(dtype),
    }[kind]
    return s, t, labels


def assert_same_bits(a, b, ctx=""):
    assert a[0] == b[0] or (math.isnan(a[0]) and math.isnan(b[0])), f"{ctx}: loss {a[0]!r} != {b[0]!r}"
    assert a[1].dtype == b[1].dtype
    assert a[1].tobytes() == b[1].tobytes(), f"{ctx}: gradients differ in their bits"


@pytest.fixture
def numba_threads():
    """Set Numba's thread count inside a test; the previous count is restored after."""
    previous = numba.get_num_threads()
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Numba has a single thread here: nothing to compare")
    yield numba.set_num_threads
    numba.set_num_threads(previous)


# --- thread counts, repetition, alignment ---------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bit_identical_with_1_and_2_numba_threads(rng, numba_threads, dtype, kind):
    # 67 and 40 rows span several 16-row chunks, so both threads get work.
    for shape in [(67, 33), (40, 1000), (3, 3000)]:
        s, t, y = problem(rng, *shape, dtype, kind)
        for temperature in (0.5, 4.0):
            results = {}
            for threads in (1, 2, 1):
                numba_threads(threads)
                assert numba.get_num_threads() == threads
                results.setdefault(threads, []).append(
                    kd_loss(s, t, y, temperature=temperature, alpha=0.3))
            ctx = f"{np.dtype(dtype).name} {kind} {shape} T={temperature}"
            assert_same_bits(results[1][0], results[2][0], ctx)
            assert_same_bits(results[1][0], results[1][1], ctx)


@pytest.mark.parametrize("dtype", DTYPES)
def test_repeated_calls_are_bit_identical(rng, dtype):
    s, t, y = problem(rng, 50, 700, dtype, "soft")
    first = kd_loss(s, t, y)
    for _ in range(5):
        assert_same_bits(first, kd_loss(s, t, y))


@pytest.mark.parametrize("dtype", DTYPES)
def test_independent_of_memory_alignment(rng, dtype):
    """Vectorised loops must not peel by address: the same values at any offset give the
    same bits (NumPy only guarantees 16-byte alignment of fresh arrays)."""
    for n_rows, n_cols in [(5, 1000), (3, 37), (2, 5000)]:
        s0, t0, y = problem(rng, n_rows, n_cols, dtype, "index")
        want = kd_loss(s0, t0, y)
        n = n_rows * n_cols
        for offset in range(1, 16):
            bs, bt = np.empty(n + 16, dtype), np.empty(n + 16, dtype)
            s = bs[offset:offset + n].reshape(n_rows, n_cols)
            t = bt[15 - offset:15 - offset + n].reshape(n_rows, n_cols)
            s[...], t[...] = s0, t0
            assert_same_bits(want, kd_loss(s, t, y), f"offset {offset}")


def test_gradient_rows_do_not_depend_on_the_other_rows(rng):
    """Each row is computed independently: a row's gradient times B is the same whatever the
    rest of the batch (the determinism argument for any row split between threads)."""
    s, t, y = problem(rng, 40, 300, np.float32, "index")
    full = kd_loss(s, t, y)[1] * np.float32(40)
    for i in (0, 17, 39):
        alone = kd_loss(s[i:i + 1], t[i:i + 1], y[i:i + 1])[1][0]
        np.testing.assert_allclose(alone, full[i], rtol=0, atol=1e-6 * np.abs(alone).max())


# --- concurrent calls from Python threads ---------------------------------------------------

def concurrent_matches_serial(problems, n_workers=4, repeats=3, thread_counts=(None,)):
    """Run every problem ``repeats`` times from a pool of Python threads (each task may set
    its own Numba thread count, which is thread-local) and compare with serial results."""
    serial = [kd_loss(s, t, y, temperature=2.0, alpha=0.3) for s, t, y in problems]

    def task(i, threads):
        if threads is not None:
            numba.set_num_threads(threads)
        return kd_loss(*problems[i], temperature=2.0, alpha=0.3)

    tasks = [(i, thread_counts[(k + i) % len(thread_counts)])
             for k in range(repeats) for i in range(len(problems))]
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        futures = [(i, pool.submit(task, i, threads)) for i, threads in tasks]
        for i, future in futures:
            assert_same_bits(serial[i], future.result(timeout=120), f"problem {i}")


def test_concurrent_calls_match_serial_calls(rng):
    # 256 x 520 elements: above SERIAL_BELOW, so the parallel builds race.
    assert 256 * 520 >= _policy.SERIAL_BELOW
    problems = [problem(rng, 256, 520, DTYPES[i % 2], KINDS[i % 4]) for i in range(8)]
    concurrent_matches_serial(problems)


def test_concurrent_calls_with_mixed_numba_thread_counts(rng, numba_threads):
    problems = [problem(rng, 64, 300, DTYPES[i % 2], KINDS[i % 4]) for i in range(4)]
    concurrent_matches_serial(problems, repeats=4, thread_counts=(1, 2))


_WORKQUEUE_SCRIPT = textwrap.dedent("""
    import numpy as np, numba
    from concurrent.futures import ThreadPoolExecutor
    from kdnumba.functional import kd_loss
    rng = np.random.default_rng(0)
    # 256 x 600 elements: above SERIAL_BELOW, so the parallel builds run.
    probs = [((3 * rng.standard_normal((256, 600))).astype(dt),
              (3 * rng.standard_normal((256, 600))).astype(dt),
              rng.integers(0, 600, 256)) for dt in (np.float32, np.float64) * 2]
    serial = [kd_loss(*p) for p in probs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda p: kd_loss(*p), probs * 3))
    for i, r in enumerate(results):
        want = serial[i % len(probs)]
        assert r[0] == want[0] and r[1].tobytes() == want[1].tobytes(), i
    print("layer", numba.threading_layer())
""")


def test_concurrent_calls_under_the_workqueue_layer():
    """``workqueue`` aborts the process on concurrent parallel launches unless they are
    serialised (``_policy.kernel_launch``); run it in a child process."""
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    out = subprocess.run([sys.executable, "-c", _WORKQUEUE_SCRIPT], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["layer", "workqueue"]


_FRESH_VS_CACHED_SCRIPT = textwrap.dedent("""
    import numpy as np
    from kdnumba.functional import kd_loss
    rng = np.random.default_rng(0)
    s, t = rng.standard_normal((2, 4, 60)).astype(np.float32)
    y = rng.dirichlet(np.ones(60), 4).astype(np.float32)
    loss, grad = kd_loss(s, t, y)
    print(loss.hex(), grad.tobytes().hex())
""")


def test_freshly_compiled_and_cached_kernels_agree(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", _FRESH_VS_CACHED_SCRIPT], env=env,
                           capture_output=True, text=True, timeout=300) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    assert runs[0].stdout == runs[1].stdout


# --- ordered reductions ---------------------------------------------------------------------

def test_ordered_sum_accuracy_and_repeatability(rng):
    x = rng.standard_normal(1001) * 10.0 ** rng.uniform(-8, 8, 1001)
    total = ordered_sum(x)
    assert type(total) is float
    assert abs(total - math.fsum(x)) <= 1001 * np.finfo(np.float64).eps * np.abs(x).sum()
    assert all(ordered_sum(x) == total for _ in range(3))
    assert ordered_sum(np.zeros(0)) == 0.0
    assert ordered_sum(np.array([2.5])) == 2.5


def test_ordered_sum_independent_of_alignment(rng):
    x = rng.standard_normal(1001) * 10.0 ** rng.uniform(-8, 8, 1001)
    buf = np.empty(x.size + 16)
    results = set()
    for offset in range(16):
        view = buf[offset:offset + x.size]
        view[:] = x
        results.add(ordered_sum(view))
    assert len(results) == 1


def test_ordered_sum_accumulates_float32_in_float64():
    x = np.array([1.0] + [2.0 ** -24] * 4096, dtype=np.float32)
    assert np.float32(1.0) + np.float32(2.0 ** -24) == np.float32(1.0)  # lost in float32
    assert ordered_sum(x) == 1.0 + 4096 * 2.0 ** -24
    assert ordered_sum.nopython_signatures[-1].return_type == numba.float64


# --- the policy -----------------------------------------------------------------------------

def test_policy_flags_on_the_kernels():
    assert not {"nnan", "ninf", "fast"} & _policy.FASTMATH_FLAGS
    opts = softmax_kl.kd_rows.targetoptions
    assert set(opts["fastmath"]) == set(_policy.FASTMATH_FLAGS)
    assert opts["error_model"] == "numpy" and opts["nogil"] is True and opts["parallel"]
    assert type(softmax_kl.kd_rows._cache).__name__ != "NullCache"  # cache=True
    assert type(ordered_sum._cache).__name__ != "NullCache"
    assert not ordered_sum.targetoptions.get("parallel", False)


@pytest.mark.parametrize("layer, serialised", [
    (None, True), ("workqueue", True), ("omp", False), ("tbb", False)])
def test_kernel_launch_serialises_only_unsafe_layers(monkeypatch, layer, serialised):
    monkeypatch.setattr(_policy, "_active_threading_layer", lambda: layer)
    assert not _policy._launch_lock.locked()
    with _policy.kernel_launch():
        assert _policy._launch_lock.locked() is serialised
    assert not _policy._launch_lock.locked()
    with pytest.raises(RuntimeError, match="boom"):
        with _policy.kernel_launch():
            raise RuntimeError("boom")
    assert not _policy._launch_lock.locked()  # released on errors too


def test_kernel_launch_nests_and_restores_the_serial_choice():
    state = _policy._launch_state
    assert state.serial is False
    with _policy.kernel_launch(10):
        assert state.serial is True
        with _policy.kernel_launch(_policy.SERIAL_BELOW):
            assert state.serial is False
        with _policy.kernel_launch(None):
            assert state.serial is False
        assert state.serial is True
    assert state.serial is False
    with pytest.raises(RuntimeError, match="boom"):
        with _policy.kernel_launch(10):
            raise RuntimeError("boom")
    assert state.serial is False


def test_active_threading_layer_is_reported(rng):
    kd_loss(*problem(rng, 2, 3, np.float64, "none"))  # a parallel kernel has run
    layer = _policy._active_threading_layer()
    assert layer == numba.threading_layer()
    assert layer in {"omp", "tbb", "workqueue"}
