"""Relational KD as a pure function: :func:`rkd_loss`."""

from __future__ import annotations

import numpy as np

from kdnumba import _dispatch, _policy
from kdnumba import _validation as v
from kdnumba.kernels.cpu.reductions import ordered_sum

#: RepDistiller's ``pdist`` clamp of squared distances and ``F.normalize``'s clamp of norms.
EPS = 1e-12


def rkd_loss(student_emb, teacher_emb, *, distance_weight=25.0, angle_weight=50.0,
             device="auto"):
    r"""Relational KD (Park et al. 2019), RepDistiller ``RKDLoss``, with its exact gradient.

    Rows are flattened to ``(B, D)`` (``D_s`` and ``D_t`` may differ: only
    relations between rows are compared). ``sl1`` is ``F.smooth_l1_loss``
    (``beta = 1``: ``x^2/2`` if ``|x| < 1`` else ``|x| - 1/2``)::

        d_ij  = sqrt(max(||e_i - e_j||^2, 1e-12)) (i != j),  d_ii = 0
        mu    = mean_{i != j} d_ij                   (RepDistiller: mean of d > 0)
        L_d   = 1/B^2   sum_{i,j}   sl1(d^s_ij / mu_s - d^t_ij / mu_t)
        u_ab  = (e_b - e_a) / ||e_b - e_a||   (0 when ||e_b - e_a|| <= 1e-12)
        L_a   = 1/B^3   sum_{a,b,c} sl1(u^s_ab . u^s_ac - u^t_ab . u^t_ac)
        loss  = distance_weight * L_d + angle_weight * L_a

    The teacher side is a constant (``torch.no_grad`` in RepDistiller). The
    gradient is the exact derivative of this loss, row by row (derivation in
    ``docs/relational.md``). Cost: O(B^2 D + B^3) work, O(B^2 + B D) memory
    (the reference materialises B x B x D differences and B^3 angles).

    Degenerate cases, all finite:

    * Coincident rows ``e_i = e_j``: ``d_ij`` is clamped to ``1e-6`` and its
      gradient is 0 (as with ``clamp``'s gradient in PyTorch); their unit
      difference is 0 with gradient 0. Here we deliberately differ from
      ``F.normalize``, whose ``x / max(||x||, 1e-12)`` has slope ``1e12``
      at ``x = 0``: only the derivative inside that ``1e-12`` ball differs
      (the value ``u = 0`` at coincidence is the same).
    * ``B = 1``: no pairs; RepDistiller's mean of an empty set is NaN, here
      the loss is 0 with a zero gradient.

    Computed in float64 for both input dtypes, from squared distances of
    the rows (``Q_ij``, summed from differences) and the polarisation
    identity ``(e_b - e_a).(e_c - e_a) = (Q_ab + Q_ac - Q_bc) / 2``; the
    gradient is returned in the student's dtype.

    Args:
        student_emb: ``(B, ...)`` float array, flattened to ``(B, D_s)``.
        teacher_emb: ``(B, ...)`` float array; cast to the student's dtype.
        distance_weight: ``>= 0``, RepDistiller's ``w_d`` (25).
        angle_weight: ``>= 0``, RepDistiller's ``w_a`` (50). 0 skips the
            O(B^3) angle computation.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.

    Returns:
        ``(loss, grad)``, ``grad`` of the student's shape and dtype.

    Raises:
        TypeError: non-float input, non-real weights.
        ValueError: batch mismatch, empty input, NaN/inf, negative weights.
    """
    w_d = v.check_non_negative(distance_weight, "distance_weight")
    w_a = v.check_non_negative(angle_weight, "angle_weight")
    target = _dispatch.resolve_device(device, student_emb, teacher_emb)
    if target == "cuda":
        from kdnumba import _cuda_paths  # imports numba.cuda: CUDA path only
        return _cuda_paths.rkd_loss(student_emb, teacher_emb, distance_weight=w_d,
                                    angle_weight=w_a)
    s_in = v.as_float_array(student_emb, "student_emb")
    t_in = v.as_float_array(teacher_emb, "teacher_emb", dtype=s_in.dtype)
    v.check_same_batch(s_in, t_in, "student_emb", "teacher_emb")
    s = s_in.reshape(s_in.shape[0], -1)
    t = t_in.reshape(t_in.shape[0], -1)
    # Checked up front: the clamps (max with eps) would hide a NaN.
    bad = v.first_non_finite([("student_emb", s), ("teacher_emb", t)])
    if bad is not None:
        raise ValueError(f"{bad} contains NaN or inf values")

    kernels = _dispatch.kernels("relational", target)
    n = s.shape[0]
    with _policy.kernel_launch():
        q_s, ins, mu_s = _geometry(kernels, s)
        q_t, int_, mu_t = _geometry(kernels, t)

        loss_d = 0.0
        k_mean = 0.0
        if n > 1 and w_d != 0.0:
            row_loss = np.empty(n)
            row_hd = np.empty(n)
            kernels.distance_rows(q_s, q_t, EPS, 1.0 / mu_s, 1.0 / mu_t, row_loss, row_hd)
            loss_d = ordered_sum(row_loss) / (n * n)
            k_mean = ordered_sum(row_hd) / (mu_s * mu_s * n * (n - 1))

        loss_a = 0.0
        r = np.zeros((n, n))
        if n > 1 and w_a != 0.0:
            row_loss = np.empty(n)
            kernels.angle_rows(q_s, ins, q_t, int_, r, row_loss)
            loss_a = ordered_sum(row_loss) / float(n) ** 3
        m = ins  # dead after the angle term: reuse its memory
        del ins, int_
        kernels.assemble(r, w_a / float(n) ** 3, q_s, q_t, EPS, 1.0 / mu_s, 1.0 / mu_t,
                         k_mean, w_d / (n * n), m)
        del r, q_s, q_t
        # m has zero row sums, so m @ e = m @ (e - mean): the centred rows keep
        # a large common offset out of the product.
        ec = np.empty(s.shape, dtype=np.float64)
        kernels.center(s, ec)
        grad = np.empty(s.shape, dtype=s.dtype)
        kernels.matmul_rows(m, ec, grad)
    loss = w_d * loss_d + w_a * loss_a
    if not np.isfinite(loss):  # finite inputs, but squared distances beyond 1e308
        v.raise_non_finite([("student_emb", s), ("teacher_emb", t)])
    return float(loss), grad.reshape(s_in.shape)


def _geometry(kernels, e):
    """Squared distances ``Q``, ``iota`` and the mean off-diagonal distance of rows ``e``."""
    n = e.shape[0]
    q = np.empty((n, n))
    inv_norm = np.empty((n, n))
    dist_row_sum = np.empty(n)
    kernels.geometry(e, EPS, q, inv_norm, dist_row_sum)
    mu = ordered_sum(dist_row_sum) / (n * (n - 1)) if n > 1 else 1.0
    return q, inv_norm, mu
