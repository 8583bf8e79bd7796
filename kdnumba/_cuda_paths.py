"""The CUDA branch of each functional wrapper: validate on the device, launch, finish.

A functional wrapper (``kdnumba.functional.<family>``) resolves the device
first and, for ``"cuda"``, hands its arguments to the function of the same
name here; the CPU path never imports this module (nor ``numba.cuda``).

Each function mirrors its CPU wrapper step for step:

1. ``_dispatch.kernels(family, "cuda")``: a clear ``RuntimeError`` when
   ``numba.cuda`` or a usable GPU is missing, before anything is copied;
2. inputs become C-contiguous device arrays of the student's dtype
   (:mod:`kdnumba._cuda_arrays`: GPU arrays adopted without a copy, host
   arrays validated like on the CPU and copied in); hyperparameters are
   validated by the wrapper before it branches;
3. the kernel writes the gradient and one float64 partial per row (or
   column); one block adds the partials in a fixed order on the device
   (:mod:`kdnumba.kernels.cuda.reduce`) and only the total comes back;
4. a non-finite total means bad input: the device inputs are copied back and
   checked by the CPU validators, so the error names the culprit with the
   CPU path's message;
5. the gradient is returned on the device for a GPU student, copied back for
   a host student (see :func:`kdnumba._cuda_arrays.deliver`).
"""

from __future__ import annotations

import numpy as np

from kdnumba import _backend_cuda as ca
from kdnumba import _dispatch
from kdnumba import _validation as v


def _total(partials) -> float:
    """Deterministic float64 sum of a device vector of partials (one 8-byte copy)."""
    from kdnumba.kernels.cuda import reduce
    return reduce.total(partials)


def kd_loss(student_logits, teacher_logits, labels=None, *, temperature: float,
            alpha: float, out=None):
    """CUDA branch of :func:`kdnumba.functional.kd_loss` (same contract).

    ``temperature`` and ``alpha`` are already validated by the wrapper.
    """
    kernels = _dispatch.kernels("softmax_kl", "cuda")
    on_device = ca.is_device_array(student_logits)
    s = ca.device_float_array(student_logits, "student_logits", ndim=2)
    t = ca.device_float_array(teacher_logits, "teacher_logits", ndim=2, dtype=s.dtype)
    v.check_same_shape(s, t, "student_logits", "teacher_logits")
    kind, y = ca.device_labels(labels, "labels", s.shape[0], s.shape[1], np.dtype(s.dtype))
    grad = ca.gradient_buffer(out, s.shape, s.dtype, on_device=on_device, inputs=(s, t, y),
                              host_inputs=(student_logits, teacher_logits))
    loss = _kd_core(kernels, s, t, kind, y, temperature, alpha, grad)
    return loss, ca.deliver(grad, out, on_device=on_device)


def _kd_core(kernels, s, t, kind, y, temperature, alpha, grad) -> float:
    """KD loss of kernel-ready device arrays; writes ``grad``; raises on bad input."""
    from kdnumba._constants import LABEL_CODES as _LABEL_KINDS
    from kdnumba.functional.response import kernel_weights
    cuda = ca._cuda()
    n_rows, n_cols = s.shape
    dtype = np.dtype(s.dtype)
    row_loss = cuda.device_array(n_rows, dtype=np.float64)
    # Label arrays the kernel does not read still need the right type.
    y_index = y if kind == "index" else cuda.device_array(1, dtype=np.int64)
    y_dense = y if kind == "dense" else cuda.device_array((1, 1), dtype=dtype)
    kernels.kd_rows(
        s, t, y_index, y_dense, _LABEL_KINDS[kind],
        1.0 / temperature,
        *kernel_weights(kind, temperature, alpha, n_rows),
        grad, row_loss)
    loss = _total(row_loss)
    if not np.isfinite(loss):
        _diagnose_kd(s, t, kind, y, n_rows, n_cols, dtype)
    return loss


def _diagnose_kd(s, t, kind, y, n_rows, n_cols, dtype):
    """Error path: name the bad input with the CPU path's messages."""
    y_host = ca.host_copy(y)
    if kind != "none":
        v.as_labels(y_host, "labels", n_rows, n_cols, dtype)  # raises for bad labels
    v.raise_non_finite([("student_logits", ca.host_copy(s)),
                        ("teacher_logits", ca.host_copy(t)),
                        ("labels", y_host if kind == "dense" else None)])


# --- feature ----------------------------------------------------------------------------

def _mse_core(s, t, names):
    """``(loss, grad)`` of the mean squared error of same-shape kernel-ready device
    arrays (the GPU twin of ``functional.feature._mse``)."""
    kernels = _dispatch.kernels("feature", "cuda")
    cuda = ca._cuda()
    n = int(np.prod(s.shape))
    grad = cuda.device_array(tuple(s.shape), dtype=s.dtype)
    partial = cuda.device_array(kernels.n_chunks(n), dtype=np.float64)
    kernels.sq_diff_chunks(s.reshape(n), t.reshape(n), 2.0 / n, grad.reshape(n), partial)
    loss = _total(partial) / n
    if not np.isfinite(loss):
        v.raise_non_finite([(names[0], ca.host_copy(s)), (names[1], ca.host_copy(t))])
    return loss, grad


def feature_loss(student_feats, teacher_feats):
    """CUDA branch of :func:`kdnumba.functional.feature_loss` (same contract)."""
    _dispatch.kernels("feature", "cuda")
    s = ca.device_float_array(student_feats, "student_feats")
    t = ca.device_float_array(teacher_feats, "teacher_feats", dtype=s.dtype)
    v.check_same_shape(s, t, "student_feats", "teacher_feats")
    loss, grad = _mse_core(s, t, ("student_feats", "teacher_feats"))
    return loss, ca.deliver(grad, None, on_device=ca.is_device_array(student_feats))


# --- attention ----------------------------------------------------------------------------

def attention_transfer(student_feats, teacher_feats, *, p: int, variant: str, pool: bool):
    """CUDA branch of :func:`kdnumba.functional.attention_transfer` (same contract).

    ``p``, ``variant`` and ``pool`` are already validated by the wrapper.
    Average pooling of unequal spatial sizes (``pool=True``) is not available
    on the GPU yet: it raises ``NotImplementedError``.
    """
    from kdnumba.functional import attention as fa
    kernels = _dispatch.kernels("attention", "cuda")
    s = ca.device_float_array(student_feats, "student_feats", min_ndim=3)
    t = ca.device_float_array(teacher_feats, "teacher_feats", min_ndim=3, dtype=s.dtype)
    v.check_same_batch(s, t, "student_feats", "teacher_feats")
    if len(s.shape) != len(t.shape):
        raise ValueError(f"student_feats {tuple(s.shape)} and teacher_feats {tuple(t.shape)} "
                         "must both be (B, C, *spatial) with the same number of spatial axes")
    s_factors, t_factors = fa._pool_factors(tuple(s.shape[2:]), tuple(t.shape[2:]), pool)
    if any(k != 1 for k in s_factors + t_factors):
        raise NotImplementedError(
            "attention_transfer(pool=True) with different spatial sizes is not implemented "
            "on CUDA: pool the larger map on the device first (e.g. "
            "torch.nn.functional.adaptive_avg_pool2d), or use device='cpu'")
    n_rows, c_s = s.shape[0], s.shape[1]
    c_t = t.shape[1]
    n_sp = int(np.prod(s.shape[2:]))
    s3 = s.reshape(n_rows, c_s, n_sp)
    t3 = t.reshape(n_rows, c_t, n_sp)
    paper = variant == "paper"
    k_s = 1.0 if paper else 1.0 / c_s
    k_t = 1.0 if paper else 1.0 / c_t
    q_s = kernels.power_sums(s3, p, paper, k_s)
    q_t = kernels.power_sums(t3, p, paper, k_t)
    w = 1.0 / n_rows if paper else 1.0 / (n_rows * n_sp)
    gq, row_loss = kernels.at_samples(q_s, q_t, fa.EPS, w, paper, k_s)
    loss = _total(row_loss)
    if not np.isfinite(loss):
        v.raise_non_finite([("student_feats", ca.host_copy(s)),
                            ("teacher_feats", ca.host_copy(t))],
                           what="the attention maps (f^p)")
    grad = ca._cuda().device_array(tuple(s.shape), dtype=s.dtype)
    kernels.at_gradient(s3, p, paper, gq, grad.reshape(n_rows, c_s, n_sp))
    return loss, ca.deliver(grad, None, on_device=ca.is_device_array(student_feats))


def attention_map_loss(student_attn, teacher_attn, *, kind: str, inputs: str):
    """CUDA branch of :func:`kdnumba.functional.attention_map_loss` (same contract).

    ``kind`` and ``inputs`` are already validated by the wrapper.
    """
    from kdnumba.functional import attention as fa
    kernels = _dispatch.kernels("attention", "cuda")
    on_device = ca.is_device_array(student_attn)
    s = ca.device_float_array(student_attn, "student_attn", min_ndim=2)
    t = ca.device_float_array(teacher_attn, "teacher_attn", min_ndim=2, dtype=s.dtype)
    v.check_same_shape(s, t, "student_attn", "teacher_attn")
    shape = tuple(s.shape)
    if kind == "mse":
        loss, grad = _mse_core(s, t, ("student_attn", "teacher_attn"))
        return loss, ca.deliver(grad, None, on_device=on_device)
    n_cols = shape[-1]
    n_rows = int(np.prod(shape)) // n_cols
    s2 = s.reshape(n_rows, n_cols)
    t2 = t.reshape(n_rows, n_cols)
    cuda = ca._cuda()
    grad = cuda.device_array(shape, dtype=s.dtype)
    if inputs == "logits":
        try:
            loss = _kd_core(_dispatch.kernels("softmax_kl", "cuda"), s2, t2, "none", None,
                            1.0, 0.0, grad.reshape(n_rows, n_cols))
        except ValueError:  # name our arguments, not kd_loss's
            v.raise_non_finite([("student_attn", ca.host_copy(s)),
                                ("teacher_attn", ca.host_copy(t))])
        return loss, ca.deliver(grad, None, on_device=on_device)
    row_loss = cuda.device_array(n_rows, dtype=np.float64)
    kernels.kl_prob_rows(s2, t2, fa.EPS, 1.0 / n_rows, grad.reshape(n_rows, n_cols), row_loss)
    loss = _total(row_loss) / n_rows
    if not np.isfinite(loss):
        _diagnose_kl_probs(s, t)
    return loss, ca.deliver(grad, None, on_device=on_device)


def _diagnose_kl_probs(s, t):
    """Error path of ``attention_map_loss(kind="kl", inputs="probs")``: the CPU
    implementation on host copies raises the CPU path's exact error."""
    from kdnumba.functional.attention import attention_map_loss as cpu_attention_map_loss
    cpu_attention_map_loss(ca.host_copy(s), ca.host_copy(t), kind="kl", inputs="probs",
                           device="cpu")
    v.raise_non_finite([], what="the loss")
