"""Processes made after the parent ran a kernel: fork, spawn, forkserver, pools, DataLoader.

Each scenario runs in a fresh interpreter (a script written to ``tmp_path``), so
the test process's own threading layer plays no part and a child that Numba
kills cannot take pytest with it. Every wait is bounded.

The regression: under Numba's ``omp`` layer (GNU OpenMP), a ``fork``ed child
of a parent that had run any parallel kernel was killed ("fork() called from a
process already using GNU OpenMP, this is unsafe") at its first kernel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="fork and GNU OpenMP: the Linux story")

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import hashlib, json, multiprocessing as mp, sys
from concurrent.futures import ProcessPoolExecutor

import numba
import numpy as np


def compute():
    """kd_loss on a 512x300 float32 batch (above SERIAL_BELOW: all threads)."""
    from kdnumba import _policy
    from kdnumba.functional import kd_loss
    assert 512 * 300 >= _policy.SERIAL_BELOW
    rng = np.random.default_rng(3)
    s = rng.standard_normal((512, 300)).astype(np.float32)
    t = rng.standard_normal((512, 300)).astype(np.float32)
    y = rng.integers(0, 300, 512)
    loss, grad = kd_loss(s, t, y, temperature=2.0, alpha=0.5)
    return [loss.hex(), hashlib.sha256(grad.tobytes()).hexdigest(), numba.get_num_threads()]


def guarded():
    try:
        return compute()
    except Exception as exc:
        return ["error", f"{type(exc).__name__}: {exc}"]


def child(queue):
    queue.put(guarded())


def one_process(method):
    ctx = mp.get_context(method)
    queue = ctx.Queue()
    proc = ctx.Process(target=child, args=(queue,))
    proc.start()
    proc.join(90)
    if proc.is_alive():
        proc.kill()
        return {"exitcode": "hung", "results": []}
    results = [queue.get(timeout=10)] if not queue.empty() or proc.exitcode == 0 else []
    return {"exitcode": proc.exitcode, "results": results}


def pool():
    with ProcessPoolExecutor(2, mp_context=mp.get_context("fork")) as ex:
        futures = [ex.submit(guarded) for _ in range(3)]
        return {"exitcode": 0, "results": [f.result(timeout=90) for f in futures]}


def dataloader():
    import torch

    class Losses(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return guarded()

    loader = torch.utils.data.DataLoader(Losses(), batch_size=None, num_workers=2,
                                         timeout=90)
    assert loader.multiprocessing_context is None  # Linux default: fork
    return {"exitcode": 0, "results": [list(r) for r in loader]}


if __name__ == "__main__":
    how = sys.argv[1]
    if how == "other_library_first":  # a numba user started the default layer first
        @numba.njit(parallel=True)
        def other(x):
            for i in numba.prange(x.size):
                x[i] += 1.0
        other(np.zeros(10))
    parent = guarded()
    out = {"layer": numba.threading_layer(), "parent": parent,
           "parent_threads": numba.get_num_threads()}
    method = "fork" if how == "other_library_first" else how
    if method in ("fork", "spawn", "forkserver"):
        out.update(one_process(method))
    elif method == "pool":
        out.update(pool())
    elif method == "dataloader":
        out.update(dataloader())
    out["parent_after"] = guarded()
    out["parent_threads_after"] = numba.get_num_threads()
    print(json.dumps(out))
'''


def _run(tmp_path, how, **env_extra):
    script = tmp_path / "fork_scenario.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY")}
    env.update(NUMBA_NUM_THREADS="2", PYTHONPATH=str(ROOT), **env_extra)
    proc = subprocess.run([sys.executable, str(script), how], capture_output=True,
                          text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _assert_children_match_parent(out, stderr):
    assert out["exitcode"] == 0, stderr[-3000:]  # not killed (-15), not hung
    assert out["results"], stderr[-3000:]
    loss, grad_hash, parent_threads = out["parent"]
    assert parent_threads == 2
    for result in out["results"]:
        assert result[:2] == [loss, grad_hash], result  # bit-identical
    # The parent kept its thread pool: no silent fall to one thread.
    assert out["parent_after"] == out["parent"]
    assert out["parent_threads_after"] == 2


@pytest.mark.parametrize("how", ["fork", "spawn", "forkserver", "pool"])
def test_children_compute_what_the_parent_computed(tmp_path, how):
    out, stderr = _run(tmp_path, how)
    _assert_children_match_parent(out, stderr)
    assert "GNU OpenMP" not in stderr
    assert out["layer"] in {"tbb", "workqueue"}  # kdnumba's fork-safe choice


def test_torch_dataloader_workers_compute_what_the_parent_computed(tmp_path):
    pytest.importorskip("torch")
    out, stderr = _run(tmp_path, "dataloader")
    _assert_children_match_parent(out, stderr)
    assert len(out["results"]) == 4


def _assert_clear_error_not_a_kill(out, stderr):
    assert out["exitcode"] == 0, stderr[-3000:]  # the child ran to the end
    [(status, message)] = out["results"]
    assert status == "error"
    assert message.startswith("RuntimeError") and "GNU OpenMP" in message
    assert "spawn" in message and "NUMBA_THREADING_LAYER" in message
    assert "Terminating" not in stderr
    assert out["parent_after"] == out["parent"]


def test_fork_after_the_users_omp_layer_raises_a_clear_error(tmp_path):
    out, stderr = _run(tmp_path, "fork", NUMBA_THREADING_LAYER="omp")
    assert out["layer"] == "omp"
    _assert_clear_error_not_a_kill(out, stderr)


def test_fork_after_another_library_started_omp_raises_a_clear_error(tmp_path):
    try:
        from numba.np.ufunc import omppool  # noqa: F401
    except ImportError:
        pytest.skip("Numba's omp layer is not available here")
    if _tbb_loadable():
        pytest.skip("TBB is installed: Numba's own default layer is fork-safe")
    out, stderr = _run(tmp_path, "other_library_first")
    assert out["layer"] == "omp"
    _assert_clear_error_not_a_kill(out, stderr)


def _tbb_loadable() -> bool:
    from numba.np.ufunc import parallel
    try:
        parallel._check_tbb_version_compatible()
        from numba.np.ufunc import tbbpool  # noqa: F401
    except ImportError:
        return False
    return True


def test_layer_preference_in_process():
    """kdnumba prefers fork-safe layers unless the user chose (no kernel needed)."""
    from kdnumba import _policy
    assert _policy.FORK_SAFE_PRIORITY.index("workqueue") < _policy.FORK_SAFE_PRIORITY.index("omp")
    code = ("import os, numba.core.config as c; import kdnumba._policy as p; "
            "print(p.user_chose_threading_layer(), ' '.join(c.THREADING_LAYER_PRIORITY))")
    base = {k: v for k, v in os.environ.items()
            if k not in ("NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY")}
    base["PYTHONPATH"] = str(ROOT)

    def ask(**env):
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60, env={**base, **env}, check=True).stdout.split(" ", 1)

    assert ask() == ["False", "tbb workqueue omp\n"]
    assert ask(NUMBA_THREADING_LAYER_PRIORITY="omp workqueue tbb") == ["True",
                                                                       "omp workqueue tbb\n"]
    assert ask(NUMBA_THREADING_LAYER="omp")[0] == "True"
