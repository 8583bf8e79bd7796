"""NumPy references for the Gram-matrix losses (``sp_loss``, ``pkt_loss``), and
the peers' formulas as PyTorch expressions.

The NumPy functions follow RepDistiller's forward passes literally (full
``B x B`` matrices, ``F.normalize``'s clamp, PKT's ``norm + eps``) and
back-propagate by hand, one NumPy step per forward line (PKT's input
normalisation through its explicit ``B x D x D`` Jacobian). They share no code
with the kernels (no row tiles, no fused passes).
"""

from __future__ import annotations

import numpy as np

from kdnumba._constants import NORM_EPS as EPS

#: PKT's default epsilon (RepDistiller ``cosine_similarity_loss``).
PKT_EPS = 1e-7


def _flat(x, dtype=None):
    x = np.asarray(x)
    if dtype is not None:
        x = x.astype(dtype, copy=False)
    return x.reshape(len(x), -1)


def sp_loss(student_feats, teacher_feats):
    """``(loss, grad)`` of RepDistiller's ``Similarity.similarity_loss`` (one pair)."""
    s_in = np.asarray(student_feats)
    dtype = s_in.dtype
    f_s = _flat(s_in)
    f_t = _flat(teacher_feats, dtype)
    b = len(f_s)
    g_s = f_s @ f_s.T
    g_t = f_t @ f_t.T
    norm_s = np.linalg.norm(g_s, axis=1)
    norm_t = np.linalg.norm(g_t, axis=1)
    n_s = g_s / np.maximum(norm_s, EPS)[:, None]
    n_t = g_t / np.maximum(norm_t, EPS)[:, None]
    diff = n_s - n_t
    loss = float((diff * diff).sum() / (b * b))
    d_n = 2.0 * diff / (b * b)
    # Row normalisation x / max(||x||, EPS): vector-Jacobian product per row,
    # (v - x_hat (x_hat . v)) / ||x|| unclamped, v / EPS where the clamp holds.
    clamped = norm_s < EPS
    r = np.where(clamped, EPS, norm_s)[:, None]
    radial = np.where(clamped[:, None], 0.0, n_s * (n_s * d_n).sum(axis=1, keepdims=True))
    d_g = (d_n - radial) / r
    grad = (d_g + d_g.T) @ f_s
    return loss, grad.reshape(s_in.shape).astype(dtype)


def pkt_loss(student_emb, teacher_emb, *, eps=PKT_EPS):
    """``(loss, grad)`` of RepDistiller's ``PKT.cosine_similarity_loss``."""
    s_in = np.asarray(student_emb)
    dtype = s_in.dtype
    x_s = _flat(s_in)
    x_t = _flat(teacher_emb, dtype)
    b = len(x_s)
    norm_s = np.linalg.norm(x_s, axis=1)
    xh_s = x_s / (norm_s + eps)[:, None]
    xh_t = x_t / (np.linalg.norm(x_t, axis=1) + eps)[:, None]
    k_s = (xh_s @ xh_s.T + 1.0) / 2.0
    k_t = (xh_t @ xh_t.T + 1.0) / 2.0
    sum_s = k_s.sum(axis=1)
    p_s = k_s / sum_s[:, None]
    p_t = k_t / k_t.sum(axis=1)[:, None]
    loss = float(np.mean(p_t * np.log((p_t + eps) / (p_s + eps))))
    # Backward, one step per forward line.
    d_ps = -p_t / (p_s + eps) / (b * b)
    # p_s = k_s / sum_s: Jacobian of a row divided by its sum.
    d_ks = d_ps / sum_s[:, None] - (d_ps * k_s).sum(axis=1, keepdims=True) / sum_s[:, None] ** 2
    d_c = d_ks / 2.0
    d_xh = (d_c + d_c.T) @ xh_s
    # xh = x / (||x|| + eps): Jacobian I/(n+eps) - x x^T / (n (n+eps)^2).
    dim = x_s.shape[1]
    jac = (np.eye(dim)[None] / (norm_s + eps)[:, None, None]
           - np.einsum("ij,ik->ijk", x_s, x_s)
           / (np.where(norm_s > 0, norm_s, 1.0) * (norm_s + eps) ** 2)[:, None, None])
    grad = np.einsum("ij,ijk->ik", d_xh, jac)
    return loss, grad.reshape(s_in.shape).astype(dtype)


def sp_loss_torch(student_feats, teacher_feats):
    """RepDistiller's ``Similarity.similarity_loss`` on tensors (one pair): the
    loss tensor. Imports torch only when called."""
    import torch
    import torch.nn.functional as F

    bsz = student_feats.shape[0]
    f_s = student_feats.reshape(bsz, -1)
    f_t = teacher_feats.reshape(bsz, -1).to(f_s.dtype)
    g_s = F.normalize(torch.mm(f_s, f_s.t()))
    g_t = F.normalize(torch.mm(f_t, f_t.t()))
    g_diff = g_t - g_s
    return (g_diff * g_diff).view(-1, 1).sum(0)[0] / (bsz * bsz)


def pkt_loss_torch(student_emb, teacher_emb, *, eps=PKT_EPS):
    """RepDistiller's ``PKT.cosine_similarity_loss`` on tensors (rows flattened):
    the loss tensor. Imports torch only when called."""
    import torch

    output_net = student_emb.reshape(student_emb.shape[0], -1)
    target_net = teacher_emb.reshape(teacher_emb.shape[0], -1).to(output_net.dtype)
    output_net_norm = torch.sqrt(torch.sum(output_net ** 2, dim=1, keepdim=True))
    output_net = output_net / (output_net_norm + eps)
    output_net = torch.where(output_net != output_net, torch.zeros_like(output_net), output_net)
    target_net_norm = torch.sqrt(torch.sum(target_net ** 2, dim=1, keepdim=True))
    target_net = target_net / (target_net_norm + eps)
    target_net = torch.where(target_net != target_net, torch.zeros_like(target_net), target_net)
    model_similarity = torch.mm(output_net, output_net.transpose(0, 1))
    target_similarity = torch.mm(target_net, target_net.transpose(0, 1))
    model_similarity = (model_similarity + 1.0) / 2.0
    target_similarity = (target_similarity + 1.0) / 2.0
    model_similarity = model_similarity / torch.sum(model_similarity, dim=1, keepdim=True)
    target_similarity = target_similarity / torch.sum(target_similarity, dim=1, keepdim=True)
    return torch.mean(target_similarity
                      * torch.log((target_similarity + eps) / (model_similarity + eps)))
