"""NumPy references for the contrastive losses (``kdnumba.functional.nt_xent`` & co).

Dense and obvious: they build the full ``B x (B + K)`` similarity matrix (the
triplet loss one row of distances at a time), straight from the formulas in
``docs/contrastive.md``. Gradients are written out by hand (the same
formulas a reader checks against the docs); tests check them by finite
differences too. They compute in the dtype of the student.
"""

from __future__ import annotations

import numpy as np

from kdnumba._constants import NORM_EPS as EPS
from kdnumba.reference.response import log_softmax


def _normalize(x: np.ndarray):
    """``(x_hat, norms)`` with ``x_hat = x / max(||x||, EPS)``."""
    norms = np.sqrt((x.astype(np.float64) ** 2).sum(axis=1))
    x_hat = x / np.maximum(norms, EPS)[:, None]
    return x_hat.astype(x.dtype), norms


def _normalize_backward(x: np.ndarray, norms: np.ndarray, g_hat: np.ndarray) -> np.ndarray:
    """``d loss / d x`` from ``d loss / d x_hat`` through ``x / max(||x||, EPS)``."""
    x64 = x.astype(np.float64)
    g64 = g_hat.astype(np.float64)
    out = np.empty_like(g64)
    big = norms > EPS
    x_hat = x64[big] / norms[big, None]
    proj = (x_hat * g64[big]).sum(axis=1, keepdims=True)
    out[big] = (g64[big] - x_hat * proj) / norms[big, None]
    out[~big] = g64[~big] / EPS  # clamped branch: x_hat = x / EPS
    return out


def _with_negatives(c: np.ndarray, negatives) -> np.ndarray:
    if negatives is None or len(negatives) == 0:
        return c
    return np.concatenate([c, np.asarray(negatives).astype(c.dtype)])


def _student_anchored(s, t, positives, negatives, temperature):
    """Shared by NT-Xent and supervised: ``positives`` is ``B x B`` weights
    (row ``i``: ``1/|P(i)|`` on the positives of anchor ``i``)."""
    s = np.asarray(s)
    t = np.asarray(t).astype(s.dtype, copy=False)
    n = s.shape[0]
    s_hat, s_norms = _normalize(s)
    t_hat, _ = _normalize(t)
    cand = _with_negatives(t, negatives)
    c_hat, _ = _normalize(cand)
    tau = temperature
    logits = s_hat.astype(np.float64) @ c_hat.astype(np.float64).T / tau  # B x (B + K), dense
    log_p = log_softmax(logits)
    pos_target = positives @ t_hat.astype(np.float64)                    # B x D
    pos_logit = (s_hat.astype(np.float64) * pos_target).sum(axis=1) / tau
    lse = logits - log_p                                                 # every column = lse_i
    loss = np.mean(lse[:, 0] - pos_logit)
    g_hat = (np.exp(log_p) @ c_hat.astype(np.float64) - pos_target) / (tau * n)
    grad = _normalize_backward(s, s_norms, g_hat)
    return float(loss), grad.astype(s.dtype)


def nt_xent(student_emb, teacher_emb, negatives=None, *, temperature=0.07):
    """Dense NT-Xent: ``mean_i[-cos(s_i,t_i)/tau + log sum_c exp(cos(s_i,c)/tau)]``."""
    n = np.asarray(student_emb).shape[0]
    return _student_anchored(student_emb, teacher_emb, np.eye(n), negatives, temperature)


def supervised_contrastive(student_emb, teacher_emb, labels, negatives=None, *,
                           temperature=0.07):
    """Dense supervised contrastive loss; positives ``P(i) = {j: y_j = y_i}``."""
    y = _hard_labels(labels)
    same = (y[:, None] == y[None, :]).astype(np.float64)
    positives = same / same.sum(axis=1, keepdims=True)
    return _student_anchored(student_emb, teacher_emb, positives, negatives, temperature)


def info_nce(student_emb, teacher_emb, negatives=None, *, temperature=0.07):
    """Dense teacher-anchored InfoNCE:
    ``mean_i[-cos(t_i,s_i)/tau + log sum_c exp(cos(t_i,c)/tau)]``, candidates
    ``c`` = student rows then ``negatives`` (constants)."""
    s = np.asarray(student_emb)
    t = np.asarray(teacher_emb).astype(s.dtype, copy=False)
    n = s.shape[0]
    tau = temperature
    s_hat, s_norms = _normalize(s)
    t_hat, _ = _normalize(t)
    c_hat, _ = _normalize(_with_negatives(s, negatives))
    logits = t_hat.astype(np.float64) @ c_hat.astype(np.float64).T / tau
    log_p = log_softmax(logits)
    pos_logit = (t_hat.astype(np.float64) * s_hat.astype(np.float64)).sum(axis=1) / tau
    loss = np.mean(logits[:, 0] - log_p[:, 0] - pos_logit)
    p = np.exp(log_p)[:, :n]                                             # anchors x student rows
    g_hat = (p.T @ t_hat.astype(np.float64) - t_hat.astype(np.float64)) / (tau * n)
    grad = _normalize_backward(s, s_norms, g_hat)
    return float(loss), grad.astype(s.dtype)


def triplet_loss(student_emb, labels, *, margin=0.1):
    """Batch-hard triplet loss (Euclidean), first index on ties; one anchor
    (one row of the distance matrix) at a time."""
    s = np.asarray(student_emb)
    x = s.astype(np.float64)
    n = x.shape[0]
    y = _hard_labels(labels)
    grad = np.zeros_like(x)
    losses = []
    for i in range(n):
        diff = x[i] - x                                                  # B x D
        dist = np.sqrt(np.maximum((diff ** 2).sum(axis=1), 0.0))
        pos = y == y[i]
        pos[i] = False
        neg = y != y[i]
        if not pos.any() or not neg.any():
            continue
        p = int(np.argmax(np.where(pos, dist, -np.inf)))
        q = int(np.argmin(np.where(neg, dist, np.inf)))
        h = dist[p] - dist[q] + margin
        losses.append(max(h, 0.0))
        if h > 0:
            u_p = diff[p] / dist[p] if dist[p] > 0 else np.zeros_like(x[i])
            u_n = diff[q] / dist[q] if dist[q] > 0 else np.zeros_like(x[i])
            grad[i] += u_p - u_n
            grad[p] -= u_p
            grad[q] += u_n
    if not losses:
        return 0.0, np.zeros_like(s)
    return float(np.mean(losses)), (grad / len(losses)).astype(s.dtype)


def _hard_labels(labels) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim == 2:
        y = y.argmax(axis=1)
    return y.astype(np.int64)


# --- the same losses as PyTorch expressions (benchmarks, bridge tests) ------------------
#
# Tensors in, a 0-d tensor out; the dense formulation a PyTorch user writes
# (``B x (B + K)`` logits, autograd). torch is imported only when called.

def _torch_candidates(first, negatives):
    import torch
    import torch.nn.functional as F

    c = F.normalize(first, dim=1)
    if negatives is None or negatives.shape[0] == 0:
        return c
    return torch.cat([c, F.normalize(negatives.to(first.dtype), dim=1)])


def nt_xent_torch(student_emb, teacher_emb, negatives=None, *, temperature=0.07):
    """``F.cross_entropy(normalize(s) @ cat(normalize(t), normalize(q)).T / tau, arange(B))``."""
    import torch
    import torch.nn.functional as F

    s = F.normalize(student_emb, dim=1)
    logits = s @ _torch_candidates(teacher_emb.to(s.dtype), negatives).T / temperature
    return F.cross_entropy(logits, torch.arange(s.shape[0]))


def info_nce_torch(student_emb, teacher_emb, negatives=None, *, temperature=0.07):
    """``F.cross_entropy(normalize(t) @ cat(normalize(s), normalize(q)).T / tau, arange(B))``."""
    import torch
    import torch.nn.functional as F

    t = F.normalize(teacher_emb.to(student_emb.dtype), dim=1)
    logits = t @ _torch_candidates(student_emb, negatives).T / temperature
    return F.cross_entropy(logits, torch.arange(t.shape[0]))


def supervised_contrastive_torch(student_emb, teacher_emb, labels, negatives=None, *,
                                 temperature=0.07):
    """``-mean_i mean_{j in P(i)} log_softmax(normalize(s) @ C.T / tau)_ij`` (SupCon
    with teacher candidates; queued negatives are never positives)."""
    import torch
    import torch.nn.functional as F

    s = F.normalize(student_emb, dim=1)
    cand = _torch_candidates(teacher_emb.to(s.dtype), negatives)
    y = labels.argmax(dim=1) if labels.ndim == 2 else labels
    same = (y[:, None] == y[None, :]).to(s.dtype)
    extra = cand.shape[0] - s.shape[0]
    if extra:
        same = torch.cat([same, same.new_zeros(s.shape[0], extra)], dim=1)
    log_p = F.log_softmax(s @ cand.T / temperature, dim=1)
    return -((same * log_p).sum(1) / same.sum(1)).mean()


def triplet_loss_torch(student_emb, labels, *, margin=0.1):
    """Batch-hard triplet on ``torch.cdist``: masked max/min, ``relu`` over the
    anchors that have a positive and a negative (0 when there are none)."""
    import torch
    import torch.nn.functional as F

    s = student_emb
    y = labels.argmax(dim=1) if labels.ndim == 2 else labels
    n = s.shape[0]
    same = y[:, None] == y[None, :]
    pos = same & ~torch.eye(n, dtype=torch.bool)
    neg = ~same
    keep = pos.any(1) & neg.any(1)
    dist = torch.cdist(s, s)
    d_p = dist.masked_fill(~pos, float("-inf")).max(1).values
    d_n = dist.masked_fill(~neg, float("inf")).min(1).values
    if not keep.any():
        return (s * 0.0).sum()
    return F.relu(d_p - d_n + margin)[keep].mean()
