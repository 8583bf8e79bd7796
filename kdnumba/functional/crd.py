r"""Contrastive representation distillation (CRD, Tian et al. 2020) against a memory
bank: :func:`crd_loss`, :class:`CRDMemory` and :class:`ContrastSampler`.

Exactly RepDistiller's ``crd/criterion.py`` (``CRDLoss`` with a given
``contrast_idx``, ``ContrastLoss``, ``Embed``'s L2 normalisation) and
``crd/memory.py`` (``ContrastMemory``). With ``v_s = x_s / ||x_s||``,
``v_t = x_t / ||x_t||`` (the embed heads' outputs, normalised without
epsilon as ``Normalize`` does), banks ``M_s`` (student side, RepDistiller's
``memory_v1``) and ``M_t`` (teacher side, ``memory_v2``), the sampled rows
``j_bk = contrast_indices[b, k]`` (column 0 the positive, ``K`` negatives),
``N = n_data``, ``Pn = 1/N``, ``c = K Pn + 1e-7``::

    P^s_bk = exp(M_t[j_bk] . v_s_b / T) / Z_s     student anchor, teacher bank (out_v1)
    P^t_bk = exp(M_s[j_bk] . v_t_b / T) / Z_t     teacher anchor, student bank (out_v2)
    h(P)   = -1/B sum_b [ log(P_b0 / (P_b0 + c)) + sum_{k>=1} log(K Pn / (P_bk + c)) ]
    loss   = h(P^s) + h(P^t)

``Z_s``/``Z_t`` are RepDistiller's constants ``Z_v1``/``Z_v2``: ``N`` times the
mean of the unnormalised ``exp(.)`` scores of the first batch the memory
sees, then frozen (constants: no gradient flows through them, as in
RepDistiller, where they are Python floats). Gradients::

    d loss / d v_s_b = 1/(B T) sum_k w_bk M_t[j_bk],  w_b0 = -c/(P_b0 + c),  w_bk = P_bk/(P_bk + c)
    d loss / d x_s_b = (I - v_s_b v_s_b^T) (d loss / d v_s_b) / ||x_s_b||     (teacher alike)

The code works with ``s = log P`` (softplus/sigmoid forms), so banks of any
scale neither overflow nor lose the small terms; results equal RepDistiller's
in float64 to rounding. No ``B x (K+1) x D`` gather: each score is a dot
product read from the bank row by row (``kernels/*/crd.py``), extra memory
``O(B K)``.

Where RepDistiller's code and the paper differ: the paper's NCE uses the
exact noise probability; the code uses ``P_n = 1/N`` with ``m = K`` and adds
``eps = 1e-7`` in the denominators, and normalises with constants fixed on
the first batch (the paper's ``Z`` is a Monte-Carlo estimate that is never
refreshed). We follow the code.
"""

from __future__ import annotations

import math

import numpy as np

from kdnumba import _dispatch
from kdnumba import _validation as v
from kdnumba._backend_host import HOST
from kdnumba.registry import BadInput, LossSpec, Variant, Workload, register

__all__ = ["CRDMemory", "ContrastSampler", "crd_loss"]

_FAMILY = "crd"

#: RepDistiller's ``eps`` in ``ContrastLoss`` (``crd/criterion.py``).
NCE_EPS = 1e-7


def _is_device_array(x) -> bool:
    return _dispatch.is_cuda_array(x)


class CRDMemory:
    """RepDistiller's ``ContrastMemory``: two memory banks and two normalising constants.

    Args:
        n_data: rows of each bank (the training-set size).
        dim: embedding width (``feat_dim``).
        momentum: of :meth:`update`, in ``[0, 1]`` (RepDistiller's ``nce_m``).
        temperature: ``T > 0`` of the scores (``nce_t``).
        seed: seeds the banks' initialisation, uniform in ``[-stdv, stdv]``,
            ``stdv = 1 / sqrt(dim / 3)`` as RepDistiller's (student bank first).
        dtype: of the banks, float32 (default; ImageNet's 1.28M x 128 is 1.3 GB
            in total) or float64. The loss computes in float64 from either.
        device: ``"cpu"`` (NumPy banks) or ``"cuda"`` (banks in GPU memory; the
            loss and the update then run on the GPU without copying them).

    The constants ``z_student`` (RepDistiller's ``Z_v1``: student anchors
    against the teacher bank) and ``z_teacher`` (``Z_v2``) are ``None`` until
    the first :func:`crd_loss` call sets them from its batch; they stay fixed
    afterwards. :meth:`set_constants` fixes them explicitly.
    """

    def __init__(self, n_data, dim, *, momentum=0.5, temperature=0.07, seed=None,
                 dtype=np.float32, device="cpu"):
        n_data = v.check_int(n_data, "n_data", minimum=1)
        dim = v.check_int(dim, "dim", minimum=1)
        dtype = _bank_dtype(dtype)
        rng = np.random.default_rng(seed)
        stdv = 1.0 / math.sqrt(dim / 3.0)
        banks = []
        for _ in range(2):
            bank = rng.random((n_data, dim), dtype=dtype)
            bank *= dtype.type(2.0 * stdv)
            bank -= dtype.type(stdv)
            banks.append(bank)
        self._init(banks[0], banks[1], momentum, temperature, None, None, device)

    @classmethod
    def from_arrays(cls, memory_student, memory_teacher, *, momentum=0.5, temperature=0.07,
                    z_student=None, z_teacher=None, device="cpu"):
        """A memory over given banks (copied; ``(n_data, dim)`` float32/float64 of
        one shape and dtype), with optional fixed constants (both or neither)."""
        ms = v.as_float_array(memory_student, "memory_student", ndim=2).copy()
        mt = v.as_float_array(memory_teacher, "memory_teacher", ndim=2).copy()
        if ms.shape != mt.shape or ms.dtype != mt.dtype:
            raise ValueError(
                f"memory_student and memory_teacher must have one shape and dtype, got "
                f"{ms.dtype.name} {ms.shape} and {mt.dtype.name} {mt.shape}")
        for name, bank in (("memory_student", ms), ("memory_teacher", mt)):
            if not np.isfinite(bank).all():
                raise ValueError(f"{name} contains NaN or inf values")
        if (z_student is None) != (z_teacher is None):
            raise ValueError("give both z_student and z_teacher, or neither")
        self = cls.__new__(cls)
        self._init(ms, mt, momentum, temperature, z_student, z_teacher, device)
        return self

    def _init(self, ms, mt, momentum, temperature, z_student, z_teacher, device):
        self.momentum = v.check_unit_interval(momentum, "momentum")
        self.temperature = v.check_positive(temperature, "temperature")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda' for a CRDMemory, got {device!r}")
        self._student, self._teacher = ms, mt
        self._log_z = None
        if z_student is not None:
            self.set_constants(z_student, z_teacher)
        self.device = "cpu"
        if device == "cuda":
            self.to("cuda")

    # --- state -----------------------------------------------------------------------
    @property
    def n_data(self) -> int:
        return int(self._student.shape[0])

    @property
    def dim(self) -> int:
        return int(self._student.shape[1])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._student.dtype)

    @property
    def memory_student(self):
        """The student-side bank ``(n_data, dim)`` (RepDistiller's ``memory_v1``);
        a NumPy array, or a Numba device array on ``device="cuda"``. Live: do not
        write to it."""
        return self._student

    @property
    def memory_teacher(self):
        """The teacher-side bank (RepDistiller's ``memory_v2``)."""
        return self._teacher

    @property
    def z_student(self) -> float | None:
        """``Z_v1`` (student anchors, teacher bank), ``None`` until set."""
        return None if self._log_z is None else math.exp(self._log_z[0])

    @property
    def z_teacher(self) -> float | None:
        """``Z_v2`` (teacher anchors, student bank), ``None`` until set."""
        return None if self._log_z is None else math.exp(self._log_z[1])

    @property
    def log_constants(self) -> tuple[float, float] | None:
        """``(log z_student, log z_teacher)`` (exact even where ``Z`` would overflow)."""
        return self._log_z

    def set_constants(self, z_student, z_teacher) -> None:
        """Fix the two normalising constants (positive floats)."""
        zs = v.check_positive(z_student, "z_student")
        zt = v.check_positive(z_teacher, "z_teacher")
        self._log_z = (math.log(zs), math.log(zt))

    def set_log_constants(self, log_z_student, log_z_teacher) -> None:
        """Fix the constants by their logarithms (as :attr:`log_constants` gives
        them: exact where ``Z`` itself would overflow); finite floats."""
        pair = (v.check_real(log_z_student, "log_z_student"),
                v.check_real(log_z_teacher, "log_z_teacher"))
        self._log_z = pair

    def _set_log_constants(self, log_zs: float, log_zt: float) -> None:
        self._log_z = (float(log_zs), float(log_zt))

    def copy(self) -> CRDMemory:
        """An independent copy (banks, constants, settings)."""
        other = CRDMemory.__new__(CRDMemory)
        other.momentum, other.temperature = self.momentum, self.temperature
        other._log_z = self._log_z
        other.device = self.device
        if self.device == "cuda":
            from numba import cuda
            other._student = cuda.to_device(self._student.copy_to_host())
            other._teacher = cuda.to_device(self._teacher.copy_to_host())
        else:
            other._student, other._teacher = self._student.copy(), self._teacher.copy()
        return other

    def to(self, device: str) -> CRDMemory:
        """Move the banks to ``"cpu"`` or ``"cuda"`` (in place; returns ``self``)."""
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if device == self.device:
            return self
        if device == "cuda":
            reason = _dispatch.cuda_unavailable_reason()
            if reason is not None:
                raise RuntimeError(reason)
            from numba import cuda
            self._student = cuda.to_device(self._student)
            self._teacher = cuda.to_device(self._teacher)
        else:
            self._student = self._student.copy_to_host()
            self._teacher = self._teacher.copy_to_host()
        self.device = device
        return self

    def _banks_for(self, be):
        """``(student bank, teacher bank)`` where backend ``be`` computes (a copy
        only when the memory lives on the other device)."""
        if be.device == self.device:
            return self._student, self._teacher
        if be.device == "cuda":
            return be.to_device(self._student), be.to_device(self._teacher)
        return self._student.copy_to_host(), self._teacher.copy_to_host()

    # --- the update ------------------------------------------------------------------
    def update(self, indices, student_emb, teacher_emb) -> None:
        """RepDistiller's momentum update of the rows ``indices``, after the step.

        ``student_emb``/``teacher_emb`` are the same pre-normalisation arrays
        ``crd_loss`` took; they are L2-normalised first (``Embed``), then
        ``M[i] = normalize(momentum * M[i] + (1 - momentum) * v)`` for both banks.
        Each new row is computed from the bank before the call; with a repeated
        index the last occurrence wins (as ``index_copy_`` on the CPU).
        """
        if self.device == "cuda":
            from kdnumba._backend_cuda import CudaBackend
            be = CudaBackend(on_device=True)
        else:
            be = HOST
        s = be.float_array(student_emb, "student_emb", ndim=2)
        t = be.float_array(teacher_emb, "teacher_emb", ndim=2, dtype=s.dtype)
        v.check_same_batch(s, t, "student_emb", "teacher_emb")
        _check_width(s, self.dim, "student_emb")
        _check_width(t, self.dim, "teacher_emb")
        idx = _index_array(be, indices, "indices", 1, s.shape[0], self.n_data)
        kernels = be.kernels(_FAMILY)
        vs, _ = _normalized(be, kernels, s, "student_emb")
        vt, _ = _normalized(be, kernels, t, "teacher_emb")
        with be.launch(s.shape[0] * s.shape[1]):
            kernels.update_rows(self._student, idx, vs, float(self.momentum))
            kernels.update_rows(self._teacher, idx, vt, float(self.momentum))

    def __repr__(self) -> str:
        zs, zt = self.z_student, self.z_teacher
        return (f"CRDMemory(n_data={self.n_data}, dim={self.dim}, momentum={self.momentum}, "
                f"temperature={self.temperature}, dtype={self.dtype.name}, "
                f"device={self.device!r}, z_student={zs}, z_teacher={zt})")


def _bank_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in v.FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype.name}")
    return dtype


class ContrastSampler:
    """Negative sampling as RepDistiller's ``CIFAR100InstanceSample`` (``is_sample=True``).

    For sample ``i`` of class ``y_i`` a row ``[pos, neg_1 .. neg_K]``: ``pos = i``
    (``mode="exact"``) or a random sample of class ``y_i`` (``"relax"``), and
    ``K`` negatives drawn uniformly from the samples of the *other* classes,
    without replacement unless ``K`` exceeds their number (RepDistiller's
    ``replace = k > len(cls_negative[target])``). Memory ``O(n_data)``: the
    per-class negative lists RepDistiller builds (``n_data`` entries per class)
    are never formed; a draw ``j`` from ``[0, n_data - n_y)`` is mapped through
    the samples sorted by class, skipping class ``y``'s block.

    Args:
        labels: integer class of every training sample ``(n_data,)``.
        n_negatives: ``K``.
        mode: ``"exact"`` or ``"relax"``.
        seed: seeds a ``numpy.random.Generator`` (one stream per sampler).
    """

    def __init__(self, labels, n_negatives, *, mode="exact", seed=None):
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or labels.size == 0:
            raise ValueError("labels must be a non-empty 1-D integer array (one class per sample)")
        self.n_negatives = v.check_int(n_negatives, "n_negatives", minimum=0)
        if mode not in ("exact", "relax"):
            raise ValueError(f"mode must be 'exact' or 'relax', got {mode!r}")
        self.mode = mode
        self.labels = np.ascontiguousarray(labels, dtype=np.int64)
        self.order = np.argsort(self.labels, kind="stable").astype(np.int64)
        classes, starts, counts = np.unique(self.labels[self.order], return_index=True,
                                            return_counts=True)
        self._class_of = {int(c): k for k, c in enumerate(classes)}
        self._starts = starts.astype(np.int64)
        self._counts = counts.astype(np.int64)
        self.rng = np.random.default_rng(seed)

    @property
    def n_data(self) -> int:
        return int(self.labels.shape[0])

    def sample(self, indices) -> np.ndarray:
        """``contrast_indices`` ``(B, K + 1)`` int64 for the dataset rows ``indices``."""
        idx = np.asarray(indices)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise ValueError("indices must be a 1-D integer array")
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_data):
            raise ValueError(f"indices must lie in [0, {self.n_data})")
        k = self.n_negatives
        out = np.empty((idx.shape[0], k + 1), dtype=np.int64)
        for row, i in enumerate(idx):
            c = self._class_of[int(self.labels[i])]
            start, count = self._starts[c], self._counts[c]
            if self.mode == "exact":
                out[row, 0] = i
            else:
                out[row, 0] = self.order[start + self.rng.integers(count)]
            n_other = self.n_data - count
            if k == 0:
                continue
            if n_other == 0:
                raise ValueError("every sample has the same class: there are no negatives")
            draws = self.rng.choice(n_other, k, replace=k > n_other)
            draws = draws + np.where(draws >= start, count, 0)
            out[row, 1:] = self.order[draws]
        return out


# --- validation ------------------------------------------------------------------------

def _check_width(x, dim: int, name: str) -> None:
    if x.shape[1] != dim:
        raise ValueError(
            f"{name} has width {x.shape[1]} but the memory's dim is {dim}; the embed heads "
            "must project both networks to the memory's width")


def _index_array(be, x, name: str, ndim: int, n_rows: int, n_data: int):
    """Validated int64 kernel-side copy of an index array (checks on the host)."""
    if x is None:
        raise ValueError(f"{name} is required")
    host = np.asarray(be.host_object(x))
    if host.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {host.dtype.name}")
    if host.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {host.shape}")
    if host.shape[0] != n_rows:
        raise ValueError(
            f"batch size mismatch: {name} has {host.shape[0]} rows, the embeddings have {n_rows}")
    if ndim == 2 and host.shape[1] == 0:
        raise ValueError(f"{name} needs at least one column (the positive), got shape {host.shape}")
    if host.size and (host.min() < 0 or host.max() >= n_data):
        raise ValueError(f"{name} must lie in [0, n_data) = [0, {n_data}) (memory rows)")
    return be.to_device(v.kernel_ready(host, np.int64))


def _normalized(be, kernels, x, name: str):
    """``(v, norms)``: float64 unit rows and row norms of ``x``; ``ValueError``
    naming ``x`` for NaN/inf, an overflowing norm or a zero row."""
    n, dim = x.shape
    vx = be.empty((n, dim), np.float64)
    norms = be.empty(n, np.float64)
    kernels.normalize_rows(x, norms, vx)
    host = be.to_host(norms)
    if not np.isfinite(host).all():
        if not np.isfinite(be.to_host(x)).all():
            raise ValueError(f"{name} contains NaN or inf values")
        raise ValueError(f"{name} has rows whose norm overflows float64; rescale it")
    if (host == 0).any():
        raise ValueError(
            f"{name} has an all-zero row: its L2 normalisation (RepDistiller's Embed) is "
            "undefined")
    return vx, norms


def _log_z(be, kernels, vx, bank, cidx, inv_t: float, n_data: int) -> float:
    """``log(N * mean_bk exp(M[j_bk] . v_b / T))`` over this batch (stable)."""
    n, n_cols = cidx.shape
    nch = kernels.n_chunks(n_cols)
    z_max = be.empty((n, nch), np.float64)
    z_sum = be.empty((n, nch), np.float64)
    with be.launch(n * n_cols * vx.shape[1]):
        kernels.z_chunks(vx, bank, cidx, inv_t, z_max, z_sum)
    z_max, z_sum = be.to_host(z_max).ravel(), be.to_host(z_sum).ravel()
    top = float(z_max.max())
    total = 0.0
    for m, s in zip(z_max.tolist(), z_sum.tolist()):  # fixed order
        total += s * math.exp(m - top)
    return top + math.log(total) - math.log(n * n_cols) + math.log(n_data)


# --- the loss ----------------------------------------------------------------------------

def crd_loss(student_emb, teacher_emb, indices, contrast_indices, memory, *, device="auto"):
    r"""CRD's NCE loss (student- and teacher-anchor terms) with both gradients.

    RepDistiller's ``CRDLoss.forward(f_s, f_t, idx, contrast_idx)`` after the
    embed heads' linear layers (see the module docstring for the formula)::

        loss = h(P^s) + h(P^t),  h(P) = -1/B sum_b [log(P_b0/(P_b0 + c)) + sum_k log(K Pn/(P_bk + c))]

    Args:
        student_emb, teacher_emb: ``(B, dim)`` embed-head outputs *before*
            their L2 normalisation (this function normalises, as ``Embed``);
            the teacher is cast to the student's dtype.
        indices: ``(B,)`` integer dataset rows of the batch (RepDistiller's
            ``idx``). The loss does not read them (column 0 of
            ``contrast_indices`` is the positive, as with a given
            ``contrast_idx``); they are validated so the same arguments can
            go to ``memory.update`` after the step.
        contrast_indices: ``(B, K + 1)`` integer bank rows, column 0 the positive.
        memory: a :class:`CRDMemory`. Not modified, except that a memory
            without constants gets them from this batch (RepDistiller's
            first-batch ``Z``); call ``memory.update`` after the step.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.

    Returns:
        ``(loss, grad_student, grad_teacher)``: a float and two arrays of the
        inputs' shape in the student's dtype (exact derivatives of ``loss``,
        the constants held fixed as RepDistiller's Python-float ``Z``).

    Raises:
        TypeError: non-float embeddings, non-integer indices, ``memory`` not a CRDMemory.
        ValueError: shapes, widths, empty batch, NaN/inf, an all-zero row,
            indices outside ``[0, n_data)``.
    """
    if not isinstance(memory, CRDMemory):
        raise TypeError(f"memory must be a CRDMemory, got {type(memory).__name__}")
    be = _dispatch.backend(device, student_emb, teacher_emb, indices, contrast_indices)
    s = be.float_array(student_emb, "student_emb", ndim=2)
    t = be.float_array(teacher_emb, "teacher_emb", ndim=2, dtype=s.dtype)
    v.check_same_batch(s, t, "student_emb", "teacher_emb")
    _check_width(s, memory.dim, "student_emb")
    _check_width(t, memory.dim, "teacher_emb")
    n, dim = s.shape
    n_data = memory.n_data
    _index_array(be, indices, "indices", 1, n, n_data)
    cidx = _index_array(be, contrast_indices, "contrast_indices", 2, n, n_data)
    n_cols = cidx.shape[1]
    k = n_cols - 1
    kernels = be.kernels(_FAMILY)
    vs, ns = _normalized(be, kernels, s, "student_emb")
    vt, nt = _normalized(be, kernels, t, "teacher_emb")
    bank_s, bank_t = memory._banks_for(be)
    inv_t = 1.0 / memory.temperature
    if memory.log_constants is None:  # RepDistiller: set from the first batch, then frozen
        memory._set_log_constants(_log_z(be, kernels, vs, bank_t, cidx, inv_t, n_data),
                                  _log_z(be, kernels, vt, bank_s, cidx, inv_t, n_data))
    log_zs, log_zt = memory.log_constants
    c = k / n_data + NCE_EPS
    log_c = math.log(c)
    d0 = math.log1p(NCE_EPS * n_data / k) if k > 0 else 0.0
    nch = kernels.n_chunks(n_cols)
    loss_s = be.empty((n, nch), np.float64)
    loss_t = be.empty((n, nch), np.float64)
    part_s = be.empty((n, nch, dim), np.float64)
    part_t = be.empty((n, nch, dim), np.float64)
    with be.launch(n * n_cols * dim):
        kernels.nce_chunks(vs, bank_t, cidx, inv_t, log_zs, log_c, d0, loss_s, part_s)
        kernels.nce_chunks(vt, bank_s, cidx, inv_t, log_zt, log_c, d0, loss_t, part_t)
    loss = (be.total(loss_s.reshape(n * nch)) + be.total(loss_t.reshape(n * nch))) / n
    be.check_finite(loss, [("student_emb", s), ("teacher_emb", t)])
    grad_s = be.gradient_buffer(None, s)
    grad_t = be.gradient_buffer(None, t)
    scale = 1.0 / (memory.temperature * n)
    with be.launch(n * nch * dim):
        kernels.finish_grad(vs, ns, part_s, scale, grad_s)
        kernels.finish_grad(vt, nt, part_t, scale, grad_t)
    return loss, be.deliver(grad_s, None), be.deliver(grad_t, None)


# --- registry ------------------------------------------------------------------------------

def _crd_inputs(rng, dtype, *, rows=4, dim=5, n_data=12, negatives=5, temperature=0.07,
                bank_dtype=None, scale=1.0) -> dict:
    """Embeddings (teacher = student + noise), indices, contrast indices (column 0
    the positive) and a memory whose constants are fixed from this batch (so
    every call, finite differences included, sees the same constants)."""
    student = (scale * rng.standard_normal((rows, dim))).astype(dtype)
    teacher = (student + scale * rng.standard_normal((rows, dim))).astype(dtype)
    indices = rng.choice(n_data, rows, replace=n_data < rows).astype(np.int64)
    contrast = rng.integers(0, n_data, (rows, negatives + 1), dtype=np.int64)
    contrast[:, 0] = indices
    memory = CRDMemory(n_data, dim, temperature=temperature, seed=int(rng.integers(2**31)),
                       dtype=dtype if bank_dtype is None else bank_dtype)
    memory.set_constants(*_first_batch_constants(student, teacher, contrast, memory))
    return {"student_emb": student, "teacher_emb": teacher, "indices": indices,
            "contrast_indices": contrast, "memory": memory}


def _first_batch_constants(student, teacher, contrast, memory) -> tuple[float, float]:
    """RepDistiller's ``Z_v1``, ``Z_v2`` of a batch, in NumPy (small inputs only)."""
    def z(x, bank):
        x = np.asarray(x, np.float64)
        unit = x / np.sqrt((x * x).sum(1, keepdims=True))
        dots = np.einsum("bkd,bd->bk", np.asarray(bank, np.float64)[contrast], unit)
        return float(np.exp(dots / memory.temperature).mean() * memory.n_data)
    return z(student, memory.memory_teacher), z(teacher, memory.memory_student)


def _with(arguments: dict, **changes) -> dict:
    return {**arguments, **changes}


def _bytes(inputs) -> int:
    """Each sampled bank row read once per side, plus the embeddings and gradients."""
    memory = inputs["memory"]
    n, n_cols = inputs["contrast_indices"].shape
    emb = inputs["student_emb"].nbytes + inputs["teacher_emb"].nbytes
    return 2 * n * n_cols * memory.dim * memory.dtype.itemsize + 2 * emb \
        + inputs["contrast_indices"].nbytes


def _flops(inputs) -> int:
    n, n_cols = inputs["contrast_indices"].shape
    return 2 * 4 * n * n_cols * inputs["memory"].dim  # dot + gradient axpy, two sides


register(LossSpec(
    name="crd_loss",
    function=crd_loss,
    family=_FAMILY,
    make_inputs=_crd_inputs,
    reference="crd:crd_loss",
    torch="crd:crd_loss_torch",
    variants=(
        Variant("T=0.07, K=5"),
        Variant("T=0.5, K=1, float64 bank", inputs={"temperature": 0.5, "negatives": 1,
                                                     "bank_dtype": np.float64}),
        Variant("T=0.2, only the positive", inputs={"temperature": 0.2, "negatives": 0}),
        Variant("K=7, 40 bank rows, float32 bank", inputs={"negatives": 7, "n_data": 40,
                                                         "bank_dtype": np.float32}),
    ),
    medium={"rows": 64, "dim": 32, "n_data": 3000, "negatives": 700},
    grad_wrt=("student_emb", "teacher_emb"),
    has_out=False,
    nonnegative=True,  # c > K Pn: every log term is negative
    zero_when_equal=False,
    bad_inputs=(
        BadInput("memory not a CRDMemory", lambda a: _with(a, memory=None), TypeError, "memory"),
        BadInput("contrast index out of range",
                 lambda a: _with(a, contrast_indices=a["contrast_indices"] + a["memory"].n_data),
                 ValueError, "contrast_indices"),
        BadInput("negative index", lambda a: _with(a, indices=a["indices"] - 100), ValueError,
                 "indices"),
        BadInput("float contrast indices",
                 lambda a: _with(a, contrast_indices=a["contrast_indices"].astype(float)),
                 TypeError, "contrast_indices"),
        BadInput("1-D contrast indices",
                 lambda a: _with(a, contrast_indices=a["contrast_indices"][:, 0]),
                 ValueError, "contrast_indices"),
        BadInput("width not the memory's",
                 lambda a: _with(a, student_emb=np.hstack([a["student_emb"]] * 2)),
                 ValueError, "student_emb"),
        BadInput("all-zero teacher row",
                 lambda a: _with(a, teacher_emb=np.vstack([a["teacher_emb"][:-1],
                                                           np.zeros_like(a["teacher_emb"][:1])])),
                 ValueError, "teacher_emb"),
    ),
    workloads=(
        Workload("B64_K16384_D128_n50000",
                 {"rows": 64, "dim": 128, "n_data": 50_000, "negatives": 16_384}, quick=True,
                 notes="CIFAR-100 scale bank; RepDistiller gathers B x (K+1) x D per bank"),
        Workload("B64_K16384_D128_n1281167",
                 {"rows": 64, "dim": 128, "n_data": 1_281_167, "negatives": 16_384},
                 notes="ImageNet scale: two float32 banks of 1.28M x 128 (1.3 GB)"),
    ),
    bytes_moved=_bytes,
    flops=_flops,
))
