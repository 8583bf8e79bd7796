"""The sharded teacher cache (issue #18): built across Dask workers, crash-safe,
top-K compressed, read out of core by the Distiller.

One module-scoped ``LocalCluster(n_workers=2, processes=True,
threads_per_worker=1)`` serves every cluster test (starting one costs ~4 s on
the 2-core CI machine). Its scheduler has ``allowed-failures=0``: a task whose
worker dies fails at once with ``KilledWorker`` instead of being retried, which
is how the killed-worker test interrupts a build deterministically (a teacher
that ``os._exit``\\ s its worker process on a given chunk, the first time only).

Bit-for-bit references are :func:`run_teacher` with ``batch_size=chunk_rows``:
a float32 matmul's bits may depend on the batch's row count (BLAS blocking),
so the reference runs the teacher on the same row blocks as the build.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

dask = pytest.importorskip("dask", reason="the sharded cache needs dask (pip install "
                                          "'kdnumba[scale]')")
pytest.importorskip("distributed", reason="the sharded cache needs dask.distributed "
                                          "(pip install 'kdnumba[scale]')")
pytest.importorskip("zarr", reason="the sharded cache needs zarr (pip install 'kdnumba[scale]')")

from kdnumba import DistillationLoss  # noqa: E402
from kdnumba.training import (  # noqa: E402
    MLP,
    Distiller,
    TeacherOutputs,
    build_teacher_cache,
    open_teacher_cache,
    run_teacher,
    topk_outputs,
)
from kdnumba.training._atomic import CorruptFileError  # noqa: E402
from kdnumba.training.out_of_core import Prefetcher, chunk_shuffled_order  # noqa: E402

ROWS, FEATURES, CLASSES, CHUNK = 600, 8, 12, 64  # 10 chunks, the last one partial
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_teacher(seed=1) -> MLP:
    return MLP([FEATURES, 16, 6, CLASSES], layer_names=["h", "emb", "logits"], seed=seed)


def make_student(seed=0) -> MLP:
    return MLP([FEATURES, 6, CLASSES], layer_names=["emb", "logits"], seed=seed,
               learning_rate=1e-2)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((ROWS, FEATURES)).astype(np.float32)
    y = rng.integers(0, CLASSES, ROWS)
    return x, y


@pytest.fixture(scope="module")
def reference(data):
    return run_teacher(make_teacher(), data[0], ("emb",), batch_size=CHUNK)


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                               dashboard_address=None, silence_logs=40)
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


class ExitOnceTeacher:
    """The MLP teacher, except that the first forward over the chunk starting
    with ``trigger_row`` kills its process (``os._exit``), after leaving a
    marker file so that the re-run goes through. Same fingerprint as the MLP:
    the re-run resumes the same cache."""

    def __init__(self, inner, trigger_row, marker):
        self.inner, self.trigger_row, self.marker = inner, trigger_row, marker

    def fingerprint(self):
        return self.inner.fingerprint()

    def forward(self, x, collect=()):
        if (len(x) > 1 and np.array_equal(x[0], self.trigger_row)
                and not os.path.exists(self.marker)):
            open(self.marker, "w").close()
            os._exit(1)
        return self.inner.forward(x, collect)


class RaggedTeacher:
    """The MLP teacher, with one output fewer on the chunk starting with ``row``."""

    def __init__(self, row):
        self.inner, self.row = make_teacher(), row

    def forward(self, x, collect=()):
        out, acts = self.inner.forward(x, collect)
        return (out[:, :-1] if len(x) > 1 and np.array_equal(x[0], self.row) else out), acts


class UnpicklableTeacher:
    def __init__(self):
        self.inner, self.hook = make_teacher(), lambda a: a

    def forward(self, x, collect=()):
        return self.inner.forward(x, collect)


def assert_dense_equal(cache, ref):
    out, acts = cache.batch(slice(None))
    assert out.dtype == ref.outputs.dtype and np.array_equal(out, ref.outputs)
    assert np.array_equal(acts["emb"], ref.activations["emb"])


# -- building ----------------------------------------------------------------------------------
def test_two_workers_build_the_in_memory_outputs_bit_for_bit(client, data, reference, tmp_path):
    cache = build_teacher_cache(make_teacher(), data[0], tmp_path / "c", layers=("emb",),
                                chunk_rows=CHUNK, client=client, progress=False)
    assert len(cache) == ROWS and cache.n_chunks == 10 and cache.topk is None
    assert_dense_equal(cache, reference)
    idx = np.array([599, 0, 64, 63, 300, -1])
    out, acts = cache.batch(idx)
    assert np.array_equal(out, reference.outputs[idx])
    assert np.array_equal(acts["emb"], reference.activations["emb"][idx])
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["n_rows"] == ROWS and manifest["layers"] == ["emb"]
    assert len(manifest["chunks"]) == 10 and all(c["checksum"] for c in manifest["chunks"])
    # The workers ran the tasks: both of them took chunks.
    assert len(client.scheduler_info()["workers"]) == 2


def test_top_k_from_a_dask_array_on_the_cluster(client, data, reference, tmp_path):
    import dask.array as da
    x = da.from_array(data[0], chunks=(150, FEATURES))  # not aligned with the cache's chunks
    cache = build_teacher_cache(make_teacher(), x, tmp_path / "k", topk=4, chunk_rows=CHUNK,
                                client=client, progress=False)
    (values, indices), acts = cache.batch(slice(None))
    ref_v, ref_i = topk_outputs(reference.outputs, 4)
    assert np.array_equal(values, ref_v) and np.array_equal(indices, ref_i)
    assert indices.dtype == np.int16 and len(acts) == 0
    # the K largest, descending
    assert np.array_equal(values[:, 0], reference.outputs.max(axis=1))
    assert (np.diff(values, axis=1) <= 0).all()


def test_zarr_and_memmap_inputs(client, data, reference, tmp_path):
    import zarr
    z = zarr.create_array(str(tmp_path / "x.zarr"), shape=data[0].shape, chunks=(100, FEATURES),
                          dtype="float32")
    z[:] = data[0]
    cache = build_teacher_cache(make_teacher(), z, tmp_path / "z", layers=["emb"],
                                chunk_rows=CHUNK, client=client, progress=False)
    assert_dense_equal(cache, reference)
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32,
                                   shape=data[0].shape)
    mm[:] = data[0]
    mm.flush()
    ro = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert_dense_equal(build_teacher_cache(make_teacher(), ro, tmp_path / "m", layers=["emb"],
                                           chunk_rows=CHUNK, progress=False), reference)


def test_a_killed_worker_then_a_rerun_completes_identically(client, data, reference, tmp_path):
    x = data[0]
    teacher = ExitOnceTeacher(make_teacher(), x[7 * CHUNK], str(tmp_path / "died"))
    path = tmp_path / "c"
    from distributed import KilledWorker
    with pytest.raises(KilledWorker) as info:
        build_teacher_cache(teacher, x, path, layers=("emb",), chunk_rows=CHUNK, client=client,
                            progress=False)
    assert os.path.exists(tmp_path / "died")
    assert any("resume" in note for note in getattr(info.value, "__notes__", []))
    with pytest.raises(ValueError, match="incomplete .* did not finish"):
        open_teacher_cache(path)
    records = {name: os.stat(path / "chunks" / name).st_mtime_ns
               for name in os.listdir(path / "chunks") if name.endswith(".json")}
    assert 0 < len(records) < 10 and "00000007.json" not in records
    client.wait_for_workers(2, timeout=60)
    cache = build_teacher_cache(teacher, x, path, layers=("emb",), chunk_rows=CHUNK,
                                client=client, progress=False)
    assert_dense_equal(cache, reference)
    for name, mtime in records.items():  # finished chunks were kept (verified, not redone)
        assert os.stat(path / "chunks" / name).st_mtime_ns == mtime


def test_a_killed_client_resumes(data, reference, tmp_path):
    """A local build whose process dies on chunk 4 (as a Ctrl-C'd or OOM-killed
    client would), then the same call again."""
    path = tmp_path / "c"
    script = textwrap.dedent(f"""
        import os, numpy as np
        from kdnumba.training import MLP, build_teacher_cache
        class Dying(MLP):
            def forward(self, x, collect=()):
                if len(x) > 1 and np.array_equal(x[0], X[4 * {CHUNK}]):
                    os._exit(3)
                return super().forward(x, collect)
        X = np.random.default_rng(0).standard_normal(({ROWS}, {FEATURES})).astype(np.float32)
        t = Dying([{FEATURES}, 16, 6, {CLASSES}], layer_names=["h", "emb", "logits"], seed=1)
        build_teacher_cache(t, X, {str(path)!r}, layers=("emb",), chunk_rows={CHUNK},
                            progress=False)
    """)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          timeout=120)
    assert proc.returncode == 3, proc.stderr.decode()[-2000:]
    with pytest.raises(ValueError, match=r"incomplete \(4 of 10 chunks done\)"):
        open_teacher_cache(path)
    cache = build_teacher_cache(make_teacher(), data[0], path, layers=("emb",),
                                chunk_rows=CHUNK, progress=False)
    assert_dense_equal(cache, reference)


# -- errors -----------------------------------------------------------------------------------
@pytest.fixture
def local_cache(data, tmp_path):
    return build_teacher_cache(make_teacher(), data[0], tmp_path / "c", layers=("emb",),
                               chunk_rows=CHUNK, progress=False)


def _chunk_file(cache, array, i):
    return os.path.join(cache.path, array, "c", str(i), "0")


def test_a_truncated_chunk_is_a_clear_error_and_a_rebuild_repairs_it(local_cache, data,
                                                                      reference):
    path = _chunk_file(local_cache, "outputs", 2)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    cache = open_teacher_cache(local_cache.path)
    cache.batch(np.arange(0, 64))  # chunk 0 is fine
    with pytest.raises(CorruptFileError, match=r"chunk 2 \(rows 128\.\.191\) of 'outputs' is "
                                               r"truncated or corrupted"):
        cache.batch(np.array([130]))
    with pytest.warns(UserWarning, match="chunk 2 is damaged"):
        repaired = build_teacher_cache(make_teacher(), data[0], local_cache.path,
                                       layers=("emb",), chunk_rows=CHUNK, progress=False)
    assert_dense_equal(repaired, reference)


def test_a_corrupted_chunk_fails_its_checksum(local_cache):
    path = _chunk_file(local_cache, "activations/0", 3)
    with open(path, "r+b") as f:
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorruptFileError, match=r"chunk 3 \(rows 192\.\.255\) is corrupted "
                                               r"\(checksum mismatch"):
        open_teacher_cache(local_cache.path).verify()


def test_verify_always_rechecks_a_chunk_damaged_after_its_first_read(local_cache):
    always = open_teacher_cache(local_cache.path, keep_chunks=1, verify="always")
    once = open_teacher_cache(local_cache.path, keep_chunks=1)
    for view in (always, once):
        view.batch(np.arange(192, 200))
    path = _chunk_file(local_cache, "outputs", 3)
    with open(path, "r+b") as f:
        f.write(b"\x00\x01\x02\x03")
    for view in (always, once):
        view.batch(np.arange(0, 8))  # evicts chunk 3
    with pytest.raises(CorruptFileError, match="chunk 3"):
        always.batch(np.arange(192, 200))
    once.batch(np.arange(192, 200))  # verified on its first read: not hashed again
    with pytest.raises(CorruptFileError, match="chunk 3"):
        once.verify()
    with pytest.raises(ValueError, match="verify must be"):
        open_teacher_cache(local_cache.path, verify="never")


def test_fingerprint_and_shape_mismatches(local_cache, data, tmp_path):
    x = data[0]
    with pytest.raises(ValueError, match="fingerprint mismatch: the store was built by another "
                                         "teacher"):
        build_teacher_cache(make_teacher(seed=2), x, local_cache.path, layers=("emb",),
                            chunk_rows=CHUNK)
    other = x.copy()
    other[200, 3] += 1.0
    with pytest.raises(ValueError, match=r"fingerprint mismatch: the inputs of chunk 3 \(rows "
                                         r"192\.\.255\) differ .* \(other data\)"):
        build_teacher_cache(make_teacher(), other, local_cache.path, layers=("emb",),
                            chunk_rows=CHUNK)
    assert np.array_equal(other[200, 3] - 1.0, x[200, 3])  # the caller's array untouched
    with pytest.raises(ValueError, match="fingerprint mismatch: the store was built from other "
                                         "data"):
        build_teacher_cache(make_teacher(), x[:500], local_cache.path, layers=("emb",),
                            chunk_rows=CHUNK)
    with pytest.raises(ValueError, match="another topk"):
        build_teacher_cache(make_teacher(), x, local_cache.path, layers=("emb",),
                            chunk_rows=CHUNK, topk=3)
    open_teacher_cache(local_cache.path)  # none of that touched the cache

    with pytest.raises(ValueError, match=r"shape mismatch: teacher.forward returned outputs of "
                                         r"shape \(64, 11\) for chunk 2"):
        build_teacher_cache(RaggedTeacher(x[128]), x, tmp_path / "r", chunk_rows=CHUNK,
                            progress=False)
    # the manifest disagreeing with an array
    manifest = json.loads(open(os.path.join(local_cache.path, "manifest.json")).read())
    manifest["n_classes"] = CLASSES + 1
    with open(os.path.join(local_cache.path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(ValueError, match="shape mismatch: 'outputs' is float32"):
        open_teacher_cache(local_cache.path)


def test_bad_arguments(data, tmp_path):
    x = data[0]
    t = make_teacher()
    with pytest.raises(TypeError, match="teacher must have forward"):
        build_teacher_cache(object(), x, tmp_path / "a")
    with pytest.raises(TypeError, match="teacher must pickle"):
        build_teacher_cache(UnpicklableTeacher(), x, tmp_path / "a")
    with pytest.raises(TypeError, match="inputs must be a NumPy array"):
        build_teacher_cache(t, x.tolist(), tmp_path / "a")
    with pytest.raises(ValueError, match="chunk_rows must be"):
        build_teacher_cache(t, x, tmp_path / "a", chunk_rows=0)
    with pytest.raises(ValueError, match="topk must be at most"):
        build_teacher_cache(t, x, tmp_path / "a", topk=CLASSES + 1)
    with pytest.raises(ValueError, match="unknown layer"):
        build_teacher_cache(t, x, tmp_path / "a", layers=("nope",))
    with pytest.raises(TypeError, match="client must be a dask.distributed.Client"):
        build_teacher_cache(t, x, tmp_path / "a", client="tcp://scheduler:8786")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "precious.txt").write_text("x")
    with pytest.raises(ValueError, match="is not a kdnumba teacher cache"):
        build_teacher_cache(t, x, tmp_path / "b")
    with pytest.raises(FileNotFoundError):
        open_teacher_cache(tmp_path / "none")
    with pytest.raises(ValueError, match="not a kdnumba teacher cache"):
        open_teacher_cache(tmp_path / "b")


# -- training from the store ----------------------------------------------------------------------
class RecordingMLP(MLP):
    """An MLP that records every step's output gradient."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = []

    def backward(self, output_grad, intermediate_grads=None):
        self.steps.append((np.array(output_grad), {k: np.array(g) for k, g in
                                                    (intermediate_grads or {}).items()}))
        return super().backward(output_grad, intermediate_grads)


def test_training_from_the_store_matches_memory_step_for_step(local_cache, data, reference):
    from kdnumba import RelationalDistillationStrategy
    x, y = data
    runs = []
    for teacher, chunk_rows in ((local_cache, None), (reference, CHUNK)):
        student = RecordingMLP([FEATURES, 6, CLASSES], layer_names=["emb", "logits"], seed=0)
        strategy = RelationalDistillationStrategy(layer_name="emb", temperature=2.0, alpha=0.3)
        d = Distiller(student, teacher, strategy, batch_size=48, epochs=2, seed=5,
                      shuffle_chunk_rows=chunk_rows, progress=False)
        assert d.shuffle_chunk_rows == CHUNK
        history = d.fit(x, y)
        runs.append((student, history))
    (a, ha), (b, hb) = runs
    assert len(a.steps) == len(b.steps) == 2 * -(-ROWS // 48)
    for (ga, ia), (gb, ib) in zip(a.steps, b.steps):
        assert np.array_equal(ga, gb)
        assert ia.keys() == ib.keys() and all(np.array_equal(ia[k], ib[k]) for k in ia)
    assert ha["train_loss"] == hb["train_loss"]
    for k, p in a.parameters.items():
        assert np.array_equal(p, b.parameters[k])


def test_top_k_cache_trains_like_kd_loss_on_the_truncated_teacher(data, reference, tmp_path):
    x, y = data
    k = 4
    cache = build_teacher_cache(make_teacher(), x, tmp_path / "k", topk=k, chunk_rows=CHUNK,
                                progress=False)
    values, indices = topk_outputs(reference.outputs, k)
    truncated = np.full_like(reference.outputs, -1e30)  # exp(-1e30 / T) == 0: off the top K
    np.put_along_axis(truncated, indices.astype(np.int64), values, axis=1)
    students = []
    for teacher, chunk_rows in ((cache, None), (TeacherOutputs(truncated, {}), CHUNK)):
        student = make_student()
        d = Distiller(student, teacher, DistillationLoss(temperature=2.0, alpha=0.3),
                      batch_size=ROWS, epochs=1, seed=3, shuffle_chunk_rows=chunk_rows,
                      progress=False)
        d.fit(x, y)  # one step over the whole set
        students.append(student)
    for name, p in students[0].parameters.items():
        np.testing.assert_allclose(p, students[1].parameters[name], rtol=1e-5, atol=1e-7)
    # and the losses of that step agree
    s_out, _ = make_student().forward(x)
    (tv, ti), _ = cache.batch(slice(None))
    d = Distiller(make_student(), cache, DistillationLoss(temperature=2.0, alpha=0.3))
    sparse = d.compute_losses(s_out, {}, (tv, ti), {}, y)
    from kdnumba.functional import kd_loss
    dense_loss, dense_grad = kd_loss(s_out, truncated, y, temperature=2.0, alpha=0.3)
    assert sparse.output_loss == pytest.approx(dense_loss, rel=1e-5)
    np.testing.assert_allclose(sparse.output_grad, dense_grad, rtol=1e-5, atol=1e-8)


def test_top_k_cache_refuses_strategies_that_need_dense_logits(data, tmp_path):
    from kdnumba import DecoupledDistillationStrategy
    cache = build_teacher_cache(make_teacher(), data[0], tmp_path / "k", topk=3,
                                chunk_rows=CHUNK, progress=False)
    with pytest.raises(ValueError, match=r"DecoupledDistillationStrategy needs the teacher's "
                                         r"dense logits.*top-3"):
        Distiller(make_student(), cache, DecoupledDistillationStrategy())
    with pytest.raises(ValueError, match="lacks the layer"):
        from kdnumba import RelationalDistillationStrategy
        Distiller(make_student(), cache, RelationalDistillationStrategy(layer_name="emb"))
    with pytest.raises(ValueError, match="hold 600 rows but x has 10"):
        Distiller(make_student(), cache, DistillationLoss()).fit(data[0][:10], data[1][:10])


# -- the order and the prefetcher ------------------------------------------------------------------
def test_chunk_shuffled_order_is_a_seeded_chunkwise_permutation():
    a = chunk_shuffled_order(np.random.default_rng(1), 1000, 64)
    b = chunk_shuffled_order(np.random.default_rng(1), 1000, 64)
    assert np.array_equal(a, b) and np.array_equal(np.sort(a), np.arange(1000))
    chunks = a // 64  # each chunk's rows are contiguous in the order
    assert (np.diff(chunks) != 0).sum() == 15
    assert not np.array_equal(a, chunk_shuffled_order(np.random.default_rng(2), 1000, 64))


def test_prefetcher_yields_in_order_and_reraises():
    order = np.arange(10)
    got = [(idx.tolist(), item) for idx, item in Prefetcher(lambda i: int(i.sum()), order, 4)]
    assert got == [([0, 1, 2, 3], 6), ([4, 5, 6, 7], 22), ([8, 9], 17)]

    def load(idx):
        if idx[0] == 4:
            raise CorruptFileError("chunk broken")
        return 0

    with pytest.raises(CorruptFileError, match="chunk broken"):
        list(Prefetcher(load, order, 4))


def test_import_kdnumba_training_does_not_import_dask_or_zarr():
    code = ("import sys, kdnumba, kdnumba.training; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('dask', 'distributed', 'zarr')))")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]"
