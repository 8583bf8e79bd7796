"""Training checkpoints of :meth:`kdnumba.training.Distiller.fit`.

One ``.npz`` file (written with :func:`kdnumba.training._atomic.write_npz`:
atomic, fsynced, checksummed) holds everything needed to continue a run as if
it had never stopped:

* the student's parameters (``state_dict()``) and, when the student has
  ``optimizer_state()``/``load_optimizer_state()`` (the bundled :class:`MLP`
  does: Adam's moments and step count), its optimiser state;
* the number of completed epochs and the state of the shuffling RNG;
* the :class:`~kdnumba.training.TrainingHistory` so far;
* the early-stopping state: best value, epochs without improvement, and the
  best epoch's parameters (when ``restore_best``);
* a fingerprint of the run (training data and labels, batch size, shuffling,
  seed, layers, strategy class), checked on resume so that a checkpoint is
  never silently applied to another run.

* the training state of strategies that have ``state_dict()`` /
  ``load_state_dict()`` (CRD's memory banks, embed heads and sampling RNG).

Not saved: strategy state without those methods (e.g. the negatives queue of a
contrastive strategy, refilled as training goes on), the teacher (offline outputs come back from the
:class:`~kdnumba.training.TeacherCache` or are recomputed), and
hyper-parameters held by the student's constructor (learning rate, ...).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from kdnumba.training._atomic import CorruptFileError, read_npz, write_npz

#: The file name used when ``checkpoint=`` names a folder.
CHECKPOINT_FILE = "distiller-checkpoint.npz"
_FORMAT = 1


def resolve_checkpoint_path(target) -> str:
    """``target`` itself, or ``target/distiller-checkpoint.npz`` if ``target`` is
    an existing folder or ends with a path separator."""
    path = os.fspath(target)
    if not path:
        raise ValueError("checkpoint must be a file or folder path, got ''")
    seps = (os.sep,) + ((os.altsep,) if os.altsep else ())
    if os.path.isdir(path) or path.endswith(seps):
        return os.path.join(path, CHECKPOINT_FILE)
    return path


@dataclass
class Checkpoint:
    """The state of a run after ``epoch`` completed epochs."""

    epoch: int
    student: dict
    optimizer: dict | None
    rng_state: dict
    history: dict
    best_value: float | None
    stale: int
    best_state: dict | None
    fingerprint: dict
    strategy: dict | None = None


def _put(arrays: dict, prefix: str, state: dict | None) -> list[str] | None:
    if state is None:
        return None
    keys = [str(k) for k in state]
    for i, k in enumerate(state):
        arrays[f"{prefix}{i}"] = np.asarray(state[k])
    return keys


def _get(arrays: dict, prefix: str, keys: list[str] | None) -> dict | None:
    if keys is None:
        return None
    return {k: arrays[f"{prefix}{i}"] for i, k in enumerate(keys)}


def _jsonable(obj):
    """NumPy scalars as numbers; anything else a callback put in the metrics as
    its ``repr`` (a checkpoint never fails over a metric)."""
    try:
        return obj.item() if isinstance(obj, np.generic) else float(obj)
    except (TypeError, ValueError):
        return repr(obj)


def save_checkpoint(path, ckpt: Checkpoint) -> str:
    """Write ``ckpt`` to ``path`` atomically; returns ``path``."""
    arrays: dict = {}
    meta = {
        "format": _FORMAT, "epoch": ckpt.epoch, "rng_state": ckpt.rng_state,
        "history": ckpt.history, "best_value": ckpt.best_value, "stale": ckpt.stale,
        "fingerprint": ckpt.fingerprint,
        "student_keys": _put(arrays, "student.", ckpt.student),
        "optimizer_keys": _put(arrays, "optimizer.", ckpt.optimizer),
        "best_keys": _put(arrays, "best.", ckpt.best_state),
        "strategy_keys": _put(arrays, "strategy.", ckpt.strategy),
    }
    arrays["meta"] = np.asarray(json.dumps(meta, default=_jsonable))
    return write_npz(path, arrays)


def load_checkpoint(path) -> Checkpoint:
    """Read a :func:`save_checkpoint` file. Raises ``FileNotFoundError`` if it is
    absent and :class:`~kdnumba.training._atomic.CorruptFileError` (a
    ``ValueError``) if it is damaged or not a checkpoint."""
    arrays = read_npz(path)
    try:
        meta = json.loads(str(arrays["meta"]))
        if meta.get("format") != _FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {_FORMAT}")
        best = meta["best_value"]
        return Checkpoint(
            epoch=int(meta["epoch"]), student=_get(arrays, "student.", meta["student_keys"]),
            optimizer=_get(arrays, "optimizer.", meta["optimizer_keys"]),
            rng_state=meta["rng_state"], history=meta["history"],
            best_value=None if best is None else float(best), stale=int(meta["stale"]),
            best_state=_get(arrays, "best.", meta["best_keys"]),
            fingerprint=meta["fingerprint"],
            strategy=_get(arrays, "strategy.", meta.get("strategy_keys")))
    except (KeyError, ValueError, TypeError) as exc:
        raise CorruptFileError(f"{os.fspath(path)} is not a Distiller checkpoint "
                               f"({type(exc).__name__}: {exc})") from exc


def fingerprint_differences(saved: dict, current: dict) -> list[str]:
    """The names of the fingerprint entries that differ."""
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))

