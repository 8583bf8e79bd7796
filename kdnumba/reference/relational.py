"""NumPy reference for relational KD (``kdnumba.functional.rkd_loss``).

A literal port of RepDistiller's ``RKDLoss.forward``: ``pdist`` through the
Gram expansion with the ``1e-12`` clamp and a zeroed diagonal, the mean of
positive distances, ``B x B x D`` difference vectors normalised one by one,
``B^3`` angles from a batched product, ``smooth_l1`` with mean reduction.
The gradient is back-propagated by hand through those same tensors (chain
rule through each unit vector), sharing nothing with the Gram-only kernel.
Memory is O(B^3 + B^2 D): small batches only.

One documented difference from ``F.normalize``: a difference vector of norm
``<= 1e-12`` is mapped to 0 with a zero gradient (``F.normalize`` gives
``x / 1e-12``, whose slope is ``1e12``); at exactly coincident rows both give
``u = 0``.
"""

from __future__ import annotations

import numpy as np

from kdnumba._constants import NORM_EPS as EPS


def _smooth_l1(x):
    ax = np.abs(x)
    return np.where(ax < 1, 0.5 * x * x, ax - 0.5)


def _pdist(e):
    """RepDistiller ``pdist(e, squared=False)``; also returns the unclamped mask."""
    sq = (e ** 2).sum(axis=1)
    q = sq[:, None] + sq[None, :] - 2 * e @ e.T
    d = np.sqrt(np.maximum(q, EPS))
    n = len(e)
    d[np.arange(n), np.arange(n)] = 0
    live = q >= EPS
    live[np.arange(n), np.arange(n)] = False
    return d, live


def _unit_differences(e):
    """``u[a, b] = (e_b - e_a) / ||e_b - e_a||`` (0 when the norm is <= eps), and the norms."""
    diff = e[None, :, :] - e[:, None, :]
    norm = np.linalg.norm(diff, axis=2)
    live = norm > EPS
    u = np.where(live[..., None], diff / np.where(live, norm, 1)[..., None], 0)
    return u, norm, live


def rkd_loss(student_emb, teacher_emb, *, distance_weight=25.0, angle_weight=50.0):
    """``(loss, grad)`` of RKD, straight from RepDistiller's formulas."""
    s_in = np.asarray(student_emb)
    dtype = s_in.dtype
    s = s_in.reshape(len(s_in), -1)
    t = np.asarray(teacher_emb).astype(dtype, copy=False).reshape(len(s), -1)
    n = len(s)
    grad = np.zeros_like(s)
    loss = 0.0

    # Distance term.
    if n > 1:
        d_s, live = _pdist(s)
        d_t, _ = _pdist(t)
        off = ~np.eye(n, dtype=bool)
        mu_s = d_s[off].mean()
        mu_t = d_t[off].mean()
        x = d_s / mu_s - d_t / mu_t
        loss += distance_weight * _smooth_l1(x).mean()
        h = np.clip(x, -1, 1) / x.size * distance_weight
        g_d = np.where(off, h / mu_s - (h * d_s).sum() / (mu_s ** 2 * off.sum()), 0)
        coef = np.where(live, g_d / (2 * np.where(live, d_s, 1)), 0)  # dL/dq
        coef = coef + coef.T
        # q_ij = ||e_i||^2 + ||e_j||^2 - 2 e_i.e_j  ->  dq/de_i = 2 e_i - 2 e_j
        grad += 2 * (coef.sum(axis=1)[:, None] * s - coef @ s)

    # Angle term.
    u_s, norm_s, live_s = _unit_differences(s)
    u_t, _, _ = _unit_differences(t)
    ang_s = np.einsum("abd,acd->abc", u_s, u_s)
    ang_t = np.einsum("abd,acd->abc", u_t, u_t)
    x = ang_s - ang_t
    loss += angle_weight * _smooth_l1(x).mean()
    h = np.clip(x, -1, 1) / x.size * angle_weight
    g_u = np.einsum("abc,acd->abd", h, u_s) + np.einsum("acb,acd->abd", h, u_s)
    # Through u = diff / ||diff||: (g - u (u . g)) / ||diff||, 0 where clamped.
    radial = np.einsum("abd,abd->ab", g_u, u_s)
    g_diff = np.where(live_s[..., None],
                      (g_u - u_s * radial[..., None]) / np.where(live_s, norm_s, 1)[..., None], 0)
    # diff[a, b] = e_b - e_a
    grad += g_diff.sum(axis=0) - g_diff.sum(axis=1)
    return float(loss), grad.astype(dtype, copy=False).reshape(s_in.shape)


def rkd_loss_torch(student_emb, teacher_emb, *, distance_weight=25.0, angle_weight=50.0):
    """RepDistiller's ``RKDLoss.forward``, verbatim in formula, on tensors.

    Rows are flattened to ``(B, D)``; the teacher terms are computed without
    gradient, as in RepDistiller (``pdist`` through the Gram expansion,
    ``F.normalize``, ``torch.bmm``, ``F.smooth_l1_loss``). Returns the loss
    tensor. Imports torch only when called (benchmarks and tests).
    """
    import torch
    import torch.nn.functional as F

    def pdist(e, eps=EPS):
        e_square = e.pow(2).sum(dim=1)
        prod = e @ e.t()
        res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps).sqrt()
        res = res.clone()
        res[range(len(e)), range(len(e))] = 0
        return res

    student = student_emb.reshape(student_emb.shape[0], -1)
    teacher = teacher_emb.reshape(teacher_emb.shape[0], -1).to(student.dtype)
    with torch.no_grad():
        t_d = pdist(teacher)
        t_d = t_d / t_d[t_d > 0].mean()
    dist = pdist(student)
    dist = dist / dist[dist > 0].mean()
    loss_d = F.smooth_l1_loss(dist, t_d)
    with torch.no_grad():
        td = teacher.unsqueeze(0) - teacher.unsqueeze(1)
        norm_td = F.normalize(td, p=2, dim=2)
        t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
    sd = student.unsqueeze(0) - student.unsqueeze(1)
    norm_sd = F.normalize(sd, p=2, dim=2)
    s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
    return distance_weight * loss_d + angle_weight * F.smooth_l1_loss(s_angle, t_angle)
