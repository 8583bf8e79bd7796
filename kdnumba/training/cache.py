"""Teacher outputs computed once: in memory (:class:`TeacherOutputs`) and on disk
(:class:`TeacherCache`, one ``.npz`` per dataset / layer set / teacher).

Offline distillation with a fixed teacher and no data augmentation needs the
teacher's outputs and activations for each training example exactly once; the
trainer then slices them per minibatch. With a :class:`TeacherCache` a second
run (another student, another strategy, another seed) does not run the teacher
at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np

from kdnumba import _validation as v
from kdnumba.strategies.base import IntermediateActivations
from kdnumba.training.protocol import check_teacher

_FORMAT = 1


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
        missing = sorted(set(layers) - set(self.activations))
        if missing:
            raise ValueError(f"the teacher outputs lack the layer(s) {missing} the strategy "
                             f"needs; they hold {sorted(self.activations)}")


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

    Files are written atomically (temporary file + rename) and read with
    ``allow_pickle=False``; an unreadable or inconsistent file is recomputed
    and replaced with a warning.

    Attributes:
        directory: where the files live (created on first use).
        hits, misses: counters since construction.
    """

    def __init__(self, directory):
        self.directory = os.fspath(directory)
        self.hits = 0
        self.misses = 0

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
        """The stored outputs for ``key``, or ``None`` if absent or unusable."""
        path = self.path(key)
        if not os.path.exists(path):
            return None
        try:
            with np.load(path, allow_pickle=False) as f:
                names = [str(s) for s in f["layer_names"]]
                stored = TeacherOutputs(f["outputs"], IntermediateActivations(
                    {name: f[f"act{i}"] for i, name in enumerate(names)}))
        except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as exc:
            warnings.warn(f"ignoring unreadable teacher cache file {path}: {exc}", stacklevel=3)
            return None
        if (n_rows is not None and len(stored) != n_rows) or set(names) != set(layers):
            warnings.warn(f"ignoring teacher cache file {path}: it does not match the request",
                          stacklevel=3)
            return None
        return stored

    def save(self, key: str, outputs: TeacherOutputs) -> str:
        """Write ``outputs`` under ``key``; returns the file's path."""
        os.makedirs(self.directory, exist_ok=True)
        names = list(outputs.activations)
        arrays = {"outputs": outputs.outputs,
                  "layer_names": np.asarray(names, dtype=str).reshape(len(names))}
        for i, name in enumerate(names):
            arrays[f"act{i}"] = outputs.activations[name]
        path = self.path(key)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
        return path

    def get(self, teacher, x, layers: Collection[str] = (), *, teacher_key: str | None = None,
            batch_size: int = 1024) -> TeacherOutputs:
        """Cached outputs for ``(x, layers, teacher)``, running the teacher on a miss."""
        layers = tuple(layers)
        key = self.key(x, layers, teacher, teacher_key)
        stored = self.load(key, len(x), layers)
        if stored is not None:
            self.hits += 1
            return stored
        self.misses += 1
        computed = run_teacher(teacher, x, layers, batch_size=batch_size)
        self.save(key, computed)
        return computed

    def clear(self) -> int:
        """Delete this cache's files; returns how many were removed."""
        if not os.path.isdir(self.directory):
            return 0
        removed = 0
        for name in os.listdir(self.directory):
            if name.startswith("teacher-") and name.endswith(".npz"):
                os.remove(os.path.join(self.directory, name))
                removed += 1
        return removed

    def __repr__(self) -> str:
        return f"TeacherCache({self.directory!r}, hits={self.hits}, misses={self.misses})"


def as_teacher_outputs(obj) -> TeacherOutputs:
    """Accept a :class:`TeacherOutputs` or a ``(outputs, activations)`` pair."""
    if isinstance(obj, TeacherOutputs):
        return obj
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[1], Mapping):
        return TeacherOutputs(obj[0], IntermediateActivations(dict(obj[1])))
    raise TypeError(f"expected TeacherOutputs or (outputs, activations), got {type(obj).__name__}")
