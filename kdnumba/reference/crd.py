"""CRD references: the NumPy formula (``crd_loss``) and RepDistiller's computation
restated in PyTorch (``crd_loss_torch``, ``crd_update_torch``).

Written from reading RepDistiller's ``crd/criterion.py`` and ``crd/memory.py``
(``ContrastMemory.forward`` with a given ``contrast_idx``, ``ContrastLoss``,
``Embed``'s ``Normalize``); no code is shared with kdnumba's kernels or with
RepDistiller. The constants ``Z`` come from ``memory`` when it has them, else
from this batch (RepDistiller's first call), without storing them.
"""

from __future__ import annotations

import numpy as np

#: RepDistiller's ``eps`` of ``ContrastLoss``.
EPS = 1e-7


def _constants(memory, scores_s, scores_t):
    if memory.z_student is not None:
        return memory.z_student, memory.z_teacher
    n_data = memory.n_data
    return (float(np.mean(scores_s)) * n_data, float(np.mean(scores_t)) * n_data)


def crd_loss(student_emb, teacher_emb, indices, contrast_indices, memory, *, device="auto"):
    """``(loss, grad_student, grad_teacher)`` by the textbook formulas, in float64
    (one anchor at a time: ``(K + 1) x D`` rows gathered per anchor)."""
    xs = np.asarray(student_emb, np.float64)
    xt = np.asarray(teacher_emb, np.float64)
    idx = np.asarray(contrast_indices)
    bank_s = np.asarray(memory.memory_student)  # RepDistiller's memory_v1
    bank_t = np.asarray(memory.memory_teacher)  # memory_v2
    T = memory.temperature
    n, n_cols = idx.shape
    m = n_cols - 1
    pn = 1.0 / memory.n_data
    ns = np.sqrt((xs ** 2).sum(1, keepdims=True))
    nt = np.sqrt((xt ** 2).sum(1, keepdims=True))
    vs, vt = xs / ns, xt / nt
    # exp scores, one anchor at a time: (B, K+1)
    es = np.empty((n, n_cols))
    et = np.empty((n, n_cols))
    for b in range(n):
        es[b] = np.exp(bank_t[idx[b]].astype(np.float64) @ vs[b] / T)  # out_v1: student anchor
        et[b] = np.exp(bank_s[idx[b]].astype(np.float64) @ vt[b] / T)  # out_v2: teacher anchor
    zs, zt = _constants(memory, es, et)
    c = m * pn + EPS

    def side(p):
        loss = -(np.log(p[:, 0] / (p[:, 0] + c)).sum()
                 + np.log(m * pn / (p[:, 1:] + c)).sum()) / n
        # d loss / d p, then d p / d (dot) = p / T
        dp = np.empty_like(p)
        dp[:, 0] = -(1.0 / p[:, 0] - 1.0 / (p[:, 0] + c)) / n
        dp[:, 1:] = 1.0 / (p[:, 1:] + c) / n
        return loss, dp * p / T

    loss_s, w_s = side(es / zs)
    loss_t, w_t = side(et / zt)
    gv_s = np.stack([w_s[b] @ bank_t[idx[b]].astype(np.float64) for b in range(n)])
    gv_t = np.stack([w_t[b] @ bank_s[idx[b]].astype(np.float64) for b in range(n)])

    def through_normalize(gv, vx, nx):
        return (gv - vx * (vx * gv).sum(1, keepdims=True)) / nx

    return (float(loss_s + loss_t), through_normalize(gv_s, vs, ns),
            through_normalize(gv_t, vt, nt))


def crd_loss_torch(student_emb, teacher_emb, indices, contrast_indices, memory, *,
                   device="auto"):
    """RepDistiller's CRD loss as PyTorch computes it (the gather ``B x (K+1) x D``,
    ``bmm``, ``exp``, division by ``Z``, ``ContrastLoss`` on both sides); a
    0-d tensor differentiable in ``student_emb`` and ``teacher_emb`` (tensors).
    The banks are read from ``memory`` (zero-copy for NumPy banks) in the
    embeddings' dtype."""
    import torch

    def embed_normalize(x):  # Normalize(2): x / (sum x^2)^(1/2)
        x = x.reshape(x.shape[0], -1)
        return x / x.pow(2).sum(1, keepdim=True).pow(0.5)

    v1 = embed_normalize(student_emb)
    v2 = embed_normalize(teacher_emb)
    dtype = v1.dtype
    mem_v1 = torch.as_tensor(np.asarray(memory.memory_student)).to(dtype)
    mem_v2 = torch.as_tensor(np.asarray(memory.memory_teacher)).to(dtype)
    idx = torch.as_tensor(np.asarray(contrast_indices)).long()
    bsz, n_cols = idx.shape
    dim = mem_v1.shape[1]
    T = memory.temperature
    w1 = torch.index_select(mem_v1, 0, idx.reshape(-1)).detach().reshape(bsz, n_cols, dim)
    out_v2 = torch.exp(torch.bmm(w1, v2.reshape(bsz, dim, 1)) / T)
    w2 = torch.index_select(mem_v2, 0, idx.reshape(-1)).detach().reshape(bsz, n_cols, dim)
    out_v1 = torch.exp(torch.bmm(w2, v1.reshape(bsz, dim, 1)) / T)
    if memory.z_student is not None:
        z_v1, z_v2 = memory.z_student, memory.z_teacher
    else:  # first batch: Python floats, no gradient through them
        z_v1 = out_v1.mean().item() * memory.n_data
        z_v2 = out_v2.mean().item() * memory.n_data
    out_v1 = out_v1 / z_v1
    out_v2 = out_v2 / z_v2

    def contrast_loss(x):
        m = x.shape[1] - 1
        pn = 1.0 / float(memory.n_data)
        pos = x[:, 0]
        log_d1 = torch.log(pos / (pos + (m * pn + EPS)))
        neg = x[:, 1:]
        log_d0 = torch.log(torch.full_like(neg, m * pn) / (neg + (m * pn + EPS)))
        return -(log_d1.sum() + log_d0.sum()) / x.shape[0]

    return contrast_loss(out_v1) + contrast_loss(out_v2)


def crd_update_torch(memory_student, memory_teacher, indices, student_emb, teacher_emb,
                     momentum):
    """RepDistiller's memory update on copies of the banks (tensors or arrays):
    returns the new ``(memory_v1, memory_v2)`` tensors."""
    import torch

    def embed_normalize(x):
        x = torch.as_tensor(np.asarray(x))
        return x / x.pow(2).sum(1, keepdim=True).pow(0.5)

    y = torch.as_tensor(np.asarray(indices)).long()
    banks = []
    for bank, emb in ((memory_student, student_emb), (memory_teacher, teacher_emb)):
        bank = torch.as_tensor(np.array(bank))
        v = embed_normalize(emb).to(bank.dtype)
        rows = torch.index_select(bank, 0, y) * momentum + v * (1 - momentum)
        rows = rows / rows.pow(2).sum(1, keepdim=True).pow(0.5)
        bank.index_copy_(0, y, rows)
        banks.append(bank)
    return banks[0], banks[1]
