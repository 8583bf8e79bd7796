"""Logit standardisation (Sun et al., CVPR 2024), forward and backward, per row.

Forward, for every row ``z`` of a ``(B, C)`` array (``C >= 2``)::

    mu    = mean(z)
    x     = z - mu
    sigma = sqrt(sum(x^2) / (C - 1))                 (unbiased, as torch.std)
    y     = x / (sigma + eps)

Backward (vector-Jacobian product: ``g`` is d loss / d y, the result is
d loss / d z)::

    d loss / d z_k = (g_k - mean(g)) / (sigma + eps) - (g . y) y_k / ((C - 1) sigma)

(the mean's contribution to the second term vanishes because ``sum(x) = 0``).
At ``sigma = 0`` (a constant row) the second term is taken as 0: ``y`` is
then 0 and the standard deviation has no derivative there (PyTorch gives NaN).

Mean and ``sigma`` are accumulated in float64 by the fixed-order lane sums of
:mod:`kdnumba.kernels.cpu.reductions`; rows are independent (one ``prange``
iteration each), so the results are the same for any thread count.
"""

from __future__ import annotations

import math

from numba import prange

from kdnumba._policy import callee, parallel_jit
from kdnumba.kernels.cpu.dtypes import cast_like
from kdnumba.kernels.cpu.reductions import lane_dot, lane_sum


@callee
def _center(z_row, mu, y_row):
    for j in range(z_row.shape[0]):
        y_row[j] = z_row[j] - mu


@callee
def _scale(y_row, r):
    for j in range(y_row.shape[0]):
        y_row[j] = y_row[j] * r


@parallel_jit
def standardize_rows(z, eps, y, std):
    """``y[i] = (z[i] - mean) / (std + eps)``, ``std[i] = sigma`` (float64).

    Parameters:
        z: ``(B, C)`` float32/float64, C-contiguous, ``C >= 2``.
        eps: float64 (``1e-7`` for logit standardisation).
        y: ``(B, C)`` output of ``z``'s dtype (may not alias ``z``).
        std: ``(B,)`` float64 output, the unbiased standard deviation of each row.

    A NaN/inf in a row makes its ``std`` non-finite (the caller checks).
    """
    n_rows, n_cols = z.shape
    for i in prange(n_rows):
        z_row = z[i]
        y_row = y[i]
        mu = lane_sum(z_row) / n_cols
        _center(z_row, cast_like(mu, z), y_row)
        sigma = math.sqrt(lane_dot(y_row, y_row) / (n_cols - 1))
        std[i] = sigma
        _scale(y_row, cast_like(1.0 / (sigma + eps), z))


@callee
def _backward_row(g_row, y_row, a, b, c, out_row, accumulate):
    for j in range(g_row.shape[0]):
        v = (a * g_row[j] - c) - b * y_row[j]
        out_row[j] = out_row[j] + v if accumulate else v


@parallel_jit
def standardize_backward_rows(g, y, std, eps, out, accumulate):
    """``out[i] (+)= (g[i] - mean(g[i])) / (std_i + eps) - (g[i].y[i]) y[i] / ((C-1) std_i)``.

    Parameters:
        g: ``(B, C)`` gradient with respect to the standardised rows.
        y: ``(B, C)`` the standardised rows (output of :func:`standardize_rows`).
        std: ``(B,)`` float64 row standard deviations from :func:`standardize_rows`.
        eps: float64, the same as in the forward pass.
        out: ``(B, C)`` output; may be ``g`` itself when ``accumulate`` is False
            (each row's sums are taken before it is written).
        accumulate: add to ``out`` instead of overwriting it (``out`` must
            then not alias ``g``).
    """
    n_rows, n_cols = g.shape
    for i in prange(n_rows):
        g_row = g[i]
        y_row = y[i]
        sigma = std[i]
        inv = 1.0 / (sigma + eps)
        g_mean = lane_sum(g_row) / n_cols
        gy = lane_dot(g_row, y_row)
        coef = gy / ((n_cols - 1) * sigma) if sigma > 0.0 else 0.0
        _backward_row(g_row, y_row, cast_like(inv, g), cast_like(coef, g),
                      cast_like(inv * g_mean, g), out[i], accumulate)
