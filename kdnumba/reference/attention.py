"""NumPy references for attention transfer and attention-map losses.

Written from the formulas (RepDistiller ``AT.py``, Zagoruyko & Komodakis eq. 2,
TinyBERT/MiniLM attention losses); the gradients are derived by hand in the
most literal way (explicit Jacobians of the normalisation), sharing no code
with the kernels.
"""

from __future__ import annotations

import numpy as np

from kdnumba._constants import NORM_EPS as EPS
from kdnumba.reference.feature import feature_loss
from kdnumba.reference.response import log_softmax


def _pool_to(x, spatial):
    """Block-mean ``x`` (B, C, *sp) down to ``spatial`` (sizes divide)."""
    shape = list(x.shape[:2])
    for n, m in zip(x.shape[2:], spatial):
        shape += [m, n // m]
    axes = tuple(range(3, 3 + 2 * len(spatial), 2))
    return x.reshape(shape).mean(axis=axes)


def _attention_map(f, p, paper):
    """``q = mean_c f^p`` (or ``sum_c |f|^p``), flattened: (B, S)."""
    b, c = f.shape[:2]
    q = (np.abs(f) ** p).sum(axis=1) if paper else (f ** p).mean(axis=1)
    return q.reshape(b, -1)


def attention_transfer(student_feats, teacher_feats, *, p=2, variant="repdistiller", pool=False):
    """``(loss, grad)`` of attention transfer; see ``kdnumba.functional.attention_transfer``."""
    s = np.asarray(student_feats)
    t = np.asarray(teacher_feats).astype(s.dtype, copy=False)
    paper = variant == "paper"
    s_sp, t_sp = s.shape[2:], t.shape[2:]
    target = tuple(min(a, b) for a, b in zip(s_sp, t_sp))
    s_in = _pool_to(s, target) if pool and s_sp != target else s
    t_in = _pool_to(t, target) if pool and t_sp != target else t
    n_rows = s.shape[0]

    q_s = _attention_map(s_in, p, paper)
    q_t = _attention_map(t_in, p, paper)
    n_s = np.linalg.norm(q_s, axis=1, keepdims=True)
    n_t = np.linalg.norm(q_t, axis=1, keepdims=True)
    a_s = q_s / np.maximum(n_s, EPS)
    a_t = q_t / np.maximum(n_t, EPS)
    d = a_s - a_t
    n_sp = d.shape[1]
    if paper:
        nd = np.linalg.norm(d, axis=1, keepdims=True)
        loss = nd.sum() / n_rows
        g_a = np.where(nd > 0, d / np.where(nd > 0, nd, 1) / n_rows, 0)
    else:
        loss = (d ** 2).mean()
        g_a = 2 * d / d.size

    g_q = np.empty_like(g_a)
    for b in range(n_rows):
        if n_s[b, 0] >= EPS:  # Jacobian of q / ||q||: (I - a a^T) / ||q||
            jac = (np.eye(n_sp) - np.outer(a_s[b], a_s[b])) / n_s[b, 0]
        else:  # the clamp is active: q / eps
            jac = np.eye(n_sp) / EPS
        g_q[b] = jac @ g_a[b]
    g_q = g_q.reshape((n_rows, 1) + s_in.shape[2:])
    if paper:
        g_f = g_q * p * np.abs(s_in) ** (p - 1) * np.sign(s_in)
    else:
        g_f = g_q * p * s_in ** (p - 1) / s_in.shape[1]
    if s_in.shape != s.shape:  # adjoint of the block mean: spread evenly
        for axis, (n, m) in enumerate(zip(s.shape[2:], s_in.shape[2:])):
            g_f = np.repeat(g_f, n // m, axis=axis + 2) / (n // m)
    return float(loss), g_f.astype(s.dtype, copy=False)


def attention_map_loss(student_attn, teacher_attn, *, kind="mse", inputs="probs"):
    """``(loss, grad)`` of attention-map matching; see ``kdnumba.functional.attention_map_loss``."""
    s = np.asarray(student_attn)
    t = np.asarray(teacher_attn).astype(s.dtype, copy=False)
    if kind == "mse":  # TinyBERT's loss is the FitNets MSE
        return feature_loss(s, t)
    n_rows = s.size // s.shape[-1]
    if inputs == "logits":
        log_p_s, log_p_t = log_softmax(s), log_softmax(t)
        loss = np.sum(np.exp(log_p_t) * (log_p_t - log_p_s)) / n_rows
        return float(loss), (np.exp(log_p_s) - np.exp(log_p_t)) / s.dtype.type(n_rows)
    s_hat = np.maximum(s, EPS)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(t > 0, t * (np.log(np.where(t > 0, t, 1)) - np.log(s_hat)), 0)
        grad = np.where(s >= EPS, -t / np.where(s >= EPS, s, 1) / n_rows, 0)
    return float(terms.sum() / n_rows), grad.astype(s.dtype, copy=False)


# --- PyTorch expressions (torch imported only when called) ----------------------------

def _torch_pool_to(x, spatial):
    """Block-mean ``x`` (B, C, *sp) down to ``spatial`` (sizes divide): what
    ``F.adaptive_avg_pool2d`` does for such sizes (RepDistiller ``AT.py``)."""
    shape = list(x.shape[:2])
    for n, m in zip(x.shape[2:], spatial):
        shape += [m, n // m]
    return x.reshape(shape).mean(dim=tuple(range(3, 3 + 2 * len(spatial), 2)))


def attention_transfer_torch(student_feats, teacher_feats, *, p=2, variant="repdistiller",
                             pool=False):
    """RepDistiller's ``Attention.at_loss`` on tensors::

        at = lambda f: F.normalize(f.pow(p).mean(1).view(f.size(0), -1))
        (at(s) - at(t)).pow(2).mean()

    or the paper's variant (``|f|^p`` summed over channels, the batch mean of
    ``||a(s) - a(t)||_2``); ``pool`` block-averages the larger map first."""
    import torch.nn.functional as F

    s, t = student_feats, teacher_feats.to(student_feats.dtype)
    if pool:
        target = tuple(min(a, b) for a, b in zip(s.shape[2:], t.shape[2:]))
        s = _torch_pool_to(s, target) if tuple(s.shape[2:]) != target else s
        t = _torch_pool_to(t, target) if tuple(t.shape[2:]) != target else t

    def at(f):
        q = f.abs().pow(p).sum(1) if variant == "paper" else f.pow(p).mean(1)
        return F.normalize(q.reshape(f.size(0), -1))

    d = at(s) - at(t)
    if variant == "paper":
        return d.norm(dim=1).mean()
    return d.pow(2).mean()


def attention_map_loss_torch(student_attn, teacher_attn, *, kind="mse", inputs="probs"):
    """The attention-map losses on tensors: ``F.mse_loss`` (TinyBERT), or
    ``F.kl_div`` summed over the last axis and averaged over the rows, on
    ``log_softmax`` of scores or on probabilities clamped at 1e-12."""
    import math

    import torch.nn.functional as F

    s, t = student_attn, teacher_attn.to(student_attn.dtype)
    if kind == "mse":
        return F.mse_loss(s, t)
    n_rows = math.prod(s.shape[:-1])
    if inputs == "logits":
        return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
                        reduction="sum") / n_rows
    return F.kl_div(s.clamp_min(EPS).log(), t, reduction="sum") / n_rows
