"""The distillation training loop: :class:`Distiller`.

Per minibatch (AiDotNet's trainer, with ``BackpropagateFromIntermediateLayers``)::

    t_out, t_acts = teacher outputs for the batch        (cached: run once)
    s_out, s_acts = student.forward(x, collect=layers)
    L_out, g_out  = strategy.loss_and_gradient(s_out, t_out, y)
    L_int, g_int  = strategy.intermediate_loss_and_gradient(s_acts, t_acts)
    student.backward(g_out, g_int)                       # dL/dtheta of L_out + L_int
    student.step()

``layers`` are read off the strategy (``target_layer_name``,
``embedding_layer_name``, ``layer_name(s)``, and recursively the members of a
hybrid), so a :class:`~kdnumba.HybridDistillationStrategy` mixing response,
selectivity and contrastive terms trains with one call.
"""

from __future__ import annotations

import inspect
import math
import os
import time
import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from kdnumba import _validation as v
from kdnumba.functional import kd_loss, sparse_kd_loss
from kdnumba.strategies.base import IntermediateActivations, IntermediateStrategyMixin
from kdnumba.strategies.response import DistillationLoss
from kdnumba.training._atomic import probe_writable, remove_temp_files
from kdnumba.training.cache import (
    TeacherCache,
    TeacherOutputs,
    as_teacher_outputs,
    dataset_fingerprint,
    run_teacher,
)
from kdnumba.training.checkpoint import (
    Checkpoint,
    fingerprint_differences,
    load_checkpoint,
    resolve_checkpoint_path,
    save_checkpoint,
)
from kdnumba.training.out_of_core import Prefetcher, chunk_shuffled_order
from kdnumba.training.protocol import check_student, check_teacher
from kdnumba.training.sharded_cache import ShardedTeacherCache

#: Attributes through which strategies name the layers they read.
_LAYER_ATTRIBUTES = ("layers", "layer_names", "layer_name", "target_layer_name",
                     "embedding_layer_name", "target_layer_names")


# -- strategy introspection ---------------------------------------------------------
def strategy_members(strategy) -> list:
    """The member strategies of a hybrid (``get_strategies()`` -> ``[(s, w), ...]``
    or ``[s, ...]``), else ``[]``."""
    getter = getattr(strategy, "get_strategies", None)
    members = getter() if callable(getter) else getattr(strategy, "strategies", None)
    if not members or isinstance(members, (str, bytes)):
        return []
    return [m[0] if isinstance(m, tuple) else m for m in members]


def start_epoch(strategy, epoch: int) -> None:
    """Call ``on_epoch_start(epoch)`` (0-based epoch) on every strategy in the tree
    of ``strategy`` that has it (e.g. the DKD warm-up of
    :class:`~kdnumba.strategies.DecoupledDistillationStrategy`)."""
    for s in _strategy_tree(strategy):
        hook = getattr(s, "on_epoch_start", None)
        if callable(hook):
            hook(epoch)


def start_batch(strategy, indices, labels=None) -> None:
    """Call ``on_batch(indices, labels)`` on every strategy in the tree of
    ``strategy`` that has it, before the losses of a minibatch: ``indices`` the
    dataset rows of the batch (int64 ``(B,)``, positions in the ``x`` given to
    :meth:`Distiller.fit`), ``labels`` the batch's labels or ``None`` (e.g. the
    negative sampling of :class:`~kdnumba.CRDStrategy`)."""
    for hook in _hooks(strategy, "on_batch"):
        hook(indices, labels)


def end_step(strategy) -> None:
    """Call ``after_step()`` on every strategy in the tree of ``strategy`` that
    has it, after the student's update (e.g. CRD's memory update and the step
    of its embed heads)."""
    for hook in _hooks(strategy, "after_step"):
        hook()


def _hooks(strategy, name: str) -> list[Callable]:
    return [h for h in (getattr(s, name, None) for s in _strategy_tree(strategy)) if callable(h)]


def _stateful(strategy) -> list:
    """The strategies of the tree with ``state_dict()``/``load_state_dict()``
    (training state of their own, saved in checkpoints), in tree order."""
    return [s for s in _strategy_tree(strategy)
            if callable(getattr(s, "state_dict", None))
            and callable(getattr(s, "load_state_dict", None))]


def _strategy_tree(strategy) -> list:
    """``strategy`` and, recursively, its members: each object once, in pre-order,
    at most 16 levels deep."""
    out, seen = [], set()

    def visit(s, depth):
        if s is None or depth > 16 or id(s) in seen:
            return
        seen.add(id(s))
        out.append(s)
        for m in strategy_members(s):
            visit(m, depth + 1)

    visit(strategy, 0)
    return out


def _own_fused_intermediate(strategy):
    """``strategy.intermediate_loss_and_gradient`` if its class implements it (not
    just the stub of :class:`~kdnumba.strategies.base.IntermediateStrategyMixin`),
    else ``None``."""
    fused = getattr(type(strategy), "intermediate_loss_and_gradient", None)
    if fused is None or fused is IntermediateStrategyMixin.intermediate_loss_and_gradient:
        return None
    return strategy.intermediate_loss_and_gradient


def is_intermediate(strategy) -> bool:
    """True if ``strategy`` computes a loss on intermediate activations: it
    overrides ``intermediate_loss_and_gradient`` of
    :class:`~kdnumba.strategies.base.IntermediateStrategyMixin`, or has its
    own ``compute_intermediate_loss``/``compute_intermediate_gradient``."""
    if strategy is None:
        return False
    if _own_fused_intermediate(strategy) is not None:
        return True
    loss = getattr(strategy, "compute_intermediate_loss", None)
    grad = getattr(strategy, "compute_intermediate_gradient", None)
    if not (callable(loss) and callable(grad)):
        return False
    mixin, cls = IntermediateStrategyMixin, type(strategy)
    return not (getattr(cls, "compute_intermediate_loss", None) is mixin.compute_intermediate_loss
                and getattr(cls, "compute_intermediate_gradient", None)
                is mixin.compute_intermediate_gradient)


def _layer_pairs(strategy) -> set[tuple[str, str]]:
    """``(student layer, teacher layer)`` pairs read by ``strategy`` (recursively)."""
    found: set[tuple[str, str]] = set()
    for s in _strategy_tree(strategy):
        if not is_intermediate(s):
            continue
        for attr in _LAYER_ATTRIBUTES:
            value = getattr(s, attr, None)
            if isinstance(value, str):
                found.add((value, value))
            elif isinstance(value, Mapping):
                found.update((k, t) for k, t in value.items()
                             if isinstance(k, str) and isinstance(t, str))
            elif isinstance(value, Collection):
                found.update((x, x) for x in value if isinstance(x, str))
    return found


def required_layers(strategy, *, teacher: bool = False) -> tuple[str, ...]:
    """Names of the student layers (``teacher=True``: teacher layers) whose
    activations ``strategy`` reads, sorted and unique.

    Looks at ``layers`` (a name list or a ``{student: teacher}`` mapping),
    ``layer_names``, ``layer_name``, ``target_layer_name`` and
    ``embedding_layer_name`` of intermediate strategies, and recurses into
    hybrids' members. Pass ``layers=`` to :class:`Distiller` when a custom
    strategy names its layers otherwise.
    """
    return tuple(sorted({pair[1 if teacher else 0] for pair in _layer_pairs(strategy)}))


def _accepts_labels(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "labels" or p.kind is p.VAR_KEYWORD for p in params)


def _memory_updaters(strategy) -> list[tuple[Callable, str]]:
    """``(update_memory, embedding layer)`` of every contrastive (member) strategy."""
    out = []
    for s in _strategy_tree(strategy):
        upd = getattr(s, "update_memory", None)
        layer = getattr(s, "embedding_layer_name", None)
        if callable(upd) and isinstance(layer, str) and getattr(s, "negatives_sample_size", 1):
            out.append((upd, layer))
    return out


class TrainingDivergedError(FloatingPointError):
    """Training produced a non-finite output, loss or gradient.

    Raised by :meth:`Distiller.fit` before the offending batch updates the
    student. ``epoch`` and ``batch`` count from 0, like the epochs of
    :class:`TrainingHistory` and the callback (``batch`` is ``None`` when only
    the epoch's mean loss overflowed).
    """

    def __init__(self, message: str, *, epoch: int, batch: int | None = None):
        super().__init__(message)
        self.epoch = epoch
        self.batch = batch


def _check_step(value, what: str, where: tuple[int, int, int]) -> None:
    """``TrainingDivergedError`` if ``value`` (a scalar or an array) is not finite."""
    if isinstance(value, float):
        ok = math.isfinite(value)
    else:
        ok = bool(np.isfinite(value).all())
    if ok:
        return
    epoch, batch, n_batches = where
    arr = np.asarray(value)
    kind = "nan" if np.isnan(arr).any() else "inf"
    raise TrainingDivergedError(
        f"training diverged in epoch {epoch}, batch {batch} (of {n_batches}; counting from 0): "
        f"{what} {'is' if arr.ndim == 0 else 'contains'} {kind}. The student was not updated "
        "with it; lower the learning rate, or check the data and the strategy's settings",
        epoch=epoch, batch=batch)


def _check_finite(x, name: str) -> None:
    """``ValueError`` if ``x`` is a float array holding NaN or inf (other inputs
    are the student's business)."""
    arr = x if isinstance(x, np.ndarray) else None
    if arr is None or arr.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(arr)
    if bad.any():
        row = int(np.argwhere(bad)[0][0]) if arr.ndim else 0
        raise ValueError(f"{name} contains NaN or inf (first in row {row})")


def _declared_outputs(student) -> int | None:
    """The number of outputs a student declares (``layer_sizes[-1]``, as
    :class:`MLP` does, or ``n_outputs``), else ``None``."""
    sizes = getattr(student, "layer_sizes", None)
    value = sizes[-1] if isinstance(sizes, (tuple, list)) and sizes else getattr(
        student, "n_outputs", None)
    return int(value) if isinstance(value, (int, np.integer)) and value > 0 else None


class BatchLosses(NamedTuple):
    """Losses and gradients of one minibatch (see :meth:`Distiller.compute_losses`)."""

    output_loss: float
    output_grad: np.ndarray
    intermediate_loss: float
    intermediate_grads: IntermediateActivations

    @property
    def total(self) -> float:
        return self.output_loss + self.intermediate_loss


# -- early stopping and history -------------------------------------------------------
@dataclass
class EarlyStopping:
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs.

    Args:
        monitor: a metric of :class:`TrainingHistory` (``"val_loss"``,
            ``"val_accuracy"``, ``"train_loss"``, ...).
        patience: epochs without improvement before stopping (>= 1).
        min_delta: smallest change that counts as an improvement (>= 0).
        mode: ``"min"``, ``"max"`` or ``"auto"`` (``max`` for accuracies).
        restore_best: put the best epoch's parameters back at the end, and
            before any exception (a diverging loss, a failing callback, Ctrl-C)
            leaves :meth:`Distiller.fit` (needs ``state_dict``/``load_state_dict``
            on the student; warns otherwise).
    """

    monitor: str = "val_loss"
    patience: int = 10
    min_delta: float = 0.0
    mode: str = "auto"
    restore_best: bool = True

    def __post_init__(self):
        self.patience = v.check_int(self.patience, "patience", minimum=1)
        self.min_delta = v.check_non_negative(self.min_delta, "min_delta")
        if self.mode not in ("auto", "min", "max"):
            raise ValueError(f"mode must be 'auto', 'min' or 'max', got {self.mode!r}")
        if self.monitor not in TrainingHistory.METRICS:
            raise ValueError(f"monitor must be one of {TrainingHistory.METRICS}, "
                             f"got {self.monitor!r}")

    @property
    def maximize(self) -> bool:
        return self.mode == "max" or (self.mode == "auto" and "accuracy" in self.monitor)

    def improved(self, value: float, best: float | None) -> bool:
        if best is None:
            return not math.isnan(value)
        if self.maximize:
            return value > best + self.min_delta
        return value < best - self.min_delta


@dataclass
class TrainingHistory:
    """Per-epoch metrics of a :meth:`Distiller.fit` run.

    ``history["val_accuracy"]`` is the list over epochs of one metric (NaN
    where not measured, e.g. validation metrics without validation data).
    Losses are means over the epoch's examples: ``train_loss =
    train_output_loss + train_intermediate_loss``; ``val_loss`` is the
    cross-entropy of the student on the validation labels.
    ``strategy_seconds`` is the time spent inside the kdnumba strategy calls,
    ``teacher_seconds`` inside the teacher.
    """

    METRICS = ("train_loss", "train_output_loss", "train_intermediate_loss", "train_accuracy",
               "val_loss", "val_accuracy", "epoch_seconds", "strategy_seconds",
               "teacher_seconds")

    epochs: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_early: bool = False
    layers: tuple[str, ...] = ()
    teacher_cache_hit: bool | None = None

    def __getitem__(self, metric: str) -> list[float]:
        if metric not in self.METRICS:
            raise KeyError(f"unknown metric {metric!r}; available: {self.METRICS}")
        return [e[metric] for e in self.epochs]

    def __len__(self) -> int:
        return len(self.epochs)

    @property
    def total_seconds(self) -> float:
        return float(sum(self["epoch_seconds"]))

    @property
    def strategy_seconds(self) -> float:
        return float(sum(self["strategy_seconds"]))

    @property
    def teacher_seconds(self) -> float:
        return float(sum(self["teacher_seconds"]))

    def to_dict(self) -> dict:
        """JSON-ready: ``{"metrics": {name: [...]}, "best_epoch": ..., ...}``."""
        return {"metrics": {m: [None if isinstance(x, float) and math.isnan(x) else x
                                for x in self[m]] for m in self.METRICS},
                "best_epoch": self.best_epoch, "stopped_early": self.stopped_early,
                "layers": list(self.layers), "teacher_cache_hit": self.teacher_cache_hit}


# -- the trainer -------------------------------------------------------------------------
def _progress_bar(total: int, enabled, desc: str):
    if enabled is False:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    kwargs = dict(total=total, desc=desc, unit="epoch", leave=False)
    if enabled is None:
        kwargs["delay"] = 2.0  # "long runs only": the bar appears after 2 s
    try:
        return tqdm(**kwargs)
    except TypeError:  # tqdm < 4.54 has no delay
        return tqdm(**{k: x for k, x in kwargs.items() if k != "delay"}) if enabled else None


def cross_entropy_and_accuracy(logits, labels) -> tuple[float, float]:
    """Mean cross-entropy (float64 log-softmax) and accuracy of ``logits`` against
    integer labels ``(N,)`` or probability targets ``(N, C)``."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    y = np.asarray(labels)
    if y.ndim == 1:
        ce = -float(np.mean(logp[np.arange(len(y)), y]))
        acc = float(np.mean(np.argmax(z, axis=1) == y))
    else:
        ce = -float(np.mean(np.sum(y * logp, axis=1)))
        acc = float(np.mean(np.argmax(z, axis=1) == np.argmax(y, axis=1)))
    return ce, acc


class Distiller:
    r"""Trains a student (see :mod:`kdnumba.training.protocol`) by distillation.

    The minibatch loss is ``L = L_out(s_out, t_out, y) + L_int(s_acts, t_acts)``:
    ``L_out`` from ``strategy.loss_and_gradient`` and ``L_int`` from its
    intermediate part (strategies implementing
    :class:`~kdnumba.IntermediateActivationStrategy`, hybrids included, whose
    weights already scale both terms). The student receives ``dL/ds_out`` and
    ``{layer: dL/ds_act}`` in one ``backward`` call, then ``step()``.

    Args:
        student: implements the ``Student`` protocol (e.g. :class:`MLP`).
        teacher: a model with ``forward(x, collect)``, a :class:`TeacherOutputs`
            or a :class:`~kdnumba.training.ShardedTeacherCache`
            (:func:`~kdnumba.training.open_teacher_cache`) aligned with the
            training set, or ``None`` when ``strategy`` is ``None``. A sharded
            cache is read out of core: minibatches in the order of
            ``shuffle_chunk_rows``, assembled on a background thread two ahead,
            memory bounded by two decoded chunks. A *top-K* sharded cache holds
            no dense teacher logits: a :class:`~kdnumba.DistillationLoss`
            strategy then trains with :func:`~kdnumba.functional.sparse_kd_loss`
            at the same ``temperature`` and ``alpha`` (exactly its loss
            against the teacher with ``-inf`` logits off the top K); strategies
            with only intermediate terms use the cached activations; any other
            strategy with an output term raises ``ValueError``.
        strategy: any kdnumba strategy (or an object with
            ``loss_and_gradient`` and/or the intermediate methods). ``None``
            trains the student on the labels alone (cross-entropy, computed by
            :func:`kdnumba.functional.kd_loss` with ``alpha=1``): the baseline.
        layers: layer names to collect from both models, or a mapping
            ``{student layer: teacher layer}``; default :func:`required_layers`
            of the strategy (student side and teacher side).
        batch_size: minibatch rows (last batch may be smaller).
        epochs: default number of epochs for :meth:`fit`.
        seed: seeds the per-epoch shuffling (``np.random.default_rng(seed)``);
            same seed, same data order.
        shuffle: shuffle each epoch (else the data order).
        shuffle_chunk_rows: ``None`` shuffles with one full permutation;
            ``R`` shuffles blocks of ``R`` rows, then the rows within each block
            (:func:`~kdnumba.training.out_of_core.chunk_shuffled_order`): the
            order that reads a chunked store one chunk at a time. Default: the
            cache's ``chunk_rows`` when ``teacher`` is a sharded cache, else
            ``None``. Same seed and setting, same minibatches -- so an
            in-memory run with ``shuffle_chunk_rows=cache.chunk_rows`` trains
            step for step like one from the store.
        offline: compute the teacher's outputs for the whole training set once
            before training (default); ``False`` runs the teacher on every
            minibatch (for teachers that change, or augmented data).
        cache: a :class:`TeacherCache` or a directory for one: offline teacher
            outputs are read from / written to disk.
        teacher_key: identifies the teacher in the cache key (see
            :class:`TeacherCache`).
        early_stopping: an :class:`EarlyStopping`, or ``None``.
        update_memory: after each step, push the batch's teacher embeddings
            into contrastive strategies' negative queues (``update_memory``).
            Note that with a small dataset the queue soon holds each
            example's own teacher embedding as a negative.
        progress: ``True`` / ``False`` / ``None`` (auto: a tqdm bar that appears
            only if the run lasts over 2 s; silently off without tqdm).
    """

    def __init__(self, student, teacher=None, strategy=None, *,
                 layers: Collection[str] | Mapping[str, str] | None = None,
                 batch_size: int = 64, epochs: int = 10, seed: int | None = 0,
                 shuffle: bool = True, shuffle_chunk_rows: int | None = None,
                 offline: bool = True, cache: TeacherCache | str | None = None,
                 teacher_key: str | None = None, early_stopping: EarlyStopping | None = None,
                 update_memory: bool = True, progress: bool | None = None):
        check_student(student)
        if strategy is None and layers:
            raise ValueError("layers were given but strategy is None (the label-only baseline)")
        if strategy is not None:
            if teacher is None:
                raise ValueError("a strategy needs a teacher (a model or TeacherOutputs)")
            if not (callable(getattr(strategy, "loss_and_gradient", None))
                    or is_intermediate(strategy)):
                raise TypeError(f"strategy must have loss_and_gradient(student, teacher, labels) "
                                f"and/or the intermediate methods; got {type(strategy).__name__}")
            if isinstance(teacher, (TeacherOutputs, tuple)):
                teacher = as_teacher_outputs(teacher)
            elif not isinstance(teacher, ShardedTeacherCache):
                check_teacher(teacher)
        self.student = student
        self.teacher = teacher
        self.strategy = strategy
        if layers is None:
            self.layers = required_layers(strategy)
            self.teacher_layers = required_layers(strategy, teacher=True)
        elif isinstance(layers, Mapping):
            self.layers, self.teacher_layers = tuple(layers), tuple(dict.fromkeys(layers.values()))
        else:
            layers = (layers,) if isinstance(layers, str) else layers
            self.layers = self.teacher_layers = tuple(layers)
        for name in self.layers + self.teacher_layers:
            v.check_name(name, "layer name")
        for model, role, wanted in ((student, "student", self.layers),
                                    (teacher, "teacher", self.teacher_layers)):
            known = getattr(model, "layer_names", None)
            if known is not None and not isinstance(model, (TeacherOutputs,
                                                            ShardedTeacherCache)):
                missing = sorted(set(wanted) - set(known))
                if missing:
                    raise ValueError(f"the strategy needs layer(s) {missing}, which the {role} "
                                     f"does not have (its layers: {tuple(known)})")
        if isinstance(teacher, (TeacherOutputs, ShardedTeacherCache)):
            teacher.check_layers(self.teacher_layers)
        self.batch_size = v.check_int(batch_size, "batch_size", minimum=1)
        self.epochs = v.check_int(epochs, "epochs", minimum=0)
        self.seed = seed
        self.shuffle = bool(shuffle)
        if shuffle_chunk_rows is None and isinstance(teacher, ShardedTeacherCache):
            shuffle_chunk_rows = teacher.chunk_rows
        self.shuffle_chunk_rows = (None if shuffle_chunk_rows is None else
                                   v.check_int(shuffle_chunk_rows, "shuffle_chunk_rows",
                                               minimum=1))
        self.offline = bool(offline)
        if not self.offline and isinstance(teacher, (TeacherOutputs, ShardedTeacherCache)):
            raise ValueError("offline=False needs a teacher model, not precomputed TeacherOutputs "
                             "or a teacher cache")
        if isinstance(cache, str) or hasattr(cache, "__fspath__"):
            cache = TeacherCache(cache)
        self.cache = cache
        self.teacher_key = teacher_key
        self.early_stopping = early_stopping
        self.progress = progress
        self._updaters = _memory_updaters(strategy) if update_memory else []
        self._on_batch = _hooks(strategy, "on_batch")
        self._after_step = _hooks(strategy, "after_step")
        self._has_output = (strategy is None
                            or callable(getattr(strategy, "loss_and_gradient", None)))
        self._sparse = self._sparse_kd(strategy, teacher)
        (self._int_fn, self._int_labels,
         self._int_grad_fn, self._int_grad_labels) = self._intermediate_callable(strategy)
        self.history = TrainingHistory(layers=self.layers)

    # -- per-batch losses ---------------------------------------------------------
    @staticmethod
    def _sparse_kd(strategy, teacher) -> dict | None:
        """The :func:`sparse_kd_loss` settings replacing the strategy's output loss
        for a top-K teacher cache; ``None`` when the teacher is dense."""
        k = getattr(teacher, "topk", None) if isinstance(teacher, ShardedTeacherCache) else None
        if k is None or strategy is None:
            return None
        if not callable(getattr(strategy, "loss_and_gradient", None)):
            return None  # intermediate terms only: the cached activations serve
        if (isinstance(strategy, DistillationLoss)
                and type(strategy).loss_and_gradient is DistillationLoss.loss_and_gradient):
            # Response KD against the top-K teacher: the same loss with the teacher's
            # logits -inf off its top K, which sparse_kd_loss computes exactly.
            return {"temperature": strategy.temperature, "alpha": strategy.alpha,
                    "device": strategy.device}
        raise ValueError(
            f"{type(strategy).__name__} needs the teacher's dense logits, but the teacher cache "
            f"holds only its top-{k} logits per row; build the cache with topk=None, or "
            "distil with DistillationLoss (trained with sparse_kd_loss on a top-K cache)")

    @staticmethod
    def _intermediate_callable(strategy):
        """``(fn, fn takes labels, gradient fn, it takes labels)``: the strategy's
        fused method (gradient fn ``None``), else the protocol's two methods.
        Signatures are read here, once, not per minibatch."""
        if not is_intermediate(strategy):
            return None, False, None, False
        fn = _own_fused_intermediate(strategy)
        if fn is not None:
            return fn, _accepts_labels(fn), None, False
        loss_fn = strategy.compute_intermediate_loss
        grad_fn = strategy.compute_intermediate_gradient
        return loss_fn, _accepts_labels(loss_fn), grad_fn, _accepts_labels(grad_fn)

    def compute_losses(self, student_outputs, student_acts, teacher_outputs, teacher_acts,
                       labels=None) -> BatchLosses:
        """Losses and gradients of one minibatch (no parameter update).

        With a top-K teacher cache ``teacher_outputs`` is the pair
        ``(topk_values, topk_indices)``. ``output_grad = dL_out/d student_outputs``;
        ``intermediate_grads`` hold ``dL_int/d student_acts[layer]`` for the
        contributing layers.
        """
        s = self.strategy
        if s is None:
            # Cross-entropy through kd_loss: with alpha=1 the soft term has weight 0,
            # so any teacher logits do; the student's own are at hand.
            loss_o, grad_o = kd_loss(student_outputs, student_outputs, labels, alpha=1.0)
        elif self._sparse is not None:
            values, indices = teacher_outputs
            loss_o, grad_o = sparse_kd_loss(student_outputs, values, indices, labels,
                                            **self._sparse)
        elif self._has_output:
            loss_o, grad_o = s.loss_and_gradient(student_outputs, teacher_outputs, labels)
        else:
            loss_o, grad_o = 0.0, np.zeros_like(student_outputs)
        loss_i, grads_i = 0.0, IntermediateActivations()
        if self._int_fn is not None:
            kw = {"labels": labels} if self._int_labels else {}
            if self._int_grad_fn is None:
                loss_i, grads_i = self._int_fn(student_acts, teacher_acts, **kw)
            else:
                loss_i = self._int_fn(student_acts, teacher_acts, **kw)
                grads_i = self._int_grad_fn(
                    student_acts, teacher_acts,
                    **({"labels": labels} if self._int_grad_labels else {}))
        return BatchLosses(float(loss_o), grad_o, float(loss_i),
                           grads_i if grads_i is not None else IntermediateActivations())

    # -- training -------------------------------------------------------------------
    def teacher_outputs(self, x) -> TeacherOutputs:
        """The teacher's outputs and activations for all of ``x`` (offline mode),
        through the cache when one is set."""
        if isinstance(self.teacher, (TeacherOutputs, ShardedTeacherCache)):
            if len(self.teacher) != len(x):
                raise ValueError(f"the {type(self.teacher).__name__} hold {len(self.teacher)} "
                                 f"rows but x has {len(x)}: they must be aligned with the "
                                 "training set")
            self.history.teacher_cache_hit = None
            return self.teacher
        if self.cache is not None:
            hits = self.cache.hits
            out = self.cache.get(self.teacher, x, self.teacher_layers,
                                 teacher_key=self.teacher_key)
            self.history.teacher_cache_hit = self.cache.hits > hits
            return out
        return run_teacher(self.teacher, x, self.teacher_layers)

    def fit(self, x, y=None, *, validation: tuple | None = None, epochs: int | None = None,
            callback: Callable[[int, dict], bool | None] | None = None,
            checkpoint=None, resume: bool = False, checkpoint_every: int = 1
            ) -> TrainingHistory:
        """Train for ``epochs`` (default: the constructor's) and return the history.

        Args:
            x: training inputs ``(N, ...)`` (any array the student accepts).
            y: labels ``(N,)`` integers or ``(N, C)`` targets; ``None`` for
                label-free distillation (strategies then get ``labels=None``).
            validation: ``(x_val, y_val)`` for validation loss/accuracy.
            epochs: overrides the constructor's ``epochs``; the total number of
                epochs of the run, those of a resumed checkpoint included.
            callback: ``callback(epoch, metrics)`` after each epoch; returning
                ``True`` stops training.
            checkpoint: a file path, or a folder (existing, or ending with a
                separator) for ``distiller-checkpoint.npz`` in it. After every
                ``checkpoint_every`` epochs -- and after the last one -- the
                whole training state is written there (student parameters,
                optimiser state if the student has ``optimizer_state()``, epoch,
                shuffling RNG, history, early-stopping state), atomically: a
                process killed at any moment leaves the previous complete
                checkpoint. The folder is checked for writability before
                training; a later failed write (full disk) warns, keeps the
                previous checkpoint and training goes on. Needs
                ``state_dict()``/``load_state_dict()`` on the student.
            resume: with ``checkpoint``: if the checkpoint file exists, restore
                it and continue from the epoch after it (a run that had finished
                or stopped early returns its history at once); if it does not,
                start from scratch -- so the same call serves the first run and
                every restart. The checkpoint must come from the same run
                (same data, labels, batch size, shuffling, seed, layers and
                strategy class; ``ValueError`` otherwise); ``epochs`` may be
                larger, to extend a run. ``resume=False`` starts from scratch
                and overwrites the checkpoint. Strategies with training state
                of their own that have ``state_dict()``/``load_state_dict()``
                (:class:`~kdnumba.CRDStrategy`: memory banks, embed heads,
                sampling RNG; members of a hybrid too) are saved and restored
                with it, so continuing from a checkpoint gives the same
                parameters and history as a run that never stopped. Not saved:
                the negatives queue of a
                :class:`~kdnumba.ContrastiveDistillationStrategy` (it refills
                as training goes on; such a resumed run differs from an
                uninterrupted one).
            checkpoint_every: epochs between checkpoints (>= 1).

        Raises:
            ValueError / TypeError: bad data, labels or validation set (empty,
                non-finite, a class index >= the number of outputs, ...):
                all checked before the first epoch.
            TrainingDivergedError: a non-finite student output, loss or loss
                gradient; raised before that batch updates the student, naming
                the epoch and batch. With ``EarlyStopping(restore_best=True)``
                the best epoch's parameters are restored before any exception
                leaves ``fit``; :attr:`history` then holds the completed epochs.
        """
        epochs = self.epochs if epochs is None else v.check_int(epochs, "epochs", minimum=0)
        checkpoint_every = v.check_int(checkpoint_every, "checkpoint_every", minimum=1)
        if resume and checkpoint is None:
            raise ValueError("resume=True needs checkpoint= (the file or folder to resume from)")
        x, y, xv, yv = self._check_data(x, y, validation)
        n_classes = _declared_outputs(self.student)
        if n_classes is not None:
            self._check_classes(y, yv, n_classes)
        es = self.early_stopping
        if es is not None and es.monitor.startswith("val_") and validation is None:
            raise ValueError(f"early stopping monitors {es.monitor!r} but no validation data "
                             "was given")
        restore = es is not None and es.restore_best
        if restore and not callable(getattr(self.student, "state_dict", None)):
            warnings.warn("early stopping cannot restore the best epoch: the student has no "
                          "state_dict()/load_state_dict()", stacklevel=2)
            restore = False
        ckpt_path = saved = None
        if checkpoint is not None:
            ckpt_path, saved = self._open_checkpoint(checkpoint, resume, x, y)

        history = self.history = TrainingHistory(layers=self.layers)
        rng = np.random.default_rng(self.seed)
        best, best_state, stale, start = None, None, 0, 0
        if saved is not None:
            best, best_state, stale, start = self._restore(saved, history, rng, restore)
        distill = self.strategy is not None
        done = history.stopped_early or start >= epochs
        bar = None
        try:
            t0 = time.perf_counter()
            cached = self.teacher_outputs(x) if distill and self.offline and not done else None
            teacher_setup = time.perf_counter() - t0
            if not done:
                bar = _progress_bar(epochs - start, self.progress,
                                    "distilling" if distill else "training")
            for epoch in range(start, epochs if not done else start):
                start_epoch(self.strategy, epoch)
                metrics = self._epoch(x, y, rng, cached, epoch=epoch,
                                      check_classes=(lambda c: self._check_classes(y, yv, c))
                                      if epoch == start and n_classes is None else None)
                if epoch == start:
                    metrics["teacher_seconds"] += teacher_setup
                    metrics["epoch_seconds"] += teacher_setup
                if validation is not None:
                    metrics["val_loss"], metrics["val_accuracy"] = self.evaluate(xv, yv)
                history.epochs.append(metrics)
                if bar is not None:
                    bar.update(1)
                    post = {"loss": f"{metrics['train_loss']:.4f}"}
                    if validation is not None:
                        post["val_acc"] = f"{metrics['val_accuracy']:.3f}"
                    bar.set_postfix(post, refresh=False)
                stop = bool(callback(epoch, metrics)) if callback is not None else False
                if es is not None:
                    value = metrics[es.monitor]
                    if es.improved(value, best):
                        best, stale, history.best_epoch = value, 0, epoch
                        if restore:
                            best_state = self.student.state_dict()
                    else:
                        stale += 1
                        if stale >= es.patience:
                            history.stopped_early = True
                            stop = True
                if ckpt_path is not None and (stop or epoch == epochs - 1
                                              or (epoch + 1) % checkpoint_every == 0):
                    self._write_checkpoint(ckpt_path, epoch + 1, rng, history, best, stale,
                                           best_state)
                if stop:
                    break
        except BaseException:
            # Whatever stops training mid-way (a diverging loss, a failing callback,
            # Ctrl-C), the best parameters seen are not lost.
            if restore and best_state is not None:
                self.student.load_state_dict(best_state)
            raise
        finally:
            if bar is not None:
                bar.close()
        if restore and best_state is not None and history.best_epoch != len(history) - 1:
            self.student.load_state_dict(best_state)
        return history

    # -- checks before training -------------------------------------------------------
    def _check_data(self, x, y, validation):
        """Every check of the data that can be made before training:
        ``(x, y, x_val, y_val)`` (the validation pair ``None`` when absent)."""
        n = len(x)
        if n == 0:
            raise ValueError("x is empty: training needs at least one example")
        _check_finite(x, "x")
        y = self._check_labels(y, n, "y")
        if self.strategy is None and y is None:
            raise ValueError("training without a strategy (the label-only baseline) needs labels y")
        xv = yv = None
        if validation is not None:
            try:
                xv, yv = validation
            except (TypeError, ValueError):
                raise ValueError("validation must be a pair (x_val, y_val)") from None
            if xv is None or yv is None:
                raise ValueError("validation needs inputs and labels (x_val, y_val)")
            if len(xv) == 0:
                raise ValueError("validation x_val is empty: pass at least one example, or "
                                 "validation=None")
            _check_finite(xv, "validation x_val")
            yv = self._check_labels(yv, len(xv), "validation y_val")
            if y is not None and (y.ndim == 2) != (yv.ndim == 2):
                raise ValueError("validation y_val must be of the same kind as y (class "
                                 f"indices or (N, C) targets), got shapes {y.shape} and "
                                 f"{yv.shape}")
            if y is not None and y.ndim == 2 and yv.shape[1] != y.shape[1]:
                raise ValueError(f"validation y_val has {yv.shape[1]} classes, y has "
                                 f"{y.shape[1]}")
        return x, y, xv, yv

    @staticmethod
    def _check_classes(y, yv, n_classes: int) -> None:
        """Labels within the student's ``n_classes`` outputs."""
        for labels, name in ((y, "y"), (yv, "validation y_val")):
            if labels is None:
                continue
            if labels.ndim == 1:
                top = int(labels.max())
                if top >= n_classes:
                    raise ValueError(f"{name} holds class index {top}, but the student has "
                                     f"{n_classes} outputs (classes 0..{n_classes - 1})")
            elif labels.shape[1] != n_classes:
                raise ValueError(f"{name} has {labels.shape[1]} columns, but the student has "
                                 f"{n_classes} outputs")

    # -- checkpoints -----------------------------------------------------------------------
    def _fingerprint(self, x, y) -> dict:
        seed = self.seed
        return {"data": dataset_fingerprint(x),
                "labels": None if y is None else dataset_fingerprint(y),
                "batch_size": self.batch_size, "shuffle": self.shuffle,
                "shuffle_chunk_rows": self.shuffle_chunk_rows,
                "seed": int(seed) if isinstance(seed, (int, np.integer)) else None,
                "layers": list(self.layers), "teacher_layers": list(self.teacher_layers),
                "strategy": None if self.strategy is None else type(self.strategy).__name__}

    def _open_checkpoint(self, target, resume: bool, x, y):
        """``(path, Checkpoint to resume from or None)``; checks up front that the
        student can be saved and the folder written."""
        if not (callable(getattr(self.student, "state_dict", None))
                and callable(getattr(self.student, "load_state_dict", None))):
            raise TypeError("checkpoint= needs a student with state_dict() and "
                            f"load_state_dict(); {type(self.student).__name__} lacks them")
        path = resolve_checkpoint_path(target)
        folder = os.path.dirname(os.path.abspath(path))
        try:
            probe_writable(folder)
        except OSError as exc:
            raise OSError(exc.errno, f"checkpoint={os.fspath(target)!r}: cannot write in "
                                     f"{folder!r} ({exc.strerror or exc})") from exc
        # temporary files of a process killed while writing this checkpoint
        remove_temp_files(folder, os.path.basename(path))
        self._fingerprint_now = self._fingerprint(x, y)
        if not resume or not os.path.exists(path):
            return path, None
        saved = load_checkpoint(path)
        differ = fingerprint_differences(saved.fingerprint, self._fingerprint_now)
        if differ:
            raise ValueError(f"checkpoint {path!r} belongs to another run (it differs in: "
                             f"{', '.join(differ)}); remove it or pass resume=False")
        return path, saved

    def _restore(self, saved, history: TrainingHistory, rng, restore: bool):
        """Load ``saved`` into the student, ``history`` and ``rng``; returns
        ``(best, best_state, stale, first epoch)``."""
        self.student.load_state_dict(saved.student)
        load_opt = getattr(self.student, "load_optimizer_state", None)
        if saved.optimizer is not None and callable(load_opt):
            load_opt(saved.optimizer)
        rng.bit_generator.state = saved.rng_state
        self._load_strategy_state(saved.strategy)
        h = saved.history
        history.epochs = [dict(e) for e in h["epochs"]]
        history.best_epoch = h["best_epoch"]
        history.stopped_early = bool(h["stopped_early"])
        best_state = saved.best_state if restore else None
        return saved.best_value, best_state, saved.stale, saved.epoch

    def _strategy_state(self) -> dict | None:
        """``{"<position>.<key>": array}`` of the strategies with a ``state_dict``
        (position in the strategy tree), or ``None`` when none has one."""
        stateful = _stateful(self.strategy)
        if not stateful:
            return None
        return {f"{i}.{k}": val for i, s in enumerate(stateful)
                for k, val in s.state_dict().items()}

    def _load_strategy_state(self, state: dict | None) -> None:
        stateful = _stateful(self.strategy)
        if state is None:
            if stateful:
                raise ValueError("the checkpoint holds no strategy state, but "
                                 f"{type(stateful[0]).__name__} has state of its own; "
                                 "it cannot resume exactly: pass resume=False")
            return
        parts: dict[int, dict] = {}
        for key, val in state.items():
            i, _, name = key.partition(".")
            parts.setdefault(int(i), {})[name] = val
        if sorted(parts) != list(range(len(stateful))):
            raise ValueError("the checkpoint's strategy state does not match this strategy "
                             f"({len(parts)} stateful part(s) saved, {len(stateful)} here)")
        for i, s in enumerate(stateful):
            s.load_state_dict(parts[i])

    def _write_checkpoint(self, path, epoch: int, rng, history, best, stale, best_state):
        opt = getattr(self.student, "optimizer_state", None)
        ckpt = Checkpoint(
            epoch=epoch, student=self.student.state_dict(),
            optimizer=opt() if callable(opt) else None, rng_state=rng.bit_generator.state,
            history={"epochs": history.epochs, "best_epoch": history.best_epoch,
                     "stopped_early": history.stopped_early},
            best_value=best, stale=stale, best_state=best_state,
            fingerprint=self._fingerprint_now, strategy=self._strategy_state())
        try:
            save_checkpoint(path, ckpt)
        except OSError as exc:
            warnings.warn(f"could not write the checkpoint {path!r} after epoch {epoch - 1} "
                          f"({exc}); training goes on, the previous checkpoint is kept",
                          stacklevel=3)

    # -- one epoch -----------------------------------------------------------------------
    def _epoch(self, x, y, rng, cached: TeacherOutputs | None, *, epoch: int = 0,
               check_classes: Callable[[int], None] | None = None) -> dict:
        start = time.perf_counter()
        n = len(x)
        if not self.shuffle:
            order = np.arange(n)
        elif self.shuffle_chunk_rows is not None:
            order = chunk_shuffled_order(rng, n, self.shuffle_chunk_rows)
        else:
            order = rng.permutation(n)
        sums = np.zeros(3)
        correct, strat_s, teach_s = 0, 0.0, 0.0
        student = self.student
        n_batches = -(-n // self.batch_size)
        for batch, (idx, loaded) in enumerate(self._minibatches(x, order, cached)):
            xb = loaded[0] if loaded is not None else x[idx]
            yb = None if y is None else y[idx]
            t_out = t_acts = None
            if self.strategy is not None:
                if loaded is not None:
                    t_out, t_acts = loaded[1]
                elif cached is not None:
                    t_out, t_acts = cached.batch(idx)
                else:
                    t1 = time.perf_counter()
                    t_out, t_acts = self.teacher.forward(xb, collect=self.teacher_layers)
                    teach_s += time.perf_counter() - t1
            if self._on_batch:
                t1 = time.perf_counter()
                for hook in self._on_batch:
                    hook(idx, yb)
                strat_s += time.perf_counter() - t1
            s_out, s_acts = student.forward(xb, collect=self.layers)
            if check_classes is not None:  # before the first update
                check_classes(np.shape(s_out)[1])
                check_classes = None
            where = (epoch, batch, n_batches)
            _check_step(s_out, "the student's outputs", where)
            t1 = time.perf_counter()
            losses = self.compute_losses(s_out, s_acts, t_out, t_acts, yb)
            strat_s += time.perf_counter() - t1
            _check_step(losses.output_loss, "the output loss", where)
            _check_step(losses.intermediate_loss, "the intermediate loss", where)
            _check_step(losses.output_grad, "the gradient of the output loss", where)
            for layer, g in losses.intermediate_grads.items():
                _check_step(g, f"the gradient of the intermediate loss at {layer!r}", where)
            student.backward(losses.output_grad, losses.intermediate_grads)
            student.step()
            for update, layer in self._updaters:
                t1 = time.perf_counter()
                update(t_acts[layer])
                strat_s += time.perf_counter() - t1
            if self._after_step:
                t1 = time.perf_counter()
                for hook in self._after_step:
                    hook()
                strat_s += time.perf_counter() - t1
            rows = len(idx)
            sums += (losses.total * rows, losses.output_loss * rows,
                     losses.intermediate_loss * rows)
            if yb is not None:
                pred = np.argmax(s_out, axis=1)
                correct += int(np.sum(pred == (yb if yb.ndim == 1 else np.argmax(yb, axis=1))))
        loss, out_loss, int_loss = (sums / n).tolist()
        if not math.isfinite(loss):
            raise TrainingDivergedError(f"epoch {epoch}: the mean training loss overflowed to "
                                        f"{loss}; lower the learning rate", epoch=epoch)
        return {"train_loss": loss, "train_output_loss": out_loss,
                "train_intermediate_loss": int_loss,
                "train_accuracy": correct / n if y is not None else math.nan,
                "val_loss": math.nan, "val_accuracy": math.nan,
                "epoch_seconds": time.perf_counter() - start,
                "strategy_seconds": strat_s, "teacher_seconds": teach_s}

    def _minibatches(self, x, order, cached):
        """``(idx, loaded)`` per minibatch: ``loaded`` is ``(x[idx], cached.batch(idx))``
        read ahead on a background thread for a sharded cache (reading it is
        I/O and decoding, overlapping the student's arithmetic), else ``None``
        (the loop indexes the arrays in memory)."""
        if isinstance(cached, ShardedTeacherCache) and self.strategy is not None:
            return Prefetcher(lambda idx: (x[idx], cached.batch(idx)), order, self.batch_size)
        return ((order[lo:lo + self.batch_size], None)
                for lo in range(0, len(order), self.batch_size))

    def evaluate(self, x, y) -> tuple[float, float]:
        """``(cross-entropy, accuracy)`` of the student on ``(x, y)``."""
        return cross_entropy_and_accuracy(self.student.predict(x), y)

    @staticmethod
    def _check_labels(y, n: int, name: str):
        if y is None:
            return None
        arr = np.asarray(y)
        if arr.dtype.kind in "iu":
            if arr.ndim != 1 or arr.shape[0] != n:
                raise ValueError(f"{name} must be class indices of shape ({n},), got {arr.shape}")
            if n and arr.min() < 0:
                raise ValueError(f"{name} must be non-negative class indices")
            return arr.astype(np.int64, copy=False)
        if arr.dtype.kind == "f" and arr.ndim == 2 and arr.shape[0] == n:
            if not np.isfinite(arr).all():
                raise ValueError(f"{name} contains NaN or inf")
            return arr
        raise TypeError(f"{name} must be integer class indices (N,) or float targets (N, C); "
                        f"got dtype {arr.dtype.name}, shape {arr.shape}")

    def __repr__(self) -> str:
        return (f"Distiller(strategy={self.strategy!r}, layers={self.layers}, "
                f"batch_size={self.batch_size}, epochs={self.epochs}, seed={self.seed})")
