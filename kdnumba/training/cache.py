"""Teacher outputs computed once: in memory (:class:`TeacherOutputs`) and on disk
(:class:`TeacherCache`, one ``.npz`` per dataset / layer set / teacher).

Offline distillation with a fixed teacher and no data augmentation needs the
teacher's outputs and activations for each training example exactly once; the
trainer then slices them per minibatch. With a :class:`TeacherCache` a second
run (another student, another strategy, another seed) does not run the teacher
at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np

from kdnumba import _validation as v
from kdnumba.strategies.base import IntermediateActivations
from kdnumba.training._atomic import (
    CorruptFileError,
    read_npz,
    remove_temp_files,
    write_npz,
)
from kdnumba.training.protocol import check_teacher

_FORMAT = 2  # 2: checksummed files (format-1 files simply miss)


@dataclass(frozen=True)
class TeacherOutputs:
    """The teacher's outputs ``(N, C)`` and activations ``{layer: (N, ...)}`` for a
    whole dataset; accepted by the trainer in place of a teacher model (so a
    teacher run elsewhere, e.g. in PyTorch, can be loaded from arrays)."""

    outputs: np.ndarray
    activations: IntermediateActivations

    def __post_init__(self):
        outputs = v.as_float_array(self.outputs, "teacher outputs", ndim=2)
        acts = IntermediateActivations()
        for name, arr in dict(self.activations or {}).items():
            a = v.as_float_array(arr, f"teacher activations[{name!r}]")
            if a.shape[0] != outputs.shape[0]:
                raise ValueError(f"teacher activations[{name!r}] has {a.shape[0]} rows, "
                                 f"the outputs have {outputs.shape[0]}")
            acts.add(name, a)
        object.__setattr__(self, "outputs", outputs)
        object.__setattr__(self, "activations", acts)

    def __len__(self) -> int:
        return self.outputs.shape[0]

    def batch(self, index) -> tuple[np.ndarray, IntermediateActivations]:
        """Rows ``index`` (slice or integer array) of outputs and every activation."""
        return (self.outputs[index],
                IntermediateActivations({k: a[index] for k, a in self.activations.items()}))

    def check_layers(self, layers: Collection[str]) -> None:
        check_layers_held(layers, self.activations, "the teacher outputs lack")


def check_layers_held(needed: Collection[str], held: Collection[str], holder: str) -> None:
    """Raise ``ValueError`` naming the layers in ``needed`` that ``held`` lacks.

    ``holder`` starts the message, e.g. ``"the teacher outputs lack"``.
    """
    missing = sorted(set(needed) - set(held))
    if missing:
        raise ValueError(f"{holder} the layer(s) {missing} the strategy needs; "
                         f"present: {sorted(held)}")


def dataset_fingerprint(x) -> str:
    """SHA-256 of an array's dtype, shape and bytes."""
    arr = np.ascontiguousarray(x)
    h = hashlib.sha256(repr((arr.dtype.str, arr.shape)).encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def run_teacher(teacher, x, layers: Collection[str] = (), *, batch_size: int = 1024
                ) -> TeacherOutputs:
    """Run ``teacher.forward`` over ``x`` in chunks of ``batch_size`` rows and
    stack its outputs and the activations of ``layers``."""
    check_teacher(teacher)
    batch_size = v.check_int(batch_size, "batch_size", minimum=1)
    layers = tuple(layers)
    n = len(x)
    if n == 0:
        raise ValueError("x is empty: the teacher needs at least one example")
    outs, acts = [], {name: [] for name in layers}
    for start in range(0, n, batch_size):
        out, a = teacher.forward(x[start:start + batch_size], collect=layers)
        outs.append(np.array(out, copy=True))
        for name in layers:
            if name not in a:
                raise ValueError(f"teacher.forward did not return the requested layer {name!r} "
                                 f"(it returned {sorted(a)})")
            acts[name].append(np.array(a[name], copy=True))
    return TeacherOutputs(np.concatenate(outs),
                          IntermediateActivations({k: np.concatenate(p) for k, p in acts.items()}))


class TeacherCache:
    """Teacher outputs on disk, one ``.npz`` file per key.

    The key hashes the dataset (dtype, shape, bytes), the sorted layer names,
    and the teacher's identity: ``teacher_key`` if given, else
    ``teacher.fingerprint()`` if the teacher has one (the bundled :class:`MLP`
    hashes its weights, so a retrained teacher misses), else nothing -- then a
    changed teacher with the same data and layers would hit a stale file, so
    pass ``teacher_key`` (e.g. a checkpoint name) for such teachers.

    Durability and concurrency:

    * Files are written atomically and durably (a uniquely named temporary
      file in the cache folder, fsync, rename, fsync of the folder: see
      :mod:`kdnumba.training._atomic`), so threads and processes sharing the
      folder never see a partial file, and a crash leaves the previous file.
    * Files carry a SHA-256 of their arrays and are read with
      ``allow_pickle=False``. Any unreadable file -- empty (zero length),
      truncated, damaged, from another version, or not matching the request --
      gives a warning and is recomputed and replaced.
    * A failed write (read-only folder, full disk) gives a warning; :meth:`get`
      still returns the outputs it computed, so training continues.
    * :meth:`clear` also removes temporary files left by killed processes.

    Attributes:
        directory: where the files live (created on first use).
        hits, misses: counters since construction.
    """

    def __init__(self, directory):
        self.directory = os.fspath(directory)
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}

    def key(self, x, layers: Collection[str] = (), teacher=None, teacher_key: str | None = None
            ) -> str:
        """The cache key for this dataset, layer set and teacher."""
        ident = teacher_key
        if ident is None and callable(getattr(teacher, "fingerprint", None)):
            ident = teacher.fingerprint()
        payload = json.dumps({"format": _FORMAT, "data": dataset_fingerprint(x),
                              "layers": sorted(layers), "teacher": ident})
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def path(self, key: str) -> str:
        return os.path.join(self.directory, f"teacher-{key}.npz")

    def load(self, key: str, n_rows: int | None = None, layers: Collection[str] = ()
             ) -> TeacherOutputs | None:
        """The stored outputs for ``key``, or ``None`` if absent or unusable (with a
        warning when a file is there but cannot be used)."""
        path = self.path(key)
        if not os.path.isfile(path):
            return None
        try:
            f = read_npz(path)
        except FileNotFoundError:  # removed since (a concurrent clear())
            return None
        except CorruptFileError as exc:
            warnings.warn(f"ignoring unreadable teacher cache file ({exc}); recomputing",
                          stacklevel=3)
            return None
        try:
            names = [str(s) for s in f["layer_names"]]
            stored = TeacherOutputs(f["outputs"], IntermediateActivations(
                {name: f[f"act{i}"] for i, name in enumerate(names)}))
        except (KeyError, ValueError, TypeError) as exc:
            warnings.warn(f"ignoring unreadable teacher cache file {path}: {exc}; recomputing",
                          stacklevel=3)
            return None
        if (n_rows is not None and len(stored) != n_rows) or set(names) != set(layers):
            warnings.warn(f"ignoring teacher cache file {path}: it does not match the request",
                          stacklevel=3)
            return None
        return stored

    def save(self, key: str, outputs: TeacherOutputs) -> str:
        """Write ``outputs`` under ``key`` (atomically, durably); returns the file's
        path. Raises ``OSError`` if the folder cannot be written (:meth:`get`
        turns that into a warning)."""
        os.makedirs(self.directory, exist_ok=True)
        names = list(outputs.activations)
        arrays = {"outputs": outputs.outputs,
                  "layer_names": np.asarray(names, dtype=str).reshape(len(names))}
        for i, name in enumerate(names):
            arrays[f"act{i}"] = outputs.activations[name]
        return write_npz(self.path(key), arrays)

    def get(self, teacher, x, layers: Collection[str] = (), *, teacher_key: str | None = None,
            batch_size: int = 1024) -> TeacherOutputs:
        """Cached outputs for ``(x, layers, teacher)``, running the teacher on a miss.

        Threads sharing this object run the teacher once per key; threads and
        processes with their own objects on the same folder may each run it,
        and each gets complete, correct outputs. If the result cannot be
        written, a ``UserWarning`` says so and the computed outputs are returned.
        """
        layers = tuple(layers)
        key = self.key(x, layers, teacher, teacher_key)
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            stored = self.load(key, len(x), layers)
            if stored is not None:
                with self._lock:
                    self.hits += 1
                return stored
            with self._lock:
                self.misses += 1
            computed = run_teacher(teacher, x, layers, batch_size=batch_size)
            try:
                self.save(key, computed)
            except OSError as exc:
                warnings.warn(f"could not write the teacher cache file {self.path(key)} "
                              f"({exc}); continuing with the outputs in memory", stacklevel=2)
            return computed

    def clear(self) -> int:
        """Delete this cache's files, and temporary files left behind by processes
        killed while writing; returns how many files were removed."""
        if not os.path.isdir(self.directory):
            return 0
        removed = 0
        for name in os.listdir(self.directory):
            # teacher-<key>.npz, and teacher-<key>.npz.tmp<PID> of earlier versions
            if name.startswith("teacher-") and (name.endswith(".npz") or ".npz.tmp" in name):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.directory, name))
                    removed += 1
        return removed + remove_temp_files(self.directory, "teacher-")

    def __repr__(self) -> str:
        return f"TeacherCache({self.directory!r}, hits={self.hits}, misses={self.misses})"


def as_teacher_outputs(obj) -> TeacherOutputs:
    """Accept a :class:`TeacherOutputs` or a ``(outputs, activations)`` pair."""
    if isinstance(obj, TeacherOutputs):
        return obj
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[1], Mapping):
        return TeacherOutputs(obj[0], IntermediateActivations(dict(obj[1])))
    raise TypeError(f"expected TeacherOutputs or (outputs, activations), got {type(obj).__name__}")
