"""Attention kernels: attention transfer on feature maps, KL between attention maps.

The launch functions -- :func:`at_rows`, :func:`kl_prob_rows`, :func:`avg_pool`,
:func:`avg_unpool` -- are those of ``kernels.cuda.attention``, with the same
arguments, writing into the caller's outputs.

Attention transfer (Zagoruyko & Komodakis 2017; RepDistiller ``AT.py``), one
sample ``b`` per ``prange`` iteration, features viewed as ``(C, S)`` with ``S``
the flattened spatial size::

    q_j   = k * sum_c v(f_cj)          v(x) = x^p  (or |x|^p),  k = 1/C (or 1)
    a     = q / max(||q||_2, eps)                      (F.normalize)
    d     = a(student) - a(teacher)
    loss_b = w * sum_j d_j^2     or     w * ||d||_2    ("paper" variant)

Backward, in the same iteration while the sample is hot in cache::

    g_a = d loss_b / d a                 (2 w d,  or  w d / ||d||)
    g_q = (g_a - a (a . g_a)) / ||q||    if ||q|| >= eps,  else g_a / eps
    grad_cj = k * g_q_j * v'(f_cj)

The channel sums run in the features' dtype over blocks of ``_CBLOCK``
channels and are added to float64 (vector width of the dtype, rounding of a
short sum); everything of length ``S`` is float64. One loss per sample,
reduced in index order by the caller: deterministic for any thread count.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from kdnumba._constants import ROW_SUM_TOL
from kdnumba._policy import callee, parallel_jit
from kdnumba.kernels.cpu.dtypes import cast_like
from kdnumba.kernels.cpu.fastexp import log_pos_f64

_CBLOCK = 64


@callee
def _ipow(x, k):
    """``x**k`` for a small integer ``k >= 0`` by repeated multiplication."""
    r = cast_like(1.0, x)
    for _ in range(k):
        r *= x
    return r


@callee
def _power(x, p, use_abs):
    """``v(x)``: ``x^p``, or ``|x|^p`` when ``use_abs``."""
    if use_abs:
        x = abs(x)
    return _ipow(x, p)


@callee
def _power_derivative(x, p, use_abs):
    """``v'(x)``: ``p x^(p-1)``, or ``p |x|^(p-1) sign(x)`` (``sign(0) = 0``)."""
    if use_abs:
        r = _ipow(abs(x), p - 1) * cast_like(p, x)
        if x > 0:
            return r
        if x < 0:
            return -r
        return x - x
    return _ipow(x, p - 1) * cast_like(p, x)


@callee
def _square_sum(f, acc, q):
    """``q_j = sum_c f_cj^2`` for ``f`` of shape ``(C, S)`` (``v(x) = x^2``, with or
    without ``|.|``); ``acc`` is F scratch, ``q`` float64 output."""
    n_ch, n_sp = f.shape
    for j in range(n_sp):
        q[j] = 0.0
    for c0 in range(0, n_ch, _CBLOCK):
        c1 = min(n_ch, c0 + _CBLOCK)
        for j in range(n_sp):
            acc[j] = 0
        for c in range(c0, c1):
            row = f[c]
            for j in range(n_sp):
                acc[j] += row[j] * row[j]
        for j in range(n_sp):
            q[j] += acc[j]


@callee
def _power_sum(f, p, use_abs, acc, q):
    """``q_j = sum_c v(f_cj)`` for ``f`` of shape ``(C, S)``; ``acc`` is F scratch."""
    n_ch, n_sp = f.shape
    for j in range(n_sp):
        q[j] = 0.0
    for c0 in range(0, n_ch, _CBLOCK):
        c1 = min(n_ch, c0 + _CBLOCK)
        for j in range(n_sp):
            acc[j] = 0
        for c in range(c0, c1):
            row = f[c]
            for j in range(n_sp):
                acc[j] += _power(row[j], p, use_abs)
        for j in range(n_sp):
            q[j] += acc[j]


@callee
def _normalise(q, eps):
    """``q <- q / max(||q||, eps)`` in place; returns ``||q||``."""
    norm = 0.0
    for j in range(q.shape[0]):
        norm += q[j] * q[j]
    norm = math.sqrt(norm)
    inv = 1.0 / max(norm, eps)
    for j in range(q.shape[0]):
        q[j] *= inv
    return norm


@callee
def _map_gradient(a_s, a_t, k_s, k_t, eps, paper_loss, w, acc):
    """One sample's loss from its channel sums ``a_s``, ``a_t`` (float64,
    overwritten), and ``acc = k_s g_q`` (F), the factor of ``v'(f_cj)`` in
    the gradient (see the module docstring)."""
    n_sp = a_s.shape[0]
    for j in range(n_sp):
        a_s[j] *= k_s
        a_t[j] *= k_t
    norm_s = _normalise(a_s, eps)
    _normalise(a_t, eps)

    # a_t <- d = a_s - a_t, then the gradient with respect to a_s.
    dd = 0.0
    for j in range(n_sp):
        a_t[j] = a_s[j] - a_t[j]
        dd += a_t[j] * a_t[j]
    if paper_loss:
        nd = math.sqrt(dd)
        loss = w * nd
        c_d = w / nd if nd > 0.0 else 0.0
    else:
        loss = w * dd
        c_d = 2.0 * w
    dot = 0.0
    for j in range(n_sp):
        a_t[j] *= c_d
        dot += a_s[j] * a_t[j]
    if norm_s >= eps:
        inv = k_s / norm_s
        for j in range(n_sp):
            acc[j] = cast_like((a_t[j] - a_s[j] * dot) * inv, acc)
    else:
        inv = k_s / eps
        for j in range(n_sp):
            acc[j] = cast_like(a_t[j] * inv, acc)
    return loss


@parallel_jit
def _at_square(s, t, mean_channels, paper_loss, eps, w, acc, a_s, a_t, grad, row_loss):
    """:func:`at_rows` for ``p = 2`` (``v(x) = x^2``, ``v'(x) = 2 x``): the
    common case, compiled on its own so that it carries no general-power code."""
    n_rows, c_s, n_sp = s.shape
    c_t = t.shape[1]
    two = cast_like(2.0, s)
    for b in prange(n_rows):
        acc_b = acc[b]
        _square_sum(s[b], acc_b, a_s[b])
        _square_sum(t[b], acc_b, a_t[b])
        k_s = 1.0 / c_s if mean_channels else 1.0
        k_t = 1.0 / c_t if mean_channels else 1.0
        row_loss[b] = _map_gradient(a_s[b], a_t[b], k_s, k_t, eps, paper_loss, w, acc_b)
        f = s[b]
        g = grad[b]
        for c in range(c_s):
            f_row = f[c]
            g_row = g[c]
            for j in range(n_sp):
                g_row[j] = two * acc_b[j] * f_row[j]


@parallel_jit
def _at_power(s, t, p, use_abs, mean_channels, paper_loss, eps, w, acc, a_s, a_t, grad,
              row_loss):
    """:func:`at_rows` for any power ``p`` (and ``|f|^p``)."""
    n_rows, c_s, n_sp = s.shape
    c_t = t.shape[1]
    for b in prange(n_rows):
        acc_b = acc[b]
        _power_sum(s[b], p, use_abs, acc_b, a_s[b])
        _power_sum(t[b], p, use_abs, acc_b, a_t[b])
        k_s = 1.0 / c_s if mean_channels else 1.0
        k_t = 1.0 / c_t if mean_channels else 1.0
        row_loss[b] = _map_gradient(a_s[b], a_t[b], k_s, k_t, eps, paper_loss, w, acc_b)
        f = s[b]
        g = grad[b]
        for c in range(c_s):
            f_row = f[c]
            g_row = g[c]
            for j in range(n_sp):
                g_row[j] = acc_b[j] * _power_derivative(f_row[j], p, use_abs)


def at_rows(s, t, p, use_abs, mean_channels, paper_loss, eps, w, grad, row_loss):
    """Fused attention-transfer loss and gradient, one sample per ``prange`` iteration.

    Parameters (``F`` is the dtype of ``s``):
        s: ``(B, Cs, S)`` F student features; t: ``(B, Ct, S)`` F teacher.
        p: int >= 1, the power; use_abs: ``|f|^p`` instead of ``f^p``.
        mean_channels: ``k = 1/C`` (RepDistiller) instead of ``k = 1`` (paper).
        paper_loss: per-sample ``||d||_2`` instead of ``sum d^2``.
        eps: float64 norm clamp (1e-12, like ``F.normalize``).
        w: float64 weight of each sample's term (``1/(B S)`` or ``1/B``).
        grad: ``(B, Cs, S)`` F output; row_loss: ``(B,)`` float64 output.

    NaN/inf in a sample make its ``q`` (hence ``a`` and the loss) NaN; a
    finite input whose power overflows the dtype gives inf/NaN too, so the
    caller checks only the total. ``p = 2`` runs a kernel of its own (the
    default, compiled without the general-power code). Scratch: ``(B, S)``
    arrays, F and two float64 (allocated here, not per task in the kernel).
    """
    n_rows, _, n_sp = s.shape
    acc = np.empty((n_rows, n_sp), dtype=s.dtype)
    a_s = np.empty((n_rows, n_sp))
    a_t = np.empty((n_rows, n_sp))
    if p == 2:
        _at_square(s, t, bool(mean_channels), bool(paper_loss), float(eps), float(w), acc, a_s,
                   a_t, grad, row_loss)
    else:
        _at_power(s, t, int(p), bool(use_abs), bool(mean_channels), bool(paper_loss),
                  float(eps), float(w), acc, a_s, a_t, grad, row_loss)


_ROWS_PER_CHUNK = 64


@parallel_jit
def kl_prob_rows(s, t, eps, c, grad, row_loss):
    """KL(t_r || s_r) over rows of probability vectors, clamping the student at ``eps``.

    Per row ``r`` of ``(R, L)`` arrays, with ``s^ = max(s, eps)``::

        loss_r = sum_{j: t_j > 0} t_j log(t_j / s^_j)
        grad_rj = -c t_j / s_j   if s_j >= eps,  else 0

    (``0 log 0 = 0``; the clamp is flat below ``eps``, so no gradient there.)
    The loop is branch-free (selects, ``fastexp.log_pos_f64``) and vectorises.

    A row that is not a pair of probability vectors -- a negative entry, a
    sum off 1 by more than ``ROW_SUM_TOL``, NaN/inf in either -- gets a NaN
    ``row_loss``, so the caller checks only the total (and names the problem
    on that error path). The negative entries are found through the sum of
    the negative parts ``sum min(x, 0)`` (negative iff the row holds one; a
    sum vectorises where a running minimum does not).

    Parameters (``F`` is the dtype of ``s``):
        eps: F clamp; c: F gradient factor (``1/R`` for a mean over rows).
        grad: ``(R, L)`` F output; row_loss: ``(R,)`` float64 output.
    """
    n_rows, n_cols = s.shape
    n_chunks = (n_rows + _ROWS_PER_CHUNK - 1) // _ROWS_PER_CHUNK
    zero = c - c
    for chunk in prange(n_chunks):
        stop = min(n_rows, (chunk + 1) * _ROWS_PER_CHUNK)
        for i in range(chunk * _ROWS_PER_CHUNK, stop):
            s_row = s[i]
            t_row = t[i]
            g_row = grad[i]
            loss = 0.0
            s_sum = 0.0
            t_sum = 0.0
            s_neg = 0.0
            t_neg = 0.0
            for j in range(n_cols):
                sj = s_row[j]
                tj = t_row[j]
                s_sum += sj
                t_sum += tj
                s_neg += min(sj, zero)
                t_neg += min(tj, zero)
                g_row[j] = -c * tj / sj if sj >= eps else zero
                t64 = np.float64(tj)
                term = t64 * log_pos_f64(t64 / np.float64(max(sj, eps)))
                loss += term if tj > zero else 0.0
            valid = (s_neg >= 0.0 and t_neg >= 0.0 and abs(s_sum - 1.0) <= ROW_SUM_TOL
                     and abs(t_sum - 1.0) <= ROW_SUM_TOL)
            row_loss[i] = loss if valid else math.nan


# --- average pooling (host NumPy; the arrays are the caller's) ------------------------

def _block_shape(shape, factors):
    """Shape ``(B, C, n0, k0, n1, k1, ...)`` splitting each spatial axis in blocks."""
    out = list(shape[:2])
    for size, k in zip(shape[2:], factors):
        out += [size // k, k]
    return out


def avg_pool(x, factors, out):
    """``out`` = mean of ``x`` (B, C, *spatial) over non-overlapping blocks of
    ``factors`` along the spatial axes (``out``: C-contiguous, x's dtype)."""
    block_axes = tuple(range(3, 2 + 2 * len(factors), 2))
    np.mean(x.reshape(_block_shape(x.shape, factors)), axis=block_axes, dtype=x.dtype, out=out)


def avg_unpool(g, factors, out):
    """The adjoint of :func:`avg_pool`: each block of ``out`` (C-contiguous, the
    unpooled shape) receives ``g / prod(factors)``."""
    blocks = _block_shape(out.shape, factors)
    expanded = list(blocks)
    for i in range(len(factors)):
        expanded[3 + 2 * i] = 1
    scale = g.dtype.type(1.0 / math.prod(factors))
    out.reshape(blocks)[...] = g.reshape(expanded) * scale
