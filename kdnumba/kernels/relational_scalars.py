"""The scalar steps of relational KD between its kernel phases.

Shared by the CPU and CUDA launch functions
(``kernels.cpu.relational.loss_and_gradient`` and its CUDA twin), so that both
devices turn the phases' totals into the loss and the gradient's weights with
the same float operations in the same order. Python floats in and out.
"""

from __future__ import annotations


def mean_distances(total_s: float, total_t: float, n: int) -> tuple[float, float]:
    """``(mu_s, mu_t)``: each embedding's mean off-diagonal distance,
    ``sum_{i != j} d_ij / (B (B - 1))``; ``(1.0, 1.0)`` for ``B = 1`` (no
    pairs, and the terms that would divide by it are skipped)."""
    if n > 1:
        pairs = n * (n - 1)
        return total_s / pairs, total_t / pairs
    return 1.0, 1.0


def distance_means(loss_total: float, hd_total: float, mu_s: float,
                   n: int) -> tuple[float, float]:
    """``(L_d, k_mean)`` from the distance phase's row totals:
    ``L_d = loss_total / B^2`` and ``k_mean = hd_total / (mu_s^2 B (B - 1))``
    (the gradient of ``L_d`` through ``mu_s``, see ``docs/relational.md``)."""
    return loss_total / (n * n), hd_total / (mu_s * mu_s * n * (n - 1))


def angle_means(loss_total: float, w_a: float, n: int) -> tuple[float, float]:
    """``(L_a, w_a / B^3)``: the angle term (a mean over ``B^3`` triples) and
    the weight its gradient factor carries."""
    cube = float(n) ** 3
    return loss_total / cube, w_a / cube
