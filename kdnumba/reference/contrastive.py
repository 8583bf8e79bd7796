"""NumPy references for the contrastive losses (``kdnumba.functional.nt_xent`` & co).

Dense and obvious: they build the full ``B x (B + K)`` similarity matrix (the
triplet loss one row of distances at a time), straight from the formulas in
``docs/contrastive.md``. Gradients are written out by hand (the same
formulas a reader checks against the docs); tests check them by finite
differences too. They compute in the dtype of the student.
"""

from __future__ import annotations

import numpy as np

from kdnumba.reference.response import log_softmax

EPS = 1e-12


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


def nt_xent(student_emb, teacher_emb, *, temperature=0.07, negatives=None):
    """Dense NT-Xent: ``mean_i[-cos(s_i,t_i)/tau + log sum_c exp(cos(s_i,c)/tau)]``."""
    n = np.asarray(student_emb).shape[0]
    return _student_anchored(student_emb, teacher_emb, np.eye(n), negatives, temperature)


def supervised_contrastive(student_emb, teacher_emb, labels, *, temperature=0.07,
                           negatives=None):
    """Dense supervised contrastive loss; positives ``P(i) = {j: y_j = y_i}``."""
    y = _hard_labels(labels)
    same = (y[:, None] == y[None, :]).astype(np.float64)
    positives = same / same.sum(axis=1, keepdims=True)
    return _student_anchored(student_emb, teacher_emb, positives, negatives, temperature)


def info_nce(student_emb, teacher_emb, *, temperature=0.07, negatives=None):
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
