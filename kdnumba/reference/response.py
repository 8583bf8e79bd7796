"""NumPy reference for response-based KD (``kdnumba.functional.kd_loss``)."""

from __future__ import annotations

import numpy as np


def log_softmax(z: np.ndarray) -> np.ndarray:
    """``log softmax`` over the last axis (the rows of a matrix) via the
    max-shifted log-sum-exp."""
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _standardize(z: np.ndarray):
    """``(y, sigma)``: rows ``(z - mean)/(std + 1e-7)`` (unbiased std) and the stds."""
    x = z - z.mean(axis=1, keepdims=True)
    sigma = np.sqrt((x * x).sum(axis=1, keepdims=True) / (z.shape[1] - 1))
    return x / (sigma + 1e-7), sigma


def _standardize_backward(g: np.ndarray, y: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """d loss / d z from d loss / d y for ``y = _standardize(z)``."""
    n = g.shape[1]
    gy = (g * y).sum(axis=1, keepdims=True)
    coef = np.where(sigma > 0, gy / ((n - 1) * np.where(sigma > 0, sigma, 1.0)), 0.0)
    return (g - g.mean(axis=1, keepdims=True)) / (sigma + 1e-7) - coef * y


def _soft_divergence(s, t, T, divergence, beta):
    """``(sum_i D_i, dD/du)``: the divergence summed over rows and its gradient in
    the tempered student logits ``u = s/T``, from log-probabilities."""
    log_p = log_softmax(s / T)
    log_q = log_softmax(t / T)
    p, q = np.exp(log_p), np.exp(log_q)
    if divergence == "kl":
        return np.sum(q * (log_q - log_p)), p - q
    if divergence == "reverse_kl":
        r = log_p - log_q
        d = np.sum(p * r, axis=1, keepdims=True)
        return np.sum(d), p * (r - d)
    if divergence == "jsd":
        log_m = np.logaddexp(np.log(beta) + log_q, np.log1p(-beta) + log_p)
        k_s = np.sum(p * (log_p - log_m), axis=1, keepdims=True)
        k_t = np.sum(q * (log_q - log_m), axis=1, keepdims=True)
        return np.sum(beta * k_t + (1 - beta) * k_s), (1 - beta) * p * (log_p - log_m - k_s)
    if divergence == "tvd":
        sg = 0.5 * np.sign(p - q)
        return 0.5 * np.sum(np.abs(p - q)), p * (sg - np.sum(p * sg, axis=1, keepdims=True))
    raise ValueError(f"unknown divergence {divergence!r}")


def _hard(s, labels):
    """``(sum_i CE_i, d/ds)`` of the hard cross-entropy, ``None`` without labels."""
    if labels is None:
        return None
    n_rows = s.shape[0]
    y = np.asarray(labels)
    if y.ndim == 1:  # class indices -> one-hot
        one_hot = np.zeros_like(s)
        one_hot[np.arange(n_rows), y] = 1
        y = one_hot
    y = y.astype(s.dtype, copy=False)
    log_p_s = log_softmax(s)
    return -np.sum(y * log_p_s), np.exp(log_p_s) * y.sum(axis=1, keepdims=True) - y


def kd_loss(student_logits, teacher_logits, labels=None, *, temperature=3.0, alpha=0.3,
            divergence="kl", jsd_beta=0.5, standardize=False):
    """``(loss, grad)`` of KD (any divergence, optional logit standardisation),
    written directly from the formulas."""
    s = np.asarray(student_logits)
    t = np.asarray(teacher_logits).astype(s.dtype, copy=False)
    n_rows = s.shape[0]
    T = s.dtype.type(temperature)
    if standardize:
        s_soft, sigma = _standardize(s)
        t_soft, _ = _standardize(t)
    else:
        s_soft, t_soft = s, t
    div_sum, div_grad = _soft_divergence(s_soft, t_soft, T, divergence, jsd_beta)
    soft = T * T * div_sum / n_rows
    soft_grad = T * div_grad / n_rows
    if standardize:
        soft_grad = _standardize_backward(soft_grad, s_soft, sigma)
    hard = _hard(s, labels)
    if hard is None:
        return float(soft), soft_grad
    loss = alpha * hard[0] / n_rows + (1 - alpha) * soft
    grad = alpha * hard[1] / n_rows + (1 - alpha) * soft_grad
    return float(loss), grad.astype(s.dtype, copy=False)


def sparse_kd_loss(student_logits, teacher_topk_logits, teacher_topk_indices, labels=None, *,
                   temperature=1.0, alpha=0.0):
    """``(loss, grad)`` of KD against a top-K teacher: ``q`` is the softmax of the
    K logits scattered into a dense row (zero elsewhere)."""
    s = np.asarray(student_logits)
    v = np.asarray(teacher_topk_logits).astype(s.dtype, copy=False)
    idx = np.asarray(teacher_topk_indices)
    n_rows = s.shape[0]
    T = s.dtype.type(temperature)
    log_q_k = log_softmax(v / T)
    q = np.zeros_like(s)
    np.put_along_axis(q, idx, np.exp(log_q_k), axis=1)
    log_p = log_softmax(s / T)
    soft = T * T * np.sum(np.exp(log_q_k) * (log_q_k - np.take_along_axis(log_p, idx, 1)))
    soft /= n_rows
    soft_grad = T * (np.exp(log_p) - q) / n_rows
    hard = _hard(s, labels)
    if hard is None:
        return float(soft), soft_grad
    loss = alpha * hard[0] / n_rows + (1 - alpha) * soft
    grad = alpha * hard[1] / n_rows + (1 - alpha) * soft_grad
    return float(loss), grad.astype(s.dtype, copy=False)


def kd_loss_torch(student_logits, teacher_logits, labels=None, *, temperature=3.0, alpha=0.3,
                  divergence="kl", jsd_beta=0.5, standardize=False):
    """The same loss as a PyTorch expression (tensors in, 0-d tensor out), the way
    PyTorch users write it::

        T^2 D(softmax(t/T), softmax(s/T)) (batchmean), times (1 - alpha),
        plus alpha * F.cross_entropy(s, y)       (labels given)

    ``D``: ``F.kl_div`` for ``"kl"`` / ``"reverse_kl"``; ``"jsd"`` as TRL's
    ``GKDTrainer.generalized_jsd_loss`` (mixture log-probabilities by
    ``torch.logsumexp`` of a stack, two ``F.kl_div``); ``"tvd"`` as
    Liger-Kernel's PyTorch reference (``0.5 * abs(p - q)`` summed per row).
    ``standardize`` as sunshangquan's ``normalize`` (``(z - mean) / (1e-7 +
    std)``). ``labels``: ``None``, int64 class indices or float target rows.
    Imports torch only when called (benchmarks and bridge tests).
    """
    import torch
    import torch.nn.functional as F

    s, t = student_logits, teacher_logits
    T = temperature
    s_soft, t_soft = s, t
    if standardize:
        s_soft = (s - s.mean(dim=-1, keepdim=True)) / (1e-7 + s.std(dim=-1, keepdim=True))
        t_soft = (t - t.mean(dim=-1, keepdim=True)) / (1e-7 + t.std(dim=-1, keepdim=True))
    log_p = F.log_softmax(s_soft / T, dim=-1)
    log_q = F.log_softmax(t_soft / T, dim=-1)
    if divergence == "kl":
        div = F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
    elif divergence == "reverse_kl":
        div = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    elif divergence == "jsd":
        beta = torch.tensor(jsd_beta, dtype=log_p.dtype)
        log_m = torch.logsumexp(torch.stack([log_p + torch.log1p(-beta),
                                             log_q + torch.log(beta)]), dim=0)
        kl_teacher = F.kl_div(log_m, log_q, reduction="none", log_target=True)
        kl_student = F.kl_div(log_m, log_p, reduction="none", log_target=True)
        div = (beta * kl_teacher + (1 - beta) * kl_student).sum() / s.shape[0]
    elif divergence == "tvd":
        div = (0.5 * (log_p.exp() - log_q.exp()).abs()).sum() / s.shape[0]
    else:
        raise ValueError(f"unknown divergence {divergence!r}")
    soft = div * (T * T)
    if labels is None:
        return soft
    return alpha * F.cross_entropy(s, labels) + (1.0 - alpha) * soft


def sparse_kd_loss_torch(student_logits, teacher_topk_logits, teacher_topk_indices, labels=None,
                         *, temperature=1.0, alpha=0.0):
    """KD against a top-K teacher as PyTorch users write it: the student's
    log-softmax gathered at the teacher's indices (``torch.gather``), against
    the teacher's softmax over its K logits."""
    import torch
    import torch.nn.functional as F

    s = student_logits
    T = temperature
    log_q = F.log_softmax(teacher_topk_logits / T, dim=-1)
    log_p = torch.gather(F.log_softmax(s / T, dim=-1), -1, teacher_topk_indices)
    soft = (log_q.exp() * (log_q - log_p)).sum() / s.shape[0] * (T * T)
    if labels is None:
        return soft
    return alpha * F.cross_entropy(s, labels) + (1.0 - alpha) * soft
