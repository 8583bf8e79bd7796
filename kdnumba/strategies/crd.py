"""Contrastive representation distillation with a memory bank: :class:`CRDStrategy`."""

from __future__ import annotations

import numpy as np

from kdnumba import _validation as v
from kdnumba.functional import kd_loss
from kdnumba.functional.crd import ContrastSampler, CRDMemory, crd_loss
from kdnumba.strategies.base import (
    DistillationStrategy,
    IntermediateActivations,
    IntermediateStrategyMixin,
    check_activations,
    warn_user,
)

__all__ = ["CRDStrategy", "ContrastSampler", "CRDMemory"]


class CRDStrategy(DistillationStrategy, IntermediateStrategyMixin):
    r"""CRD (Tian et al. 2020) on an embedding layer, as RepDistiller trains it.

    The strategy owns the :class:`~kdnumba.functional.CRDMemory` (two banks of
    ``n_data`` rows, created at the first call from the embeddings' width) and
    the negative sampling. One training step::

        strategy.set_batch(indices)               # dataset rows of the batch; samples
                                                  # contrast_indices (K negatives each)
        loss, grads = strategy.intermediate_loss_and_gradient(student_acts, teacher_acts)
        grad_teacher = strategy.teacher_gradient  # the teacher's embed head trains too
        ...                                       # apply the gradients
        strategy.update_memory()                  # RepDistiller's momentum update, after

    * intermediate loss on ``acts[embedding_layer_name]`` (the embed heads'
      outputs before L2 normalisation; equal widths)::

          crd_weight * crd_loss(s_emb, t_emb, indices, contrast_indices, memory)

      with its student gradient in the returned activations and its teacher
      gradient in :attr:`teacher_gradient`;
    * output loss (``loss_and_gradient``): ``(1 - crd_weight) * kd_loss(T=output_temperature, alpha)``.

    Negatives: with ``labels`` (the class of every training sample) they are
    drawn from the other classes as RepDistiller's ``CIFAR100InstanceSample``
    (:class:`~kdnumba.functional.crd.ContrastSampler`); without, uniformly over
    all ``n_data`` rows as ``ContrastMemory``'s own ``AliasMethod`` draw with
    uniform weights (column 0 the positive). ``set_batch`` also accepts
    explicit ``contrast_indices``. The memory changes only in
    :meth:`update_memory`, so the loss and gradients of a step see one bank.

    Args:
        n_data: training-set size (rows of each bank).
        embedding_layer_name: key of the embeddings in the activations.
        crd_weight: in ``[0, 1]``.
        n_negatives: ``K`` per sample (RepDistiller's ``nce_k``, 16384).
        temperature: ``nce_t`` (0.07). momentum: ``nce_m`` (0.5).
        alpha, output_temperature: of the output ``kd_loss``.
        labels: optional ``(n_data,)`` integer classes for the sampler.
        seed: seeds the banks and the sampler.
        memory: an existing :class:`CRDMemory` to use instead of a new one.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
    """

    def __init__(self, n_data: int, embedding_layer_name: str = "embeddings",
                 crd_weight: float = 0.8, n_negatives: int = 16384, temperature: float = 0.07,
                 momentum: float = 0.5, alpha: float = 0.2, output_temperature: float = 4.0, *,
                 labels=None, seed=None, memory: CRDMemory | None = None, device: str = "auto"):
        super().__init__(device=device)
        self.n_data = v.check_int(n_data, "n_data", minimum=1)
        self.embedding_layer_name = v.check_name(embedding_layer_name, "embedding_layer_name")
        self.crd_weight = v.check_unit_interval(crd_weight, "crd_weight")
        self.n_negatives = v.check_int(n_negatives, "n_negatives", minimum=0)
        self.temperature = v.check_positive(temperature, "temperature")
        self.momentum = v.check_unit_interval(momentum, "momentum")
        self.alpha = v.check_unit_interval(alpha, "alpha")
        self.output_temperature = v.check_positive(output_temperature, "output_temperature")
        if memory is not None:
            if not isinstance(memory, CRDMemory):
                raise TypeError(f"memory must be a CRDMemory, got {type(memory).__name__}")
            if memory.n_data != self.n_data:
                raise ValueError(f"memory has {memory.n_data} rows but n_data is {self.n_data}")
        self.memory = memory
        self._seed = seed
        self._rng = np.random.default_rng(seed)
        self.sampler = (None if labels is None
                        else ContrastSampler(labels, self.n_negatives, seed=seed))
        if self.sampler is not None and self.sampler.n_data != self.n_data:
            raise ValueError(f"labels has {self.sampler.n_data} entries but n_data is {self.n_data}")
        self.indices = None
        self.contrast_indices = None
        self.teacher_gradient = None
        self._last = None

    # --- the batch ------------------------------------------------------------------------

    def set_batch(self, indices, contrast_indices=None) -> np.ndarray:
        """Remember the dataset rows of the coming batch and sample (or take) its
        ``contrast_indices`` ``(B, K + 1)``; returns them."""
        idx = np.asarray(indices)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise ValueError("indices must be a 1-D integer array (dataset rows)")
        if contrast_indices is None:
            if self.sampler is not None:
                contrast_indices = self.sampler.sample(idx)
            else:
                contrast_indices = self._rng.integers(
                    0, self.n_data, (idx.shape[0], self.n_negatives + 1), dtype=np.int64)
                contrast_indices[:, 0] = idx
        self.indices = np.ascontiguousarray(idx, dtype=np.int64)
        self.contrast_indices = np.asarray(contrast_indices)
        return self.contrast_indices

    # --- output loss ----------------------------------------------------------------------

    def loss_and_gradient(self, student_output, teacher_output, labels=None
                          ) -> tuple[float, np.ndarray]:
        """``(1 - crd_weight) * kd_loss(T=output_temperature, alpha)`` and its gradient."""
        loss, grad = kd_loss(student_output, teacher_output, labels,
                             temperature=self.output_temperature, alpha=self.alpha,
                             device=self.device)
        weight = 1.0 - self.crd_weight
        grad *= grad.dtype.type(weight)
        return weight * loss, grad

    # --- CRD --------------------------------------------------------------------------------

    def crd_loss_and_gradients(self, student_emb, teacher_emb):
        """Unweighted ``(loss, grad_student, grad_teacher)`` of this batch (``set_batch`` first)."""
        if self.indices is None:
            raise ValueError("call set_batch(indices) before the CRD loss of a batch")
        s = v.as_float_array(student_emb, "student_emb", min_ndim=2)
        t = v.as_float_array(teacher_emb, "teacher_emb", min_ndim=2)
        s2, t2 = s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)
        if self.memory is None:
            self.memory = CRDMemory(self.n_data, s2.shape[1], momentum=self.momentum,
                                    temperature=self.temperature, seed=self._seed)
        loss, gs, gt = crd_loss(s2, t2, self.indices, self.contrast_indices, self.memory,
                                device=self.device)
        self._last = (self.indices, s2, t2)
        return loss, gs.reshape(s.shape), gt.reshape(t.shape)

    def intermediate_loss_and_gradient(self, student_acts, teacher_acts
                                       ) -> tuple[float, IntermediateActivations]:
        """``crd_weight * crd_loss`` on the embedding layer; the student gradient in
        the returned activations, the teacher's in :attr:`teacher_gradient`. A
        missing layer gives ``(0.0, empty)`` and a warning."""
        check_activations(student_acts, "student_acts")
        check_activations(teacher_acts, "teacher_acts")
        layer = self.embedding_layer_name
        for name, acts in (("student_acts", student_acts), ("teacher_acts", teacher_acts)):
            if layer not in acts:
                warn_user(f"CRDStrategy: embedding layer {layer!r} not found in {name} "
                          f"(available: {sorted(acts)}); the CRD loss is 0")
                self.teacher_gradient = None
                return 0.0, IntermediateActivations()
        loss, gs, gt = self.crd_loss_and_gradients(student_acts[layer], teacher_acts[layer])
        w = self.crd_weight
        gs *= gs.dtype.type(w)
        gt *= gt.dtype.type(w)
        self.teacher_gradient = gt
        return w * loss, IntermediateActivations({layer: gs})

    def compute_intermediate_loss(self, student_acts, teacher_acts) -> float:
        return self.intermediate_loss_and_gradient(student_acts, teacher_acts)[0]

    def compute_intermediate_gradient(self, student_acts, teacher_acts) -> IntermediateActivations:
        return self.intermediate_loss_and_gradient(student_acts, teacher_acts)[1]

    def update_memory(self, student_emb=None, teacher_emb=None, indices=None) -> None:
        """RepDistiller's momentum update, after the step: by default with the
        embeddings and indices of the last CRD call."""
        if student_emb is None and teacher_emb is None:
            if self._last is None:
                raise ValueError("update_memory() needs a CRD call first, or explicit embeddings")
            indices, student_emb, teacher_emb = self._last
        elif indices is None:
            indices = self.indices
        if self.memory is None:
            s = v.as_float_array(student_emb, "student_emb", min_ndim=2)
            self.memory = CRDMemory(self.n_data, int(np.prod(s.shape[1:])),
                                    momentum=self.momentum, temperature=self.temperature,
                                    seed=self._seed)
        s = np.asarray(student_emb)
        t = np.asarray(teacher_emb)
        self.memory.update(indices, s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1))
        self._last = None

    def __repr__(self) -> str:
        return (f"CRDStrategy(n_data={self.n_data}, embedding_layer_name="
                f"{self.embedding_layer_name!r}, crd_weight={self.crd_weight}, "
                f"n_negatives={self.n_negatives}, temperature={self.temperature}, "
                f"momentum={self.momentum}, alpha={self.alpha}, "
                f"output_temperature={self.output_temperature})")
