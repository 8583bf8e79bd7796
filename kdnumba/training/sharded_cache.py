"""Teacher outputs at corpus scale: a sharded Zarr store, built chunk by chunk
(across Dask workers or locally), crash-safe, optionally top-K compressed.

:func:`build_teacher_cache` runs the teacher over the inputs in chunks of
``chunk_rows`` rows and writes each chunk straight into a Zarr store;
:func:`open_teacher_cache` returns a read-only :class:`ShardedTeacherCache` that
the :class:`~kdnumba.training.Distiller` accepts wherever it accepts
:class:`~kdnumba.training.TeacherOutputs`.

Layout of a store (a folder)::

    zarr.json                 the Zarr group (attribute kdnumba = "teacher-cache")
    outputs/                  dense: (N, C) teacher outputs, teacher's dtype
    topk_values/              top-K: (N, K) the K largest logits per row, descending
    topk_indices/             top-K: (N, K) their columns (int16 if C <= 32767, else int32)
    activations/<j>/          the j-th requested layer, (N, ...) (names in the manifest)
    build.json                the build's specification, written when the store is created
    chunks/<i>.json           completion record of chunk i, one file per chunk
    manifest.json             the final manifest; written last: its presence = complete

All Zarr arrays share the row chunking (``chunk_rows`` rows x every other
axis), so chunk ``i`` is rows ``[i * chunk_rows, min(N, (i + 1) * chunk_rows))``
of every array, and each build task writes whole Zarr chunks of its own: two
workers never write the same file.

Crash safety (a killed worker, a killed client, a power cut):

* A chunk's completion record is written *after* its data, atomically and
  durably (:func:`~kdnumba.training._atomic.atomic_write`: temporary file,
  fsync, rename), one file per chunk -- workers writing records concurrently
  never touch the same file. A chunk without a record is recomputed.
* The record holds a SHA-256 of the chunk's arrays (their dtype, shape and
  bytes, as the worker computed them) and of the chunk's inputs. Resuming
  re-reads every recorded chunk and checks both: a damaged chunk (truncated,
  lost in a power cut after its record reached the disk) is recomputed; inputs
  that differ from those recorded are *other data* and raise.
* ``manifest.json`` -- the spec plus every chunk record -- is written last,
  atomically. :func:`open_teacher_cache` refuses a store without it ("the build
  did not finish"), so an unfinished cache is never read as complete.
* Reading verifies each chunk's checksum as it is loaded: a truncated or
  corrupted chunk raises :class:`~kdnumba.training._atomic.CorruptFileError`
  (a ``ValueError``) naming the chunk, its rows and the array.

Fingerprints: the teacher's is ``teacher.fingerprint()`` when it has one (the
bundled :class:`~kdnumba.training.MLP` hashes its weights), else the SHA-256 of
its pickle (build tasks pickle the teacher anyway). The data's is the SHA-256
of the input's dtype and shape and of each chunk's input digest.

Top-K (``topk=K``): per row, the K largest outputs in descending order (ties
broken by the lower column), as :func:`topk_outputs` computes them; with
:func:`kdnumba.functional.sparse_kd_loss` that is exactly ``kd_loss`` against
the teacher with ``-inf`` logits off its top K.

Dask and Zarr (``pip install 'kdnumba[scale]'``) are imported only inside the
functions that need them: ``import kdnumba.training`` never imports them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import sys
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from kdnumba import _validation as v
from kdnumba.strategies.base import IntermediateActivations
from kdnumba.training._atomic import CorruptFileError, atomic_write, remove_temp_files
from kdnumba.training.cache import check_layers_held, dataset_fingerprint
from kdnumba.training.protocol import check_teacher

FORMAT = "kdnumba-teacher-cache/1"
MANIFEST = "manifest.json"
BUILD_SPEC = "build.json"
RECORDS = "chunks"
DEFAULT_CHUNK_ROWS = 4096
_LOADED_CHUNKS = 2  # chunks a view keeps decoded: the current one and the next


def _require_scale(what: str):
    """``(zarr)`` or an ``ImportError`` saying which extra to install."""
    try:
        import zarr
    except ImportError as exc:
        raise ImportError(f"{what} needs zarr (and dask[distributed] for a cluster): "
                          "pip install 'kdnumba[scale]'") from exc
    return zarr


# -- pure helpers (no Zarr) -------------------------------------------------------------
def topk_outputs(outputs, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest entries of each row of ``outputs`` ``(B, C)``:
    ``(values (B, k), indices (B, k))``, values descending, equal values among
    the k in column order. Which of several values tied at the k-th place is
    kept is unspecified but deterministic (same input, same bits). Indices are
    int16 when ``C <= 32767``, else int32. The caller's array is not modified."""
    out = np.asarray(outputs)
    if out.ndim != 2:
        raise ValueError(f"outputs must be 2-D (B, C), got shape {out.shape}")
    k = v.check_int(k, "topk", minimum=1)
    n_cols = out.shape[1]
    if k > n_cols:
        raise ValueError(f"topk must be at most the number of outputs C = {n_cols}, got {k}")
    if k == n_cols:
        cand = np.broadcast_to(np.arange(n_cols), out.shape)
    else:
        # Partitioning at C - k (not -out at k - 1) spares a negated copy of the
        # chunk; introselect has no randomness, so ties at the boundary resolve
        # the same way every time.
        cand = np.argpartition(out, n_cols - k, axis=1)[:, n_cols - k:]
    vals = np.take_along_axis(out, cand, axis=1)
    order = np.lexsort((cand, -vals), axis=-1)
    idx = np.take_along_axis(cand, order, axis=1)
    return (np.ascontiguousarray(np.take_along_axis(vals, order, axis=1)),
            np.ascontiguousarray(idx.astype(index_dtype(n_cols))))


def index_dtype(n_classes: int) -> np.dtype:
    """The smallest signed integer type the top-K column indices fit in."""
    return np.dtype(np.int16 if n_classes <= np.iinfo(np.int16).max else np.int32)


def teacher_fingerprint(teacher) -> str:
    """``teacher.fingerprint()`` if it has one, else the SHA-256 of its pickle."""
    fp = getattr(teacher, "fingerprint", None)
    if callable(fp):
        return f"fingerprint:{fp()}"
    try:
        blob = pickle.dumps(teacher, protocol=4)
    except Exception as exc:
        raise TypeError(f"teacher must pickle (it is sent to the build's workers); "
                        f"{type(teacher).__name__} does not: {exc}") from exc
    return f"pickle-sha256:{hashlib.sha256(blob).hexdigest()}"


def chunk_checksum(arrays: list[tuple[str, np.ndarray]]) -> str:
    """SHA-256 of named arrays (name, dtype, shape and bytes, in the given order)."""
    h = hashlib.sha256()
    for name, arr in arrays:
        a = np.ascontiguousarray(arr)
        h.update(repr((name, a.dtype.str, a.shape)).encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


@dataclass(frozen=True)
class CacheSpec:
    """What a store holds; sent to every build task (it pickles small)."""

    path: str
    teacher: str  # teacher fingerprint
    input_dtype: str
    input_shape: tuple[int, ...]
    layers: tuple[str, ...]
    topk: int | None
    chunk_rows: int
    dtype: str  # the teacher's output dtype
    n_classes: int
    index_dtype: str
    activation_shapes: tuple[tuple[int, ...], ...]  # per layer, without the row axis

    @property
    def n_rows(self) -> int:
        return self.input_shape[0]

    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // self.chunk_rows)

    def bounds(self, i: int) -> tuple[int, int]:
        lo = i * self.chunk_rows
        return lo, min(self.n_rows, lo + self.chunk_rows)

    def arrays(self) -> list[tuple[str, tuple[int, ...], str]]:
        """``(name, shape, dtype)`` of every Zarr array, in checksum order."""
        n = self.n_rows
        if self.topk is None:
            out = [("outputs", (n, self.n_classes), self.dtype)]
        else:
            out = [("topk_values", (n, self.topk), self.dtype),
                   ("topk_indices", (n, self.topk), self.index_dtype)]
        return out + [(f"activations/{j}", (n, *shape), self.dtype)
                      for j, shape in enumerate(self.activation_shapes)]

    def to_json(self) -> dict:
        return {"format": FORMAT, "teacher": self.teacher,
                "input": {"dtype": self.input_dtype, "shape": list(self.input_shape)},
                "layers": list(self.layers), "topk": self.topk, "chunk_rows": self.chunk_rows,
                "dtype": self.dtype, "n_classes": self.n_classes, "n_rows": self.n_rows,
                "n_chunks": self.n_chunks, "index_dtype": self.index_dtype,
                "activation_shapes": [list(s) for s in self.activation_shapes]}

    @classmethod
    def from_json(cls, path: str, d: dict) -> CacheSpec:
        if d.get("format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} store (format {d.get('format')!r})")
        return cls(path=path, teacher=d["teacher"], input_dtype=d["input"]["dtype"],
                   input_shape=tuple(d["input"]["shape"]), layers=tuple(d["layers"]),
                   topk=d["topk"], chunk_rows=int(d["chunk_rows"]), dtype=d["dtype"],
                   n_classes=int(d["n_classes"]), index_dtype=d["index_dtype"],
                   activation_shapes=tuple(tuple(s) for s in d["activation_shapes"]))

    @property
    def build_id(self) -> str:
        """Ties chunk records to this spec: a record of another build never counts."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()


def _record_path(path: str, i: int) -> str:
    return os.path.join(path, RECORDS, f"{i:08d}.json")


def _write_json(path: str, obj: dict) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, sort_keys=True).encode()))


def _read_json(path: str) -> dict | None:
    """The JSON object in ``path``; ``None`` if it is absent or unreadable (a record
    is written atomically, so an unreadable one was damaged after the fact)."""
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


# -- one chunk: what a worker (or the local loop) runs ------------------------------------
def _chunk_arrays(spec: CacheSpec, i: int, outputs, acts) -> list[tuple[str, np.ndarray]]:
    """The arrays of chunk ``i`` to store, checked against ``spec``."""
    lo, hi = spec.bounds(i)
    rows = hi - lo
    where = f"chunk {i} (rows {lo}..{hi - 1})"
    out = np.asarray(outputs)
    if out.shape != (rows, spec.n_classes):
        raise ValueError(f"shape mismatch: teacher.forward returned outputs of shape "
                         f"{out.shape} for {where}; expected {(rows, spec.n_classes)}")
    if out.dtype.str != spec.dtype:
        raise ValueError(f"teacher.forward returned {out.dtype.name} outputs for {where}, "
                         f"but the cache stores {np.dtype(spec.dtype).name}")
    if not np.isfinite(out).all():
        raise ValueError(f"teacher.forward returned NaN or inf outputs for {where}")
    if spec.topk is None:
        arrays = [("outputs", np.ascontiguousarray(out))]
    else:
        values, indices = topk_outputs(out, spec.topk)
        arrays = [("topk_values", values), ("topk_indices", indices)]
    for j, (name, shape) in enumerate(zip(spec.layers, spec.activation_shapes)):
        if name not in acts:
            raise ValueError(f"teacher.forward did not return the requested layer {name!r} "
                             f"for {where} (it returned {sorted(acts)})")
        a = np.ascontiguousarray(acts[name], dtype=np.dtype(spec.dtype))
        if a.shape != (rows, *shape):
            raise ValueError(f"shape mismatch: activation {name!r} has shape {a.shape} for "
                             f"{where}; expected {(rows, *shape)}")
        arrays.append((f"activations/{j}", a))
    return arrays


def build_chunk(teacher, spec: CacheSpec, i: int, x_chunk) -> dict:
    """Run the teacher on chunk ``i``'s inputs, write its arrays into the store,
    then -- last -- its completion record; returns the record."""
    zarr = _require_scale("build_teacher_cache")
    x_chunk = np.asarray(x_chunk)
    outputs, acts = teacher.forward(x_chunk, collect=spec.layers)
    arrays = _chunk_arrays(spec, i, outputs, acts)
    lo, hi = spec.bounds(i)
    for name, arr in arrays:
        zarr.open_array(os.path.join(spec.path, name), mode="r+")[lo:hi] = arr
    record = {"chunk": i, "rows": [lo, hi], "checksum": chunk_checksum(arrays),
              "input": dataset_fingerprint(x_chunk), "build": spec.build_id}
    _write_json(_record_path(spec.path, i), record)
    return record


def read_chunk(spec: CacheSpec, i: int, arrays=None) -> list[tuple[str, np.ndarray]]:
    """Chunk ``i`` of every array, decoded; ``CorruptFileError`` naming the chunk
    and the array if Zarr cannot decode it (a truncated or damaged file)."""
    zarr = _require_scale("reading a teacher cache")
    lo, hi = spec.bounds(i)
    out = []
    for name, shape, dtype in spec.arrays():
        try:
            arr = arrays[name] if arrays is not None else zarr.open_array(
                os.path.join(spec.path, name), mode="r")
            data = np.asarray(arr[lo:hi])
        except Exception as exc:  # codec errors, short reads, missing metadata, ...
            raise CorruptFileError(
                f"teacher cache {spec.path}: chunk {i} (rows {lo}..{hi - 1}) of {name!r} is "
                f"truncated or corrupted ({type(exc).__name__}: {exc}); run "
                "build_teacher_cache(...) again to recompute it") from exc
        out.append((name, data))
    return out


def verify_chunk(spec: CacheSpec, i: int, record: dict, x_chunk) -> str:
    """``"ok"``, ``"damaged: ..."`` (recompute it) or ``"other-data"`` for a
    recorded chunk: its stored arrays against the record's checksum, the given
    inputs against the record's input digest."""
    if dataset_fingerprint(np.asarray(x_chunk)) != record.get("input"):
        return "other-data"
    try:
        arrays = read_chunk(spec, i)
    except CorruptFileError as exc:
        return f"damaged: {exc}"
    if chunk_checksum(arrays) != record.get("checksum"):
        return "damaged: checksum mismatch"
    return "ok"


# -- inputs ---------------------------------------------------------------------------------
class _Inputs:
    """Row chunks of a NumPy array / memmap, a Zarr array or a Dask array."""

    def __init__(self, inputs, chunk_rows: int):
        self.kind = self._kind(inputs)
        self.x = inputs
        self.shape = tuple(int(s) for s in inputs.shape)
        self.dtype = np.dtype(inputs.dtype)
        if not self.shape or self.shape[0] == 0:
            raise ValueError(f"inputs must have at least one row, got shape {self.shape}")
        if self.dtype.kind not in "fiub":
            raise TypeError(f"inputs must be a numeric array, got dtype {self.dtype}")
        self.chunk_rows = chunk_rows
        self._blocks = None
        if self.kind == "dask":
            # One Dask block per cache chunk: a task computes exactly its rows.
            x = inputs.rechunk((chunk_rows,) + tuple(-1 for _ in self.shape[1:]))
            self._blocks = x.to_delayed().reshape(-1)

    @staticmethod
    def _kind(inputs) -> str:
        if isinstance(inputs, np.ndarray):
            return "numpy"
        mod = type(inputs).__module__ or ""
        if mod.startswith("dask.") and hasattr(inputs, "to_delayed"):
            return "dask"
        if mod.startswith("zarr.") and hasattr(inputs, "shape"):
            return "zarr"
        raise TypeError("inputs must be a NumPy array (or memmap), a Zarr array or a Dask "
                        f"array, got {type(inputs).__name__}")

    def local(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``[lo, hi)`` in this process."""
        if self.kind == "dask":
            return np.asarray(self.x[lo:hi].compute())
        return np.ascontiguousarray(self.x[lo:hi])

    def remote(self, client, i: int, lo: int, hi: int):
        """Rows of chunk ``i`` as a task argument: a Future computed on the cluster
        for Dask (data never passes through the client), the Zarr array slice read
        by the worker itself, else the rows shipped from here."""
        if self.kind == "dask":
            return client.compute(self._blocks[i])
        if self.kind == "zarr":
            return client.submit(_read_rows, self.x, lo, hi, pure=False)
        return self.local(lo, hi)


def _read_rows(x, lo, hi):
    return np.asarray(x[lo:hi])


# -- progress ---------------------------------------------------------------------------------
class _PlainProgress:
    """The fallback bar without tqdm: a line on stderr at most every 2 s."""

    def __init__(self, total: int, initial: int, desc: str, always: bool):
        self.total, self.n, self.desc = total, initial, desc
        self.start = self.last = time.perf_counter()
        self.always = always
        self.printed = False

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.perf_counter()
        if now - self.last >= 2.0 or (self.always and self.n == self.total):
            self.last = now
            self.printed = True
            print(f"{self.desc}: {self.n}/{self.total} chunks "
                  f"({100 * self.n / max(self.total, 1):.0f}%, {now - self.start:.0f} s)",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.printed and self.n != self.total:
            print(f"{self.desc}: stopped at {self.n}/{self.total} chunks", file=sys.stderr)


def _progress(total: int, initial: int, enabled, desc: str):
    if enabled is False:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainProgress(total, initial, desc, always=bool(enabled))
    kwargs = dict(total=total, initial=initial, desc=desc, unit="chunk", leave=False)
    if enabled is None:
        kwargs["delay"] = 2.0  # long builds only
    return tqdm(**kwargs)


# -- building -----------------------------------------------------------------------------------
def build_teacher_cache(teacher, inputs, path, *, topk: int | None = None,
                        layers: Collection[str] = (), chunk_rows: int = DEFAULT_CHUNK_ROWS,
                        client=None, overwrite: bool = False, progress: bool | None = None
                        ) -> ShardedTeacherCache:
    """Run ``teacher`` over ``inputs`` once and store its outputs in a sharded Zarr
    store at ``path`` (a folder); returns :func:`open_teacher_cache` of it.

    Args:
        teacher: anything with ``forward(x, collect) -> (outputs (B, C),
            activations)`` (the trainer's teacher protocol, e.g.
            :class:`~kdnumba.training.MLP`) that pickles (it is sent to the
            workers). Its forward must be deterministic.
        inputs: ``(N, ...)``: a NumPy array or memmap, a Zarr array or a Dask
            array (rechunked to ``chunk_rows`` rows; with a client each block
            is computed on the cluster).
        path: the store's folder.
        topk: ``None`` stores the dense ``(N, C)`` outputs; ``K`` stores per row
            the K largest logits and their columns (:func:`topk_outputs`), to
            train with :func:`~kdnumba.functional.sparse_kd_loss`.
        layers: teacher activations to store too (``(N, ...)`` each).
        chunk_rows: rows per chunk: the unit of work, of storage, of crash
            recovery and of out-of-core reading (default 4096).
        client: a ``dask.distributed.Client``: one task per chunk on its workers,
            each running the teacher and writing its chunk straight into the
            store (which must be on a file system every worker sees). ``None``
            runs the chunks in this process, one after another.
        overwrite: delete whatever is at ``path`` first (an existing cache of
            another teacher, other data or other settings included).
        progress: ``True`` / ``False`` / ``None`` (auto: a bar after 2 s): tqdm
            when installed, else a line on stderr every 2 s.

    Resuming: calling it again with the same teacher, inputs and settings after
    an interruption (a killed worker, a killed client) keeps the chunks already
    complete -- after checking each against its recorded checksum and its
    inputs' digest -- recomputes damaged or missing ones, and writes the
    manifest last. On a complete cache it only verifies.

    Raises:
        TypeError: a teacher without ``forward`` or that does not pickle,
            inputs of another kind, a ``client`` that is not a Dask client.
        ValueError: bad ``topk``/``chunk_rows``/``layers``; a shape mismatch
            (the teacher returns other shapes than for the first row); NaN/inf
            outputs; a fingerprint mismatch with an existing store at ``path``
            (another teacher, other data, other settings: pass
            ``overwrite=True`` or another path).
        ImportError: zarr (or, with a client, distributed) is not installed.
        Whatever the teacher or the cluster raise (``KilledWorker`` ...), with a
        note that the build can be resumed.
    """
    zarr = _require_scale("build_teacher_cache")
    check_teacher(teacher)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a folder path (str or os.PathLike), got "
                        f"{type(path).__name__}")
    path = os.path.abspath(os.fspath(path))
    chunk_rows = v.check_int(chunk_rows, "chunk_rows", minimum=1)
    if topk is not None:
        topk = v.check_int(topk, "topk", minimum=1)
    if isinstance(layers, str):
        layers = (layers,)
    layers = tuple(v.check_name(name, "layer name") for name in layers)
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct, got {layers}")
    if client is not None and not (callable(getattr(client, "submit", None))
                                   and callable(getattr(client, "compute", None))):
        raise TypeError("client must be a dask.distributed.Client (or None to build "
                        f"locally), got {type(client).__name__}")
    src = _Inputs(inputs, chunk_rows)
    spec = _probe(teacher, src, path, layers, topk, chunk_rows)

    records = _open_store(zarr, spec, overwrite)
    bar = _progress(spec.n_chunks, 0, progress, "teacher cache")
    try:
        records = _verify(spec, records, src, client, bar)
        todo = [i for i in range(spec.n_chunks) if i not in records]
        if todo:
            # Repairing a complete cache: it stops being complete first.
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(path, MANIFEST))
        for rec in _compute(teacher, spec, todo, src, client, bar):
            records[rec["chunk"]] = rec
    finally:
        if bar is not None:
            bar.close()
    if not os.path.exists(os.path.join(path, MANIFEST)):
        manifest = spec.to_json()
        manifest["data"] = _data_fingerprint(spec, records)
        manifest["chunks"] = [records[i] for i in range(spec.n_chunks)]
        _write_json(os.path.join(path, MANIFEST), manifest)
    return open_teacher_cache(path)


def _probe(teacher, src: _Inputs, path, layers, topk, chunk_rows) -> CacheSpec:
    """The spec, from the teacher's outputs on the first row."""
    out, acts = teacher.forward(src.local(0, 1), collect=layers)
    out = np.asarray(out)
    if out.ndim != 2 or out.shape[0] != 1 or out.dtype.kind != "f":
        raise ValueError(f"teacher.forward must return float outputs of shape (B, C); "
                         f"for one row it returned dtype {out.dtype.name}, shape {out.shape}")
    if topk is not None and topk > out.shape[1]:
        raise ValueError(f"topk must be at most the teacher's number of outputs "
                         f"C = {out.shape[1]}, got {topk}")
    shapes = []
    for name in layers:
        if name not in acts:
            raise ValueError(f"teacher.forward did not return the requested layer {name!r} "
                             f"(it returned {sorted(acts)})")
        shapes.append(tuple(int(s) for s in np.shape(acts[name])[1:]))
    return CacheSpec(path=path, teacher=teacher_fingerprint(teacher),
                     input_dtype=src.dtype.str, input_shape=src.shape, layers=layers,
                     topk=topk, chunk_rows=chunk_rows, dtype=out.dtype.str,
                     n_classes=int(out.shape[1]), index_dtype=index_dtype(out.shape[1]).str,
                     activation_shapes=tuple(shapes))


_SPEC_FIELDS = (("teacher", "fingerprint mismatch: the store was built by another teacher"),
                ("input", "fingerprint mismatch: the store was built from other data"),
                ("layers", "the store holds other layers"),
                ("topk", "the store was built with another topk"),
                ("chunk_rows", "the store was built with another chunk_rows"),
                ("dtype", "the teacher's outputs have another dtype than the store's"),
                ("n_classes", "shape mismatch: the teacher has another number of outputs"),
                ("activation_shapes", "shape mismatch: the activations have other shapes"))


def _spec_mismatch(saved: dict, spec: CacheSpec) -> str | None:
    now = spec.to_json()
    for key, what in _SPEC_FIELDS:
        if saved.get(key) != now[key]:
            return f"{what} ({key}: stored {saved.get(key)!r}, now {now[key]!r})"
    return None


def _open_store(zarr, spec: CacheSpec, overwrite: bool) -> dict[int, dict]:
    """Create the store, or check an existing one against ``spec``; the chunk
    records found (not yet verified)."""
    path = spec.path
    saved = _read_json(os.path.join(path, BUILD_SPEC))
    if overwrite and os.path.exists(path):
        shutil.rmtree(path)
        saved = None
    if saved is not None:
        problem = _spec_mismatch(saved, spec) if saved.get("format") == FORMAT else \
            f"unknown format {saved.get('format')!r}"
        if problem:
            raise ValueError(f"teacher cache {path}: {problem}; pass overwrite=True to "
                             "rebuild it, or choose another path")
        remove_temp_files(os.path.join(path, RECORDS))  # left by killed record writers
        records = {}
        for i in range(spec.n_chunks):
            rec = _read_json(_record_path(path, i))
            if rec is not None and rec.get("build") == spec.build_id and rec.get("chunk") == i:
                records[i] = rec
        return records
    if os.path.isdir(path) and os.listdir(path):
        attrs = _read_json(os.path.join(path, "zarr.json")) or {}
        if attrs.get("attributes", {}).get("kdnumba") != "teacher-cache":
            raise ValueError(f"{path} exists and is not a kdnumba teacher cache; choose "
                             "another path (or overwrite=True to delete it)")
        shutil.rmtree(path)  # ours, killed before its build spec was written: nothing kept
    group = zarr.open_group(path, mode="w")
    for name, shape, dtype in spec.arrays():
        # Floats are stored raw: logits hardly compress, and decoding would slow
        # every epoch read out of core. Indices compress (zstd, Zarr's default).
        compress = "auto" if np.dtype(dtype).kind == "i" else None
        group.create_array(name, shape=shape, dtype=dtype,
                           chunks=(spec.chunk_rows, *shape[1:]), compressors=compress,
                           fill_value=0)
    group.attrs["kdnumba"] = "teacher-cache"
    os.makedirs(os.path.join(path, RECORDS), exist_ok=True)
    # Written last: a store with its build spec has every array in place.
    _write_json(os.path.join(path, BUILD_SPEC), spec.to_json())
    return {}


def _scatter_teacher(client, teacher):
    # Sent once to every worker, not pickled into each of hundreds of tasks.
    return client.scatter(teacher, broadcast=True, hash=False)


def _verify(spec, records, src: _Inputs, client, bar) -> dict[int, dict]:
    """Check every recorded chunk (stored checksum, input digest); drop damaged
    ones (warning), raise on other data."""
    if not records:
        return records
    ids = sorted(records)
    if client is None:
        results = ((i, verify_chunk(spec, i, records[i], src.local(*spec.bounds(i))))
                   for i in ids)
    else:
        results = _run_windowed(client, ids, lambda i: client.submit(
            verify_chunk, spec, i, records[i], src.remote(client, i, *spec.bounds(i)),
            pure=False))
    damaged = []
    for i, status in results:
        lo, hi = spec.bounds(i)
        if status == "other-data":
            raise ValueError(
                f"teacher cache {spec.path}: fingerprint mismatch: the inputs of chunk {i} "
                f"(rows {lo}..{hi - 1}) differ from those the cache was built from (other "
                "data); pass overwrite=True to rebuild it, or choose another path")
        if status != "ok":
            damaged.append((i, status))
        elif bar is not None:
            bar.update(1)
    for i, status in damaged:
        warnings.warn(f"teacher cache {spec.path}: chunk {i} is damaged ({status}); "
                      "recomputing it", stacklevel=3)
        with contextlib.suppress(FileNotFoundError):
            os.remove(_record_path(spec.path, i))
        del records[i]
    return records


def _compute(teacher, spec, todo, src: _Inputs, client, bar):
    """Yield the record of every chunk of ``todo`` as it completes."""
    if not todo:
        return
    if client is None:
        for i in todo:
            rec = build_chunk(teacher, spec, i, src.local(*spec.bounds(i)))
            if bar is not None:
                bar.update(1)
            yield rec
        return
    remote_teacher = _scatter_teacher(client, teacher)
    for _, rec in _run_windowed(client, todo, lambda i: client.submit(
            build_chunk, remote_teacher, spec, i, src.remote(client, i, *spec.bounds(i)),
            pure=False)):
        if bar is not None:
            bar.update(1)
        yield rec


def _run_windowed(client, ids, submit):
    """``(id, result)`` of ``submit(id)`` futures as they finish, with at most
    twice the workers' threads in flight (the client holds few input chunks at
    a time). On the first failure the rest are cancelled and the error raised
    with a note that the build can be resumed."""
    from distributed import as_completed

    threads = sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values())
    window = max(2, 2 * threads)
    pending = iter(ids)
    futures = {}
    queue = as_completed()
    for i in pending:
        fut = submit(i)
        futures[fut] = i
        queue.add(fut)
        if len(futures) >= window:
            break
    done = 0
    try:
        for fut in queue:
            i = futures.pop(fut)
            result = fut.result()
            done += 1
            yield i, result
            nxt = next(pending, None)
            if nxt is not None:
                new = submit(nxt)
                futures[new] = nxt
                queue.add(new)
    except BaseException as exc:
        client.cancel(list(futures))
        if isinstance(exc, Exception):
            exc.add_note(f"teacher cache build interrupted ({done} of {len(ids)} chunk tasks "
                         "of this pass finished); call build_teacher_cache again with the "
                         "same arguments to resume: finished chunks are kept")
        raise


def _data_fingerprint(spec: CacheSpec, records: dict[int, dict]) -> str:
    h = hashlib.sha256(repr((spec.input_dtype, spec.input_shape)).encode())
    for i in range(spec.n_chunks):
        h.update(records[i]["input"].encode())
    return h.hexdigest()


# -- reading --------------------------------------------------------------------------------------
def open_teacher_cache(path, *, keep_chunks: int = _LOADED_CHUNKS, verify: str = "once"
                       ) -> ShardedTeacherCache:
    """A read-only view of the complete teacher cache at ``path``; it keeps the
    last ``keep_chunks`` decoded chunks in memory (default 2: the chunk being
    read and the next; ``n_chunks`` holds the whole cache once read).

    ``verify``: ``"once"`` (default) checks each chunk's SHA-256 the first time
    this view reads it; later epochs re-read it from disk without hashing it
    again (an undecodable -- e.g. truncated -- chunk still raises; a
    same-length change made during the run goes unnoticed). ``"always"``
    hashes on every read (about 10 ms per 16 MB chunk here).

    Raises ``FileNotFoundError`` if there is no store, ``ValueError`` if its
    build did not finish (no manifest: resume it with
    :func:`build_teacher_cache`), if it is not a kdnumba teacher cache, or if an
    array's shape or dtype differs from the manifest's.
    """
    return ShardedTeacherCache(path, keep_chunks=keep_chunks, verify=verify)


class ShardedTeacherCache:
    """A complete sharded teacher cache, read-only; see :func:`open_teacher_cache`.

    ``len(cache)`` rows; ``cache.batch(index)`` as
    :meth:`~kdnumba.training.TeacherOutputs.batch`, except that a top-K cache
    returns ``((topk_values, topk_indices), activations)``. Reads load whole
    chunks (verified against their checksums) and keep the last
    ``keep_chunks`` (default two) decoded, so reading rows chunk by chunk
    decodes each chunk once. Safe to share between threads.

    Attributes: ``path``, ``manifest`` (the parsed ``manifest.json``),
    ``topk`` (``None`` for dense), ``layers``, ``chunk_rows``, ``n_chunks``,
    ``n_classes``, ``dtype``, ``teacher_fingerprint``, ``data_fingerprint``.
    """

    def __init__(self, path, *, keep_chunks: int = _LOADED_CHUNKS, verify: str = "once"):
        zarr = _require_scale("open_teacher_cache")
        self.keep_chunks = v.check_int(keep_chunks, "keep_chunks", minimum=1)
        if verify not in ("once", "always"):
            raise ValueError(f"verify must be 'once' or 'always', got {verify!r}")
        self.verify_mode = verify
        self._verified: set[int] = set()
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a folder path, got {type(path).__name__}")
        path = os.path.abspath(os.fspath(path))
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no teacher cache at {path}")
        manifest = _read_json(os.path.join(path, MANIFEST))
        if manifest is None:
            build = _read_json(os.path.join(path, BUILD_SPEC))
            if build is None:
                raise ValueError(f"{path} is not a kdnumba teacher cache (no {MANIFEST})")
            done = len([n for n in os.listdir(os.path.join(path, RECORDS))
                        if n.endswith(".json") and not n.startswith(".")])
            raise ValueError(f"teacher cache {path} is incomplete ({done} of "
                             f"{build.get('n_chunks')} chunks done): its build did not finish; "
                             "call build_teacher_cache again with the same arguments to resume")
        self.spec = CacheSpec.from_json(path, manifest)
        self.path = path
        self.manifest = manifest
        self._checksums = [c["checksum"] for c in manifest["chunks"]]
        if len(self._checksums) != self.spec.n_chunks:
            raise ValueError(f"teacher cache {path}: the manifest records "
                             f"{len(self._checksums)} chunks, expected {self.spec.n_chunks}")
        self._arrays = {}
        for name, shape, dtype in self.spec.arrays():
            try:
                arr = zarr.open_array(os.path.join(path, name), mode="r")
            except Exception as exc:
                raise CorruptFileError(f"teacher cache {path}: array {name!r} cannot be "
                                       f"opened ({type(exc).__name__}: {exc})") from exc
            if tuple(arr.shape) != shape or np.dtype(arr.dtype) != np.dtype(dtype):
                raise ValueError(f"teacher cache {path}: shape mismatch: {name!r} is "
                                 f"{np.dtype(arr.dtype).name} {tuple(arr.shape)}, the manifest "
                                 f"says {np.dtype(dtype).name} {shape}")
            self._arrays[name] = arr
        self._lock = threading.Lock()
        self._loaded: OrderedDict[int, list[np.ndarray]] = OrderedDict()

    # -- description ---------------------------------------------------------------
    topk = property(lambda self: self.spec.topk)
    layers = property(lambda self: self.spec.layers)
    chunk_rows = property(lambda self: self.spec.chunk_rows)
    n_chunks = property(lambda self: self.spec.n_chunks)
    n_classes = property(lambda self: self.spec.n_classes)
    dtype = property(lambda self: np.dtype(self.spec.dtype))
    teacher_fingerprint = property(lambda self: self.spec.teacher)
    data_fingerprint = property(lambda self: self.manifest["data"])

    def __len__(self) -> int:
        return self.spec.n_rows

    def chunk_bounds(self, i: int) -> tuple[int, int]:
        """Rows ``[lo, hi)`` of chunk ``i``."""
        return self.spec.bounds(i)

    def check_layers(self, layers: Collection[str]) -> None:
        check_layers_held(layers, self.layers, f"the teacher cache {self.path} lacks")

    def nbytes_on_disk(self) -> int:
        """Bytes of every file in the store."""
        return sum(os.path.getsize(os.path.join(root, f))
                   for root, _, files in os.walk(self.path) for f in files)

    # -- reading -------------------------------------------------------------------
    def chunk(self, i: int) -> list[np.ndarray]:
        """The decoded, verified arrays of chunk ``i`` (in :meth:`CacheSpec.arrays`
        order); read-only, shared with other callers."""
        i = v.check_int(i, "chunk", minimum=0)
        if i >= self.n_chunks:
            raise ValueError(f"chunk must be < {self.n_chunks}, got {i}")
        with self._lock:
            hit = self._loaded.get(i)
            if hit is not None:
                self._loaded.move_to_end(i)
                return hit
        # Decoded outside the lock: a prefetch thread and the trainer may read
        # different chunks at once.
        named = read_chunk(self.spec, i, self._arrays)
        # Hashing costs about as much as reading; "once" pays it on the first epoch only.
        if self.verify_mode == "once" and i in self._verified:
            pass
        elif chunk_checksum(named) != self._checksums[i]:
            lo, hi = self.spec.bounds(i)
            raise CorruptFileError(
                f"teacher cache {self.path}: chunk {i} (rows {lo}..{hi - 1}) is corrupted "
                "(checksum mismatch with the manifest); run build_teacher_cache(...) again "
                "to recompute it")
        self._verified.add(i)
        arrays = []
        for _, a in named:
            a.flags.writeable = False
            arrays.append(a)
        with self._lock:
            self._loaded[i] = arrays
            while len(self._loaded) > self.keep_chunks:
                self._loaded.popitem(last=False)
        return arrays

    def _rows(self, index) -> np.ndarray:
        n = len(self)
        if isinstance(index, slice):
            return np.arange(n)[index]
        idx = np.asarray(index)
        if idx.dtype.kind not in "iu" or idx.ndim != 1:
            raise TypeError(f"index must be a slice or a 1-D integer array, got "
                            f"{type(index).__name__} of dtype {idx.dtype}, ndim {idx.ndim}")
        idx = idx.astype(np.int64, copy=True)
        bad = (idx < -n) | (idx >= n)
        if bad.any():
            raise IndexError(f"index {int(idx[bad][0])} is out of range for {n} rows")
        idx[idx < 0] += n
        return idx

    def batch(self, index):
        """Rows ``index`` (slice or 1-D integer array): ``(outputs,
        IntermediateActivations)`` for a dense cache, ``((topk_values,
        topk_indices), IntermediateActivations)`` for a top-K one; new arrays."""
        idx = self._rows(index)
        chunk_of = idx // self.chunk_rows
        first_chunk = int(chunk_of[0]) if len(idx) else 0
        if len(idx) and (chunk_of == first_chunk).all():
            # The usual minibatch of the chunk-shuffled order: one gather, one copy.
            local = idx - first_chunk * self.chunk_rows
            outs = [arr[local] for arr in self.chunk(first_chunk)]
        else:
            outs = [np.empty((len(idx), *shape[1:]), dtype)
                    for _, shape, dtype in self.spec.arrays()]
            for c in np.unique(chunk_of):
                sel = np.flatnonzero(chunk_of == c)
                local = idx[sel] - int(c) * self.chunk_rows
                for out, arr in zip(outs, self.chunk(int(c))):
                    out[sel] = arr[local]
        n_out = 1 if self.topk is None else 2
        acts = IntermediateActivations({name: outs[n_out + j]
                                        for j, name in enumerate(self.layers)})
        first = outs[0] if self.topk is None else (outs[0], outs[1])
        return first, acts

    def verify(self) -> None:
        """Read every chunk and check it against the manifest's checksum
        (``CorruptFileError`` naming the first bad one), whatever was read before."""
        with self._lock:
            self._verified.clear()
            self._loaded.clear()
        for i in range(self.n_chunks):
            self.chunk(i)

    def __repr__(self) -> str:
        kind = "dense" if self.topk is None else f"top-{self.topk}"
        return (f"ShardedTeacherCache({self.path!r}, {len(self)} rows x {self.n_classes} "
                f"outputs, {kind}, layers={list(self.layers)}, {self.n_chunks} chunks)")
