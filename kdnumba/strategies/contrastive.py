"""Contrastive representation distillation: :class:`ContrastiveDistillationStrategy`."""

from __future__ import annotations

import enum
import threading

import numpy as np

from kdnumba import _validation as v
from kdnumba.functional import kd_loss
from kdnumba.functional.contrastive import (
    info_nce,
    nt_xent,
    supervised_contrastive,
    triplet_loss,
)
from kdnumba.strategies.base import (
    DistillationStrategy,
    IntermediateActivations,
    IntermediateStrategyMixin,
    check_activations,
    check_missing_layer,
    missing_layer_error,
)

__all__ = ["ContrastiveDistillationStrategy", "ContrastiveMode"]


class ContrastiveMode(enum.StrEnum):
    """Which contrastive loss :class:`ContrastiveDistillationStrategy` uses.

    Members compare equal to their string values (``"nt_xent"``, ...).

    * ``NT_XENT`` -- student anchors, teacher candidates (label-free; default).
    * ``INFO_NCE`` -- teacher anchors, student candidates (CRD's direction).
    * ``SUPERVISED`` -- student anchors, positives = teacher rows of the same
      class (needs labels).
    * ``TRIPLET`` -- batch-hard triplet on the student embeddings (needs labels;
      the teacher embeddings are not used).
    """

    NT_XENT = "nt_xent"
    INFO_NCE = "info_nce"
    SUPERVISED = "supervised"
    TRIPLET = "triplet"

    @property
    def needs_labels(self) -> bool:
        """True for ``SUPERVISED`` and ``TRIPLET``."""
        return self in (ContrastiveMode.SUPERVISED, ContrastiveMode.TRIPLET)

    @property
    def uses_memory(self) -> bool:
        """True where queued teacher embeddings are candidates (``NT_XENT``, ``SUPERVISED``)."""
        return self in (ContrastiveMode.NT_XENT, ContrastiveMode.SUPERVISED)

    @classmethod
    def parse(cls, mode) -> ContrastiveMode:
        """``mode`` as a member: a member, its value or its name in any case
        (AiDotNet's ``"NTXent"``/``"InfoNCE"`` spellings too)."""
        return v.parse_choice(mode, cls, "mode",
                              {"ntxent": "nt_xent", "infonce": "info_nce", "supcon": "supervised"})


class ContrastiveDistillationStrategy(DistillationStrategy, IntermediateStrategyMixin):
    r"""Contrastive representation distillation (AiDotNet ``ContrastiveDistillationStrategy``).

    Two parts, both already weighted:

    * output loss (``loss_and_gradient``) on the logits::

          (1 - contrastive_weight) * kd_loss(s, t, labels, T=output_temperature, alpha)

    * intermediate loss (``intermediate_loss_and_gradient`` and the protocol's
      ``compute_intermediate_*``) on ``acts[embedding_layer_name]``::

          contrastive_weight * <mode loss>(s_emb, t_emb[, labels])

      with the mode losses of :mod:`kdnumba.functional.contrastive`
      (``nt_xent``, ``info_nce``, ``supervised_contrastive``, ``triplet_loss``
      with ``margin``), computed tile by tile without the ``B x B`` matrix.

    Queue of negatives: ``update_memory(teacher_emb)`` appends teacher rows to
    a FIFO of capacity ``negatives_sample_size`` (0 disables it). Queued rows
    join the candidates of every anchor in ``NT_XENT`` and ``SUPERVISED`` (as
    negatives: they carry no labels). ``INFO_NCE`` (whose candidates are
    student rows) and ``TRIPLET`` (student only) do not use it. The queue
    changes only in ``update_memory``, so the loss and the gradient of one
    step see the same negatives; with an empty queue the losses are the
    in-batch formulas. Call ``update_memory`` *after* the step that used the
    batch (MoCo order), so a sample is never its own negative. The queue is
    updated under a lock, so concurrent ``update_memory`` calls lose nothing:
    the queue holds exactly the last ``negatives_sample_size`` rows appended,
    in the order the calls took the lock (each call's rows stay together).

    Labels for ``SUPERVISED``/``TRIPLET``: pass them explicitly, as the
    ``labels=`` keyword of the intermediate methods (the :class:`~kdnumba.Distiller`
    and :class:`~kdnumba.HybridDistillationStrategy` forward theirs). Without
    them these modes raise ``ValueError``; nothing is remembered between calls.

    A missing embedding layer (in the student's activations, or the teacher's
    for modes other than ``TRIPLET``) raises ``ValueError`` naming it and the
    layers present; with ``missing_layer="skip"`` the intermediate loss is 0
    and the gradient empty, without a warning.

    Embedding arrays may be ``(B, D)`` or ``(B, ...)`` (flattened to
    ``(B, D)``; the gradient has the student's shape). Student and teacher
    widths must match: project first.

    Args:
        embedding_layer_name: key of the embeddings in the activations.
        contrastive_weight: weight of the contrastive part, in ``[0, 1]``.
        temperature: contrastive temperature ``tau > 0`` (0.05-0.1 is usual).
        alpha: hard-label weight of the output KD loss, in ``[0, 1]``.
        negatives_sample_size: queue capacity (rows), ``>= 0``.
        mode: a :class:`ContrastiveMode` or its string value.
        output_temperature: temperature of the output KD loss (AiDotNet reuses
            the contrastive 0.07 there, far too sharp for logits; we do not).
        margin: triplet margin (``TRIPLET`` only), ``>= 0``.
        missing_layer: ``"raise"`` (default) or ``"skip"`` (see above).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
    """

    weight_arg = "contrastive_weight"  # a [0, 1] split (SPEC)

    def __init__(self, embedding_layer_name: str = "embeddings", contrastive_weight: float = 0.8,
                 temperature: float = 0.07, alpha: float = 0.2,
                 negatives_sample_size: int = 1024, mode=ContrastiveMode.NT_XENT,
                 output_temperature: float = 3.0, *, margin: float = 0.1,
                 missing_layer: str = "raise", device: str = "auto"):
        super().__init__(device=device)
        self.embedding_layer_name = v.check_name(embedding_layer_name, "embedding_layer_name")
        self.contrastive_weight = v.check_unit_interval(contrastive_weight, "contrastive_weight")
        self.temperature = v.check_positive(temperature, "temperature")
        self.alpha = v.check_unit_interval(alpha, "alpha")
        self.negatives_sample_size = v.check_int(negatives_sample_size, "negatives_sample_size",
                                                 minimum=0)
        self.mode = ContrastiveMode.parse(mode)
        self.output_temperature = v.check_positive(output_temperature, "output_temperature")
        self.margin = v.check_non_negative(margin, "margin")
        self.missing_layer = check_missing_layer(missing_layer)
        # The queue is an immutable (read-only) array replaced as a whole under
        # the lock; readers take one reference to it, so a step sees one queue.
        self._memory: np.ndarray | None = None
        self._memory_lock = threading.Lock()

    # --- output loss ---------------------------------------------------------------

    def loss_and_gradient(self, student_output, teacher_output, labels=None
                          ) -> tuple[float, np.ndarray]:
        """``(1 - contrastive_weight) * kd_loss(T=output_temperature, alpha)`` and its
        gradient."""
        loss, grad = kd_loss(student_output, teacher_output, labels,
                             temperature=self.output_temperature, alpha=self.alpha,
                             device=self.device)
        weight = 1.0 - self.contrastive_weight
        grad *= grad.dtype.type(weight)
        return weight * loss, grad

    # --- contrastive loss ---------------------------------------------------------------

    def contrastive_loss_and_gradient(self, student_emb, teacher_emb=None, labels=None
                                      ) -> tuple[float, np.ndarray]:
        """Unweighted ``(loss, d loss / d student_emb)`` of the mode, with the queue.

        ``student_emb``/``teacher_emb``: ``(B, D)`` (``teacher_emb`` may be
        ``None`` for ``TRIPLET``); ``labels``: class indices ``(B,)`` or
        one-hot rows, required by ``SUPERVISED`` and ``TRIPLET``.
        """
        mode = self.mode
        if mode.needs_labels and labels is None:
            self._labels_required()
        if mode is ContrastiveMode.TRIPLET:
            return triplet_loss(student_emb, labels, margin=self.margin, device=self.device)
        if teacher_emb is None:
            raise ValueError(f"mode {mode.value!r} needs teacher_emb")
        kw = dict(temperature=self.temperature, device=self.device)
        if mode is ContrastiveMode.INFO_NCE:
            return info_nce(student_emb, teacher_emb, **kw)
        negatives = self._memory
        if mode is ContrastiveMode.NT_XENT:
            return nt_xent(student_emb, teacher_emb, negatives=negatives, **kw)
        return supervised_contrastive(student_emb, teacher_emb, labels, negatives=negatives,
                                      **kw)

    def compute_contrastive_loss(self, student_emb, teacher_emb=None, labels=None) -> float:
        """Unweighted contrastive loss of the mode (AiDotNet ``ComputeContrastiveLoss``)."""
        return self.contrastive_loss_and_gradient(student_emb, teacher_emb, labels)[0]

    # --- intermediate protocol -----------------------------------------------------------

    def intermediate_loss_and_gradient(self, student_acts, teacher_acts, *, labels=None
                                       ) -> tuple[float, IntermediateActivations]:
        """``contrastive_weight * <mode loss>`` on ``acts[embedding_layer_name]`` and its
        gradient (one-layer :class:`IntermediateActivations`).

        ``labels`` (keyword; class indices ``(B,)`` or one-hot rows) are
        required by ``SUPERVISED`` and ``TRIPLET`` -- a ``ValueError`` says so
        when they are missing. A missing layer raises ``ValueError``
        (``missing_layer="raise"``) or gives ``(0.0, empty)`` (``"skip"``).
        """
        check_activations(student_acts, "student_acts")
        check_activations(teacher_acts, "teacher_acts")
        layer = self.embedding_layer_name
        needs_teacher = self.mode is not ContrastiveMode.TRIPLET
        for name, acts in (("student_acts", student_acts), ("teacher_acts", teacher_acts)):
            if name == "teacher_acts" and not needs_teacher:
                continue
            if layer not in acts:
                if self.missing_layer == "skip":
                    return 0.0, IntermediateActivations()
                raise missing_layer_error(type(self).__name__, layer, name, acts)
        if self.mode.needs_labels and labels is None:
            self._labels_required()
        s_raw = student_acts[layer]
        s = self._as_rows(s_raw, f"student_acts[{layer!r}]")
        t = self._as_rows(teacher_acts[layer], f"teacher_acts[{layer!r}]") if needs_teacher \
            else None
        loss, grad = self.contrastive_loss_and_gradient(s, t, labels)
        grad *= grad.dtype.type(self.contrastive_weight)
        shape = np.shape(s_raw)
        return self.contrastive_weight * loss, IntermediateActivations({layer: grad.reshape(shape)})

    def compute_intermediate_loss(self, student_acts, teacher_acts, *, labels=None) -> float:
        """Weighted contrastive loss on the embedding layer (see the protocol)."""
        return self.intermediate_loss_and_gradient(student_acts, teacher_acts, labels=labels)[0]

    def compute_intermediate_gradient(self, student_acts, teacher_acts, *, labels=None
                                      ) -> IntermediateActivations:
        """Weighted gradient for the embedding layer only (empty when a missing
        layer is skipped)."""
        return self.intermediate_loss_and_gradient(student_acts, teacher_acts, labels=labels)[1]

    # --- queue of teacher negatives ------------------------------------------------------

    def update_memory(self, teacher_emb) -> None:
        """Append teacher embeddings ``(n, D)`` to the FIFO queue of negatives.

        Keeps the newest ``negatives_sample_size`` rows (a copy, in float64;
        cast to the student's dtype when used). A no-op when the capacity is 0.
        Width must match the queued rows. Thread-safe: concurrent calls are
        serialised by a lock, and no row is lost.
        """
        rows = v.as_float_array(teacher_emb, "teacher_emb", min_ndim=2)
        rows = rows.reshape(rows.shape[0], -1)
        if not np.isfinite(rows).all():
            raise ValueError("teacher_emb contains NaN or inf values")
        capacity = self.negatives_sample_size
        if capacity == 0:
            return
        rows = np.array(rows[-capacity:], dtype=np.float64)  # a copy, outside the lock
        with self._memory_lock:
            memory = self._memory
            if memory is not None and memory.shape[1] != rows.shape[1]:
                raise ValueError(
                    f"teacher_emb has width {rows.shape[1]} but the queue holds rows of width "
                    f"{memory.shape[1]}; call clear_memory() first if the width changed")
            queue = rows if memory is None else np.concatenate([memory, rows])[-capacity:]
            queue = np.ascontiguousarray(queue)
            queue.flags.writeable = False
            self._memory = queue

    def clear_memory(self) -> None:
        """Empty the queue."""
        with self._memory_lock:
            self._memory = None

    @property
    def memory(self) -> np.ndarray:
        """The queued teacher rows, oldest first (read-only float64 ``(K, D)``; ``K`` may be 0)."""
        memory = self._memory
        return np.zeros((0, 0), dtype=np.float64) if memory is None else memory

    @property
    def memory_size(self) -> int:
        """Number of queued rows."""
        memory = self._memory
        return 0 if memory is None else memory.shape[0]

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_memory_lock"]  # locks do not pickle/copy; a copy gets its own
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._memory_lock = threading.Lock()

    # --- helpers --------------------------------------------------------------------------

    @staticmethod
    def _as_rows(x, name: str) -> np.ndarray:
        arr = v.as_float_array(x, name, min_ndim=2)
        return arr.reshape(arr.shape[0], -1)

    def _labels_required(self):
        raise ValueError(
            f"ContrastiveDistillationStrategy: mode {self.mode.value!r} needs labels; pass "
            "labels= (integer class indices of shape (B,) or one-hot rows) to "
            "intermediate_loss_and_gradient / compute_intermediate_loss / "
            "compute_intermediate_gradient / contrastive_loss_and_gradient")
