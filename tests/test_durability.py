"""Nothing lost, nothing crashes: atomic files, the teacher cache under damage,
failures and concurrency, and checkpoints that survive ``SIGKILL``."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np
import pytest

from kdnumba.training import MLP, Distiller, EarlyStopping, TeacherCache
from kdnumba.training._atomic import (
    CorruptFileError,
    atomic_write,
    read_npz,
    write_npz,
)
from kdnumba.training.checkpoint import CHECKPOINT_FILE, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6))
    return x, rng.integers(0, 3, n)


def _mlp(seed=0):
    return MLP([6, 8, 5, 3], layer_names=["h1", "h2", "logits"], seed=seed, dtype=np.float64,
               learning_rate=1e-2)


class CountingTeacher:
    def __init__(self, model):
        self.model, self.calls, self.layer_names = model, 0, model.layer_names

    def forward(self, x, collect=()):
        self.calls += 1
        return self.model.forward(x, collect)

    def fingerprint(self):
        return self.model.fingerprint()


def _temp_files(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp") or ".tmp" in n)


def _python(code: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# -- the atomic-write helper ---------------------------------------------------------------
def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, lambda f: f.write(b"old"))

    def failing(f):
        f.write(b"half of the new")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(path, failing)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_read_npz_detects_damage(tmp_path):
    path = tmp_path / "a.npz"
    write_npz(path, {"a": np.arange(1000.0)})
    np.testing.assert_array_equal(read_npz(path)["a"], np.arange(1000.0))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit inside the array's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="CRC|checksum"):
        read_npz(path)
    # a consistent zip whose contents changed after the checksum (zip's CRC agrees)
    write_npz(path, {"a": np.arange(1000.0)})
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["a"][500] += 1.0
    np.savez(path, **arrays)
    with pytest.raises(CorruptFileError, match="checksum"):
        read_npz(path)
    path.write_bytes(b"")
    with pytest.raises(CorruptFileError, match="empty"):
        read_npz(path)


# -- the teacher cache -----------------------------------------------------------------------
def _damage(kind, path):
    data = path.read_bytes()
    if kind == "empty":  # what a rename without fsync leaves after a power cut
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "bitflip":
        i = data.index(b"outputs.npy") + 200  # inside the outputs' data
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1:])
    elif kind == "garbage":
        path.write_bytes(os.urandom(len(data)))
    elif kind == "unsigned":  # a valid .npz without the checksum (another writer)
        np.savez(path, outputs=np.zeros((3, 3)))


@pytest.mark.parametrize("kind", ["empty", "truncated", "bitflip", "garbage", "unsigned"])
def test_unreadable_cache_file_warns_and_is_recomputed(tmp_path, kind):
    x, _ = _data()
    teacher = CountingTeacher(_mlp(9))
    first = TeacherCache(tmp_path).get(teacher, x, ("h2",))
    cache = TeacherCache(tmp_path)
    path = tmp_path / os.path.basename(cache.path(cache.key(x, ("h2",), teacher)))
    _damage(kind, path)
    with pytest.warns(UserWarning, match="unreadable teacher cache file"):
        again = cache.get(teacher, x, ("h2",))
    assert teacher.calls == 2 and cache.misses == 1
    np.testing.assert_array_equal(again.outputs, first.outputs)
    np.testing.assert_array_equal(again.activations["h2"], first.activations["h2"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # replaced: the next read is a clean hit
        TeacherCache(tmp_path).get(teacher, x, ("h2",))
    assert teacher.calls == 2


def test_cache_write_failure_warns_and_training_continues(tmp_path, monkeypatch):
    x, y = _data()
    real_fsync = os.fsync

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    teacher = CountingTeacher(_mlp(9))
    from kdnumba import DistillationLoss
    d = Distiller(_mlp(1), teacher, DistillationLoss(), epochs=2, batch_size=8,
                  cache=tmp_path / "c")
    with pytest.warns(UserWarning, match="could not write the teacher cache"):
        hist = d.fit(x, y)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert len(hist) == 2 and np.isfinite(hist["train_loss"]).all()
    assert os.listdir(tmp_path / "c") == []  # no partial file, no temporary file
    # a cache folder that cannot exist (its parent is a file): same
    (tmp_path / "file").write_text("")
    with pytest.warns(UserWarning, match="could not write the teacher cache"):
        out = TeacherCache(tmp_path / "file" / "cache").get(teacher, x, ("h2",))
    assert out.outputs.shape == (24, 3)


def test_clear_removes_stale_temporary_files(tmp_path):
    x, _ = _data()
    cache = TeacherCache(tmp_path)
    cache.get(_mlp(9), x)
    (tmp_path / ".teacher-0123.npz.a1b2c3.tmp").write_bytes(b"killed mid-write")
    (tmp_path / "teacher-0123.npz.tmp4242").write_bytes(b"an older version's temp file")
    (tmp_path / "notes.txt").write_text("not the cache's")
    assert cache.clear() == 3
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_cache_is_safe_from_threads(tmp_path):
    """8 threads, each with its own TeacherCache on one folder, miss and write the
    same key at the same moment; then 8 threads share one TeacherCache."""
    x, _ = _data(n=200)
    model = _mlp(9)
    expected = TeacherCache(tmp_path / "ref").get(model, x, ("h1",))
    for shared in (None, TeacherCache(tmp_path / "shared")):
        folder = tmp_path / ("shared" if shared else "own")
        teacher = CountingTeacher(model)
        barrier = threading.Barrier(8)
        results, errors = [], []

        def work(shared=shared, folder=folder, teacher=teacher, barrier=barrier,
                 results=results, errors=errors):
            try:
                cache = shared or TeacherCache(folder)
                barrier.wait()
                for _ in range(3):
                    results.append(cache.get(teacher, x, ("h1",)))
                    if shared is None:
                        cache.save(cache.key(x, ("h1",), teacher), results[-1])
            except BaseException as exc:  # noqa: BLE001 -- reported below
                errors.append(exc)

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            threads = [threading.Thread(target=work) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert errors == [] and len(results) == 24
        for r in results:
            np.testing.assert_array_equal(r.outputs, expected.outputs)
            np.testing.assert_array_equal(r.activations["h1"], expected.activations["h1"])
        assert _temp_files(folder) == []
        if shared is not None:
            assert teacher.calls == 1 and shared.misses == 1 and shared.hits == 23


_PROCESS_WORKER = """
    import sys, warnings
    import numpy as np
    warnings.simplefilter("error")  # a partial or unreadable file would warn
    # ... but a concurrent clear() may take a get()'s temporary file: it warns and goes on
    warnings.filterwarnings("ignore", "could not write the teacher cache")
    from kdnumba.training import MLP, TeacherCache
    folder, rounds = sys.argv[1], int(sys.argv[2])
    x = np.random.default_rng(0).standard_normal((300, 6))
    model = MLP([6, 8, 5, 3], layer_names=["h1", "h2", "logits"], seed=9, dtype=np.float64)
    want = model.predict(x)
    for i in range(rounds):
        cache = TeacherCache(folder)
        out = cache.get(model, x, ("h1",))
        assert np.array_equal(out.outputs, want)
        try:  # rewrite while the others read
            cache.save(cache.key(x, ("h1",), model), out)
        except FileNotFoundError:  # another process's clear() took our temporary file
            pass
        if i % 7 == 6:
            cache.clear()  # may remove another process's file or temporary file
    print("ok")
"""


def test_cache_is_safe_from_processes_sharing_the_folder(tmp_path):
    procs = [_python(_PROCESS_WORKER, str(tmp_path), "40") for _ in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip() == "ok", err[-3000:]
    assert _temp_files(tmp_path) == []


# -- checkpoints ------------------------------------------------------------------------------
_CHECKPOINT_WORKER = """
    import os, sys, time
    import numpy as np
    from kdnumba.training import MLP, Distiller, EarlyStopping, _atomic
    folder, marker, kill_in = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, 6)); y = rng.integers(0, 3, 24)
    student = MLP([6, 8, 5, 3], layer_names=["h1", "h2", "logits"], seed=1,
                  dtype=np.float64, learning_rate=1e-2)
    real, calls = _atomic.atomic_write, []

    def slow_write(path, write):
        calls.append(path)
        if len(calls) < kill_in:
            return real(path, write)

        def half_then_hang(f):  # write half of the new checkpoint, then wait for SIGKILL
            import io
            buf = io.BytesIO()
            write(buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            open(marker, "w").close()
            time.sleep(120)
        return real(path, half_then_hang)

    _atomic.atomic_write = slow_write
    Distiller(student, epochs=6, batch_size=8, seed=3, progress=False,
              early_stopping=EarlyStopping("val_loss", patience=10)).fit(
        x, y, validation=(x, y), checkpoint=folder)
"""


def test_sigkill_while_checkpointing_resumes_from_the_previous_checkpoint(tmp_path):
    x, y = _data(seed=0)
    folder, marker = tmp_path / "run", tmp_path / "writing"
    folder.mkdir()
    proc = _python(_CHECKPOINT_WORKER, str(folder), str(marker), "4")  # killed in epoch 3's
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the worker never reached its 4th checkpoint"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert len(_temp_files(folder)) == 1  # the half-written one, under a temporary name
    saved = load_checkpoint(folder / CHECKPOINT_FILE)
    assert saved.epoch == 3 and len(saved.history["epochs"]) == 3

    def trainer(student):
        return Distiller(student, epochs=6, batch_size=8, seed=3, progress=False,
                         early_stopping=EarlyStopping("val_loss", patience=10))

    resumed_student = _mlp(seed=7)  # other initial weights: all of them come from the file
    resumed = trainer(resumed_student).fit(x, y, validation=(x, y), checkpoint=folder,
                                           resume=True)
    whole_student = _mlp(seed=1)
    whole = trainer(whole_student).fit(x, y, validation=(x, y))
    assert len(resumed) == 6 and _temp_files(folder) == []
    assert resumed["train_loss"] == whole["train_loss"]
    assert resumed["val_loss"] == whole["val_loss"]
    assert resumed.best_epoch == whole.best_epoch
    for k, p in whole_student.parameters.items():
        np.testing.assert_array_equal(resumed_student.parameters[k], p, err_msg=k)
    assert load_checkpoint(folder / CHECKPOINT_FILE).epoch == 6
