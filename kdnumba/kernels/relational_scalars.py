"""The control flow of relational KD between its kernel phases.

Shared by the CPU and CUDA launch functions
(``kernels.cpu.relational.loss_and_gradient`` and its CUDA twin): each
passes its own phases, and :func:`run_phases` turns their totals into the
loss and the gradient's weights with the same float operations in the same
order on both devices, so they cannot drift apart. Python floats in and out.
"""

from __future__ import annotations

import math


def run_phases(n, w_d, w_a, geometry, distance, angle, gradient):
    """``(distance_total, loss)`` of relational KD from a device's phases.

    Args:
        n: the batch size ``B``; w_d, w_a: the distance and angle weights.
        geometry: ``() -> (total_s, total_t)``, each embedding's sum of
            off-diagonal distances ``sum_{i != j} d_ij`` (NaN/inf when an
            input holds NaN/inf).
        distance: ``(1/mu_s, 1/mu_t) -> (loss_total, hd_total)``, the distance
            term's row totals (called when ``B > 1`` and ``w_d != 0``).
        angle: ``() -> loss_total``, the angle term's total (called when
            ``B > 1`` and ``w_a != 0``).
        gradient: ``(w_a / B^3, 1/mu_s, 1/mu_t, k_mean, w_d / B^2) -> None``,
            writes the gradient (``w_a / B^3`` is 0 when the angle term was
            skipped: its factor is then not read).

    With ``mu = sum_{i != j} d_ij / (B (B - 1))`` (1.0 for ``B = 1``: no pairs),
    ``L_d = loss_total / B^2``, ``k_mean = hd_total / (mu_s^2 B (B - 1))`` and
    ``L_a = loss_total / B^3``, the loss is ``w_d L_d + w_a L_a``. When
    ``distance_total`` is not finite nothing else runs and the loss is NaN.
    """
    total_s, total_t = geometry()
    distance_total = total_s + total_t
    if not math.isfinite(distance_total):
        return distance_total, math.nan
    if n > 1:
        pairs = n * (n - 1)
        mu_s, mu_t = total_s / pairs, total_t / pairs
    else:
        mu_s = mu_t = 1.0
    inv_mu_s, inv_mu_t = 1.0 / mu_s, 1.0 / mu_t
    loss_d = k_mean = 0.0
    if n > 1 and w_d != 0.0:
        loss_total, hd_total = distance(inv_mu_s, inv_mu_t)
        loss_d = loss_total / (n * n)
        k_mean = hd_total / (mu_s * mu_s * n * (n - 1))
    loss_a = w_a_mean = 0.0
    if n > 1 and w_a != 0.0:
        cube = float(n) ** 3
        loss_a, w_a_mean = angle() / cube, w_a / cube
    gradient(w_a_mean, inv_mu_s, inv_mu_t, k_mean, w_d / (n * n))
    return distance_total, w_d * loss_d + w_a * loss_a
