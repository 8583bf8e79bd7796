"""Contrastive representation distillation with a memory bank: :class:`CRDStrategy`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from kdnumba import _validation as v
from kdnumba.functional import kd_loss
from kdnumba.functional.crd import ContrastSampler, CRDMemory, crd_loss
from kdnumba.strategies.base import (
    DistillationStrategy,
    IntermediateActivations,
    IntermediateStrategyMixin,
    check_activations,
    check_missing_layer,
    missing_layer_error,
)

__all__ = ["CRDStrategy", "ContrastSampler", "CRDMemory"]


class EmbedHead:
    r"""A trainable linear embed head ``e = x W + b`` with its own Adam step.

    RepDistiller's ``Embed`` without its ``Normalize`` (``crd_loss`` normalises):
    ``W (dim_in, dim_out)`` and ``b`` drawn as PyTorch's ``nn.Linear`` does,
    uniform in ``[-1/sqrt(dim_in), 1/sqrt(dim_in)]``; parameters in float64.
    :meth:`set_gradient` records ``dL/dW = x^T g``, ``dL/db = sum_rows g`` for
    an upstream gradient ``g = dL/de``; :meth:`step` applies Adam (bias-corrected,
    as :class:`~kdnumba.training.MLP`); :meth:`state_dict` holds parameters and
    optimiser state.
    """

    def __init__(self, dim_in: int, dim_out: int, *, learning_rate: float = 1e-3, rng=None,
                 beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        self.dim_in = v.check_int(dim_in, "dim_in", minimum=1)
        self.dim_out = v.check_int(dim_out, "dim_out", minimum=1)
        self.learning_rate = v.check_positive(learning_rate, "learning_rate")
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        rng = np.random.default_rng(rng)
        bound = 1.0 / math.sqrt(self.dim_in)
        self.weight = rng.uniform(-bound, bound, (self.dim_in, self.dim_out))
        self.bias = rng.uniform(-bound, bound, self.dim_out)
        self.weight_grad = np.zeros_like(self.weight)
        self.bias_grad = np.zeros_like(self.bias)
        self._m = [np.zeros_like(self.weight), np.zeros_like(self.bias)]
        self._v = [np.zeros_like(self.weight), np.zeros_like(self.bias)]
        self._t = 0
        self._has_grad = False

    def forward(self, x) -> np.ndarray:
        """``x W + b`` (float64) for ``x`` of shape ``(B, dim_in)``."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim_in:
            raise ValueError(f"the embed head takes (B, {self.dim_in}) inputs, got {x.shape}; "
                             "the layer's width changed since the head was created")
        return x @ self.weight + self.bias

    def set_gradient(self, x, grad_out) -> np.ndarray:
        """Record the parameter gradients for input ``x`` and ``grad_out = dL/de``
        (replacing earlier ones); returns ``dL/dx`` (float64)."""
        x = np.asarray(x, dtype=np.float64)
        np.matmul(x.T, grad_out, out=self.weight_grad)
        np.sum(grad_out, axis=0, out=self.bias_grad)
        self._has_grad = True
        return grad_out @ self.weight.T

    def step(self) -> None:
        """One Adam update with the recorded gradients (no-op without them)."""
        if not self._has_grad:
            return
        self._t += 1
        b1, b2 = self.beta1, self.beta2
        lr_t = self.learning_rate * math.sqrt(1.0 - b2 ** self._t) / (1.0 - b1 ** self._t)
        eps_t = self.eps * math.sqrt(1.0 - b2 ** self._t)
        for p, g, m, s in zip((self.weight, self.bias), (self.weight_grad, self.bias_grad),
                              self._m, self._v):
            m *= b1
            m += (1.0 - b1) * g
            s *= b2
            s += (1.0 - b2) * (g * g)
            p -= lr_t * m / (np.sqrt(s) + eps_t)
        self._has_grad = False

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the parameters and Adam's state."""
        return {"weight": self.weight.copy(), "bias": self.bias.copy(),
                "m_weight": self._m[0].copy(), "m_bias": self._m[1].copy(),
                "v_weight": self._v[0].copy(), "v_bias": self._v[1].copy(),
                "t": np.asarray(self._t, np.int64)}

    def load_state_dict(self, state) -> None:
        """Restore :meth:`state_dict` output (shapes must match)."""
        for key, dst in (("weight", self.weight), ("bias", self.bias),
                         ("m_weight", self._m[0]), ("m_bias", self._m[1]),
                         ("v_weight", self._v[0]), ("v_bias", self._v[1])):
            src = np.asarray(state[key])
            if src.shape != dst.shape:
                raise ValueError(f"embed head state[{key!r}] has shape {src.shape}, "
                                 f"expected {dst.shape}")
            dst[...] = src
        self._t = int(state["t"])
        self._has_grad = False

    def __repr__(self) -> str:
        return f"EmbedHead({self.dim_in} -> {self.dim_out}, learning_rate={self.learning_rate})"


@dataclass
class _Batch:
    """What one minibatch's CRD computation needs between the hooks."""

    indices: np.ndarray
    contrast_indices: np.ndarray
    embeddings: tuple | None = None  # (student, teacher) head outputs of the loss call


class CRDStrategy(DistillationStrategy, IntermediateStrategyMixin):
    r"""CRD (Tian et al. 2020) on an embedding layer, as RepDistiller trains it.

    The strategy owns the :class:`~kdnumba.functional.CRDMemory` (two banks of
    ``n_data`` rows), the negative sampling and -- by default -- the two
    trainable embed heads (RepDistiller's ``embed_s``/``embed_t``: linear maps
    of the student's and the teacher's layer to ``embed_dim``, so the two widths
    may differ; the teacher's head trains, the teacher does not). One step, as
    :class:`~kdnumba.Distiller` runs it through the strategy hooks::

        strategy.on_batch(indices, labels)        # dataset rows of the batch (and their
                                                  # labels): samples contrast_indices
        loss, grads = strategy.intermediate_loss_and_gradient(student_acts, teacher_acts)
        ...                                       # backward and step of the student
        strategy.after_step()                     # heads' Adam step + memory update

    * intermediate loss on ``acts[embedding_layer_name]`` (flattened to
      ``(B, width)``)::

          crd_weight * crd_loss(head_s(s_act), head_t(t_act), indices, contrast_indices, memory)

      the student gradient (through ``head_s``) in the returned activations;
      the heads' parameter gradients are kept for :meth:`after_step`. With
      ``embed_dim=None`` there are no heads: the layer's activations are the
      embeddings (equal widths) and the teacher-side gradient is dropped.
    * output loss (``loss_and_gradient``): ``(1 - crd_weight) * kd_loss(T=output_temperature, alpha)``
      -- the ``[0, 1]`` split every strategy uses.

    **Negatives.** With ``labels`` (the class of every training sample, in the
    order of the dataset rows) they are drawn from the other classes as
    RepDistiller's ``CIFAR100InstanceSample``
    (:class:`~kdnumba.functional.crd.ContrastSampler`); without, uniformly over
    all ``n_data`` rows as ``ContrastMemory``'s own draw (column 0 the
    positive). The batch labels given to :meth:`on_batch` are checked against
    ``labels[indices]`` (a misaligned label array raises).

    **State.** The batch context set by :meth:`on_batch` lives until
    :meth:`after_step`; the memory and the heads change only in
    :meth:`after_step`, so every loss call of one batch sees the same banks,
    heads and negatives. Without :meth:`on_batch` the intermediate methods raise.
    :meth:`state_dict`/:meth:`load_state_dict` hold the memory, the heads and
    the sampling RNG (the Distiller's checkpoints save them).

    A missing embedding layer raises ``ValueError`` naming it and the layers
    present; with ``missing_layer="skip"`` the intermediate loss is 0, the
    gradient empty, and :meth:`after_step` updates nothing.

    Args:
        n_data: training-set size (rows of each bank).
        embedding_layer_name: key of the layer in the activations.
        crd_weight: in ``[0, 1]``.
        n_negatives: ``K`` per sample (RepDistiller's ``nce_k``, 16384).
        temperature: ``nce_t`` (0.07). momentum: ``nce_m`` (0.5).
        alpha, output_temperature: of the output ``kd_loss``.
        embed_dim: width of the embed heads' outputs and of the banks
            (RepDistiller's ``feat_dim``, 128); ``None``: no heads.
        head_learning_rate: Adam's learning rate of the heads.
        labels: optional ``(n_data,)`` integer classes for the sampler.
        seed: seeds the banks, the heads and the sampler (one stream).
        memory: an existing :class:`CRDMemory` to use instead of a new one
            (updated in place).
        missing_layer: ``"raise"`` (default) or ``"skip"``.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (of the loss; the heads are NumPy).
    """

    weight_arg = "crd_weight"  # a [0, 1] split, the rule

    def __init__(self, n_data: int, embedding_layer_name: str = "embeddings",
                 crd_weight: float = 0.8, n_negatives: int = 16384, temperature: float = 0.07,
                 momentum: float = 0.5, alpha: float = 0.2, output_temperature: float = 4.0, *,
                 embed_dim: int | None = 128, head_learning_rate: float = 1e-3,
                 labels=None, seed: int | None = 0, memory: CRDMemory | None = None,
                 missing_layer: str = "raise", device: str = "auto"):
        super().__init__(device=device)
        self.n_data = v.check_int(n_data, "n_data", minimum=1)
        self.embedding_layer_name = v.check_name(embedding_layer_name, "embedding_layer_name")
        self.crd_weight = v.check_unit_interval(crd_weight, "crd_weight")
        self.n_negatives = v.check_int(n_negatives, "n_negatives", minimum=0)
        self.temperature = v.check_positive(temperature, "temperature")
        self.momentum = v.check_unit_interval(momentum, "momentum")
        self.alpha = v.check_unit_interval(alpha, "alpha")
        self.output_temperature = v.check_positive(output_temperature, "output_temperature")
        self.embed_dim = None if embed_dim is None else v.check_int(embed_dim, "embed_dim",
                                                                    minimum=1)
        self.head_learning_rate = v.check_positive(head_learning_rate, "head_learning_rate")
        if labels is not None:
            labels = np.asarray(labels)
            if labels.ndim != 1 or labels.dtype.kind not in "iu":
                raise ValueError("labels must be a 1-D integer array (the class of every "
                                 f"training sample), got dtype {labels.dtype.name}, "
                                 f"shape {labels.shape}")
            if labels.shape[0] != self.n_data:
                raise ValueError(f"labels has {labels.shape[0]} entries but n_data is "
                                 f"{self.n_data}")
            labels = np.ascontiguousarray(labels, dtype=np.int64)
        self.labels = labels
        if seed is not None and not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an integer or None, got {type(seed).__name__}")
        self.seed = None if seed is None else int(seed)
        if memory is not None:
            if not isinstance(memory, CRDMemory):
                raise TypeError(f"memory must be a CRDMemory, got {type(memory).__name__}")
            if memory.n_data != self.n_data:
                raise ValueError(f"memory has {memory.n_data} rows but n_data is {self.n_data}")
            if self.embed_dim is not None and memory.dim != self.embed_dim:
                raise ValueError(f"memory has width {memory.dim} but embed_dim is "
                                 f"{self.embed_dim}")
        self.memory = memory
        self.missing_layer = check_missing_layer(missing_layer)
        self._rng = np.random.default_rng(self.seed)
        self._sampler = (None if labels is None
                         else ContrastSampler(labels, self.n_negatives, seed=self._rng))
        self._bank = memory
        self.student_head: EmbedHead | None = None
        self.teacher_head: EmbedHead | None = None
        self._batch: _Batch | None = None

    # --- state --------------------------------------------------------------------------
    @property
    def memory_bank(self) -> CRDMemory | None:
        """The :class:`CRDMemory` in use: ``memory`` if one was given, else the one
        created at the first loss call (``None`` before)."""
        return self._bank

    @property
    def contrast_indices(self) -> np.ndarray | None:
        """``(B, K + 1)`` rows of the current batch (from :meth:`on_batch`), else ``None``."""
        return None if self._batch is None else self._batch.contrast_indices

    # --- the hooks ------------------------------------------------------------------------
    def on_batch(self, indices, labels=None, *, contrast_indices=None) -> np.ndarray:
        """Start a minibatch: ``indices`` its dataset rows ``(B,)``, ``labels`` its
        labels (checked against ``labels[indices]`` when the strategy has labels;
        otherwise unused). Samples -- or takes -- its ``contrast_indices``
        ``(B, K + 1)`` and returns them. :class:`~kdnumba.Distiller` calls it
        before each batch's losses."""
        idx = np.asarray(indices)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise ValueError("indices must be a 1-D integer array (the dataset rows of the batch)")
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_data):
            raise ValueError(f"indices must lie in [0, n_data) = [0, {self.n_data})")
        idx = np.ascontiguousarray(idx, dtype=np.int64)
        if labels is not None and self.labels is not None:
            y = np.asarray(labels)
            if y.ndim == 1 and y.dtype.kind in "iu" and (
                    y.shape != idx.shape or not np.array_equal(y, self.labels[idx])):
                raise ValueError(
                    "the batch labels differ from CRDStrategy(labels=...)[indices]: the "
                    "strategy's labels must be those of the training set, in the order of "
                    "its rows")
        if contrast_indices is None:
            if self._sampler is not None:
                contrast_indices = self._sampler.sample(idx)
            else:
                contrast_indices = self._rng.integers(
                    0, self.n_data, (idx.shape[0], self.n_negatives + 1), dtype=np.int64)
                contrast_indices[:, 0] = idx
        else:
            contrast_indices = np.array(contrast_indices)
            if contrast_indices.ndim != 2 or contrast_indices.shape[0] != idx.shape[0]:
                raise ValueError(f"contrast_indices must have shape ({idx.shape[0]}, K + 1), "
                                 f"got {contrast_indices.shape}")
        self._batch = _Batch(idx, contrast_indices)
        return contrast_indices

    def after_step(self) -> None:
        """End the minibatch: the heads' Adam step with this batch's gradients and
        RepDistiller's momentum update of both banks with its embeddings (the
        heads' outputs of the loss call, before the step). The Distiller calls it
        after the student's step."""
        batch = self._batch
        if batch is None:
            raise ValueError("after_step() needs on_batch(indices, labels) first")
        self._batch = None
        if batch.embeddings is None:  # no loss call, or a skipped (missing) layer
            return
        for head in (self.student_head, self.teacher_head):
            if head is not None:
                head.step()
        e_s, e_t = batch.embeddings
        self._bank.update(batch.indices, e_s, e_t)

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
    def _current_batch(self, n_rows: int) -> _Batch:
        if self._batch is None:
            raise ValueError("CRDStrategy needs the batch's dataset rows: call "
                             "on_batch(indices, labels) before its loss (Distiller does)")
        if n_rows != self._batch.indices.shape[0]:
            raise ValueError(f"the embeddings have {n_rows} rows but on_batch got "
                             f"{self._batch.indices.shape[0]} indices")
        return self._batch

    def _memory_for(self, dim: int) -> CRDMemory:
        if self._bank is None:
            self._bank = CRDMemory(self.n_data, dim, momentum=self.momentum,
                                   temperature=self.temperature, seed=self._rng)
        return self._bank

    def crd_loss_and_gradients(self, student_emb, teacher_emb):
        """Unweighted ``(loss, grad_student, grad_teacher)`` of :func:`crd_loss` on
        given embeddings (the heads' outputs; no heads applied) for the current
        batch (:meth:`on_batch` first); changes nothing but the memory's
        constants on its first call."""
        s = v.as_float_array(student_emb, "student_emb", min_ndim=2)
        t = v.as_float_array(teacher_emb, "teacher_emb", min_ndim=2)
        batch = self._current_batch(s.shape[0])
        s2, t2 = s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)
        memory = self._memory_for(s2.shape[1])
        loss, gs, gt = crd_loss(s2, t2, batch.indices, batch.contrast_indices, memory,
                                device=self.device)
        return loss, gs.reshape(s.shape), gt.reshape(t.shape)

    def intermediate_loss_and_gradient(self, student_acts, teacher_acts
                                       ) -> tuple[float, IntermediateActivations]:
        """``crd_weight * crd_loss`` on the embedding layer (through the heads); the
        student gradient in the returned activations, the heads' gradients kept
        for :meth:`after_step`."""
        check_activations(student_acts, "student_acts")
        check_activations(teacher_acts, "teacher_acts")
        layer = self.embedding_layer_name
        for name, acts in (("student_acts", student_acts), ("teacher_acts", teacher_acts)):
            if layer not in acts:
                if self.missing_layer == "skip":
                    return 0.0, IntermediateActivations()
                raise missing_layer_error(type(self).__name__, layer, name, acts)
        s = v.as_float_array(student_acts[layer], f"student_acts[{layer!r}]", min_ndim=2)
        t = v.as_float_array(teacher_acts[layer], f"teacher_acts[{layer!r}]", min_ndim=2)
        v.check_same_batch(s, t, f"student_acts[{layer!r}]", f"teacher_acts[{layer!r}]")
        batch = self._current_batch(s.shape[0])
        s2, t2 = s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)
        w = self.crd_weight
        if self.embed_dim is None:
            e_s, e_t = s2, t2
        else:
            if self.student_head is None:
                self.student_head = EmbedHead(s2.shape[1], self.embed_dim,
                                              learning_rate=self.head_learning_rate,
                                              rng=self._rng)
                self.teacher_head = EmbedHead(t2.shape[1], self.embed_dim,
                                              learning_rate=self.head_learning_rate,
                                              rng=self._rng)
            e_s, e_t = self.student_head.forward(s2), self.teacher_head.forward(t2)
        memory = self._memory_for(e_s.shape[1])
        loss, gs, gt = crd_loss(e_s, e_t, batch.indices, batch.contrast_indices, memory,
                                device=self.device)
        if self.embed_dim is None:
            grad = gs * gs.dtype.type(w)
        else:
            gs = gs * w
            grad = self.student_head.set_gradient(s2, gs).astype(s.dtype, copy=False)
            self.teacher_head.set_gradient(t2, gt * w)
        batch.embeddings = (e_s, e_t)
        return w * loss, IntermediateActivations({layer: grad.reshape(s.shape)})

    def compute_intermediate_loss(self, student_acts, teacher_acts) -> float:
        return self.intermediate_loss_and_gradient(student_acts, teacher_acts)[0]

    def compute_intermediate_gradient(self, student_acts, teacher_acts) -> IntermediateActivations:
        return self.intermediate_loss_and_gradient(student_acts, teacher_acts)[1]

    # --- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the training state: the banks and constants, the heads
        (parameters and Adam state) and the sampling RNG; ``{}`` before the first
        loss call created them (the RNG state is always there)."""
        state = {"rng": np.asarray(json.dumps(self._rng.bit_generator.state))}
        bank = self._bank
        if bank is not None:
            bank_host = bank.copy().to("cpu")
            state["memory_student"] = bank_host.memory_student
            state["memory_teacher"] = bank_host.memory_teacher
            if bank.log_constants is not None:
                state["log_constants"] = np.asarray(bank.log_constants, np.float64)
        for side, head in (("student_head", self.student_head),
                           ("teacher_head", self.teacher_head)):
            if head is not None:
                for key, value in head.state_dict().items():
                    state[f"{side}.{key}"] = value
        return state

    def load_state_dict(self, state) -> None:
        """Restore :meth:`state_dict` output (into a strategy of the same settings).
        The memory is restored as a new :class:`CRDMemory` on the device of the
        current one (a ``memory`` given to the constructor is replaced, not
        written)."""
        self._rng.bit_generator.state = json.loads(str(np.asarray(state["rng"])))
        if "memory_student" in state:
            ms, mt = np.asarray(state["memory_student"]), np.asarray(state["memory_teacher"])
            if ms.shape[0] != self.n_data:
                raise ValueError(f"the saved memory has {ms.shape[0]} rows but n_data is "
                                 f"{self.n_data}")
            device = "cpu" if self._bank is None else self._bank.device
            self._bank = CRDMemory.from_arrays(ms, mt, momentum=self.momentum,
                                               temperature=self.temperature, device=device)
            log_z = state.get("log_constants")
            if log_z is not None:
                self._bank.set_log_constants(*np.asarray(log_z, np.float64).tolist())
        for side in ("student_head", "teacher_head"):
            keys = {k.split(".", 1)[1]: val for k, val in state.items()
                    if k.startswith(side + ".")}
            if not keys:
                continue
            w = np.asarray(keys["weight"])
            head = EmbedHead(w.shape[0], w.shape[1], learning_rate=self.head_learning_rate)
            head.load_state_dict(keys)
            setattr(self, side, head)
        self._batch = None
