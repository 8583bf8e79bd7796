"""``import kdnumba`` and first calls on read-only installs, with and without caches.

Each scenario copies the package to a temporary directory, makes it read-only
and runs a small ``feature_loss`` in a fresh interpreter. Tests run as root
here, and root ignores file permissions; the child therefore drops
CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from its bounding set
(``prctl(PR_CAPBSET_DROP)``, in a launcher that then ``exec``s it), which makes root obey permission bits
like any user. Each child checks that it cannot write into its package.

The regression: with ``numba.njit(cache=True)`` applied at import, ``import
kdnumba`` raised ``RuntimeError: cannot cache function 'ordered_sum': no
locator available`` on such an install, and a read-only warm NUMBA_CACHE_DIR
was ignored.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from kdnumba import _policy

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="permission simulation uses Linux prctl")

ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import hashlib, json, os, sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import numba, numpy as np
    import kdnumba
    from kdnumba.functional import feature_loss
    rng = np.random.default_rng(11)
    s = rng.standard_normal((64, 48)).astype(np.float32)
    t = rng.standard_normal((64, 48)).astype(np.float32)
    loss, grad = feature_loss(s, t)
    again = feature_loss(s, t)[0]
from kdnumba._policy import ParallelKernel
hits = misses = 0
for name, mod in list(sys.modules.items()):
    if name.startswith("kdnumba"):
        for obj in vars(mod).values():
            # A parallel kernel is a ParallelKernel holding a parallel and a serial build.
            builds = obj.builds if isinstance(obj, ParallelKernel) else (obj,)
            for build in builds:
                if isinstance(build, numba.core.dispatcher.Dispatcher):
                    hits += sum(build.stats.cache_hits.values())
                    misses += sum(build.stats.cache_misses.values())
pkg = os.path.dirname(kdnumba.__file__)
try:
    open(os.path.join(pkg, "probe"), "w").close()
    pkg_writable = True
except OSError:
    pkg_writable = False
print(json.dumps({
    "file": kdnumba.__file__, "pkg_writable": pkg_writable,
    "result": [loss.hex(), again.hex(), hashlib.sha256(grad.tobytes()).hexdigest()],
    "hits": hits, "misses": misses,
    "warnings": [f"{w.category.__name__}: {w.message}" for w in caught
                 if "cach" in str(w.message).lower()],
}))
'''

# Run before the child: drop root's power over file permissions, then exec it.
# (A launcher rather than preexec_fn, which is unsafe in a threaded process.)
_DROP_AND_EXEC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
        sys.exit(77)
os.execv(sys.executable, [sys.executable] + sys.argv[1:])
"""


def _read_only(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        mode = p.stat().st_mode
        p.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _writable_again(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)


@pytest.fixture(scope="module")
def install(tmp_path_factory):
    """A read-only copy of the package and a read-only, empty HOME."""
    root = tmp_path_factory.mktemp("install")
    site = root / "site"
    shutil.copytree(ROOT / "kdnumba", site / "kdnumba",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (root / "home").mkdir()
    (root / "cache").mkdir()
    _read_only(site)
    _read_only(root / "home")
    yield root
    _writable_again(root)


@pytest.fixture(scope="module")
def cold(install):
    """First runs, all at once (compiling is most of the time): one with no
    cache at all, and two racing to fill one empty KDNUMBA_CACHE_DIR."""
    no_cache = _start(install)
    racers = [_start(install, KDNUMBA_CACHE_DIR=str(install / "cache")) for _ in range(2)]
    return {"no_cache": _finish(no_cache, install),
            "racers": [_finish(p, install) for p in racers]}


def _start(root: Path, **env_extra) -> subprocess.Popen:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(root / "home"),
           "PYTHONPATH": str(root / "site"), "NUMBA_NUM_THREADS": "2"}
    env.update(env_extra)
    launcher = ["-c", _DROP_AND_EXEC] if os.geteuid() == 0 else []
    return subprocess.Popen([sys.executable, *launcher, "-c", CHILD], env=env, cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, root: Path) -> dict:
    out, err = proc.communicate(timeout=180)
    if proc.returncode == 77:
        pytest.skip("cannot drop root's file permissions (prctl) to simulate read-only")
    assert proc.returncode == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report["file"].startswith(str(root / "site"))  # the copy, not the repo
    assert not report["pkg_writable"]  # the simulation holds
    assert report["result"][0] == report["result"][1]
    return report


def _run(root: Path, **env_extra) -> dict:
    return _finish(_start(root, **env_extra), root)


def test_read_only_install_without_writable_home_compiles_in_memory(cold):
    report = cold["no_cache"]
    assert report["misses"] > 0 and report["hits"] == 0  # compiled, nothing to load
    [warning] = report["warnings"]  # exactly one, and it says what to do
    assert warning.startswith("KdnumbaCacheWarning")
    assert "KDNUMBA_CACHE_DIR" in warning and "NUMBA_CACHE_DIR" in warning
    assert report["result"] == cold["racers"][0]["result"]


def test_two_processes_fill_one_empty_cache_at_once(install, cold):
    first, second = cold["racers"]
    assert first["result"] == second["result"]
    for report in (first, second):
        assert report["warnings"] == [] and report["misses"] > 0
    assert list((install / "cache").rglob("*.nbi"))
    assert list((install / "cache").rglob("*.nbc"))


@pytest.mark.parametrize("variable, home", [("NUMBA_CACHE_DIR", "home"),
                                            ("KDNUMBA_CACHE_DIR", "writable_home")])
def test_a_read_only_warm_cache_is_used(install, cold, variable, home):
    """No compilation at all, the same bits as the fresh compile, no warning --
    also when HOME is writable (Numba alone then ignored the read-only cache)."""
    _read_only(install / "cache")
    (install / "writable_home").mkdir(exist_ok=True)
    warm = _run(install, HOME=str(install / home), **{variable: str(install / "cache")})
    assert warm["misses"] == 0 and warm["hits"] > 0
    assert warm["warnings"] == []
    assert warm["result"] == cold["racers"][0]["result"]
    assert not list((install / "writable_home").rglob("*.nbi"))  # nothing recompiled


# --- the cache object itself, in process ---------------------------------------------

_MODULE = textwrap.dedent('''
    from kdnumba._policy import jit

    @jit
    def twice(x):
        return x * 2
''')


@pytest.fixture
def tiny_kernel(tmp_path, monkeypatch):
    """A one-line kernel in its own module, cached under a fresh KDNUMBA_CACHE_DIR."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "kd_tiny_kernel.py").write_text(_MODULE)
    monkeypatch.setenv(_policy.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(tmp_path / "src"))

    def load():
        sys.modules.pop("kd_tiny_kernel", None)
        import kd_tiny_kernel
        return kd_tiny_kernel.twice

    yield load, tmp_path / "cache"
    sys.modules.pop("kd_tiny_kernel", None)


def test_cache_is_chosen_at_first_compile_not_at_import(tiny_kernel):
    load, cache = tiny_kernel
    twice = load()
    assert not cache.exists()  # import touched no directory
    assert twice(np.float64(1.5)) == 3.0
    assert twice.stats.cache_misses and list(cache.rglob("*.nbi"))
    assert twice.stats.cache_path.startswith(str(cache))
    again = load()
    assert again(np.float64(1.5)) == 3.0
    assert again.stats.cache_hits and not again.stats.cache_misses


def test_a_corrupt_cache_entry_is_a_miss_not_an_error(tiny_kernel):
    load, cache = tiny_kernel
    assert load()(np.int64(4)) == 8
    for f in cache.rglob("*.nbc"):
        f.write_bytes(b"not a pickle")
    again = load()
    assert again(np.int64(4)) == 8  # recompiled
    assert again.stats.cache_misses and not again.stats.cache_hits


def test_an_entry_saved_for_another_signature_is_not_loaded(tiny_kernel):
    load, cache = tiny_kernel
    assert load()(np.int64(4)) == 8  # data file 1: int64
    assert load()(np.float64(1.5)) == 3.0  # data file 2: float64
    [index] = cache.rglob("*.nbi")
    data = sorted(cache.rglob("*.nbc"))
    data[0].write_bytes(data[1].read_bytes())  # a racing writer's mix-up
    again = load()
    assert again(np.int64(4)) == 8 and again(np.float64(1.5)) == 3.0
    assert index.exists()


LOAD_CHILD = r'''
import hashlib, json, sys
import numba, numpy as np
from kdnumba.functional import kd_loss
rng = np.random.default_rng(5)
s = rng.standard_normal((64, 100)).astype(np.float32)
t = rng.standard_normal((64, 100)).astype(np.float32)
y = rng.integers(0, 100, 64)
loss, grad = kd_loss(s, t, y, temperature=2.0)
digest = hashlib.sha256(np.float64(loss).tobytes() + grad.tobytes()).hexdigest()
registries_loaded = "numba.np.arraymath" in sys.modules
# A compile after a cache load still sees every registry (np.linalg included).
later = numba.njit(lambda a: np.linalg.norm(np.sin(a)))(np.ones(4))
print(json.dumps({"digest": digest, "registries_loaded": registries_loaded,
                  "later": float(later)}))
'''


def test_a_cache_load_skips_numbas_registries_and_gives_the_same_bits(tmp_path):
    """Loading machine code from the disk cache initialises only Numba's
    runtime, not every typing/lowering registry (their import pulls in
    scipy.linalg, 0.2-0.5 s): the cached first call then costs ~0.1 s. The
    loaded kernel gives the compiled one's bits, and a later compile in the
    same process still works."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    env.pop("KDNUMBA_CACHE_DIR", None)
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", LOAD_CHILD], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    cold, warm = runs
    assert cold["registries_loaded"]          # compiling refreshes the registries
    assert not warm["registries_loaded"]      # loading from the cache does not
    assert warm["digest"] == cold["digest"]
    assert warm["later"] == cold["later"] == pytest.approx(np.linalg.norm(np.sin(np.ones(4))))
