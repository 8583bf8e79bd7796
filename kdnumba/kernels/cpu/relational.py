"""Relational KD (Park et al. 2019; RepDistiller ``RKD.py``): distance and angle terms.

Everything is expressed through the matrix of squared pairwise distances
``Q_ij = ||e_i - e_j||^2``, computed directly from differences (no Gram
expansion, so no cancellation for close rows), in float64 whatever the input
dtype.

Pairs (``i != j``; the diagonal is 0)::

    d_ij = sqrt(max(Q_ij, eps))                    (RepDistiller ``pdist``)
    u_ij = (e_j - e_i) * iota_ij,  iota_ij = 1/sqrt(Q_ij) if sqrt(Q_ij) > eps else 0

Angles at vertex ``a``, by the polarisation identity (no ``U_a`` is formed)::

    K^a_bc = u_ab . u_ac = (Q_ab + Q_ac - Q_bc) / 2 * iota_ab iota_ac

so the ``B^3`` angles cost O(1) each from ``Q``: the angle term is O(B^3)
work and O(B^2) memory instead of RepDistiller's O(B^3 D) / O(B^3).

Gradient: the loss is a function of ``Q`` only. With ``S = dL/dQ`` (entries
as written) and ``W = S + S^T``, ``dL/dE = 2 (diag(W 1) - W) E``: one B x B
by B x D product at the end. For the angle term, with
``h = smooth_l1'(K - T)`` per entry and, for each ``(a, b)``::

    A^a_bc = h^a_bc iota_ab iota_ac,   alpha^a_b = sum_c A^a_bc,
    beta^a_b = iota_ab^2 sum_c h^a_bc K^a_bc

    S_bc -= 1/2 sum_a A^a_bc                   (the O(B^3) part, row b per task)
    S_ab += alpha^a_b - beta^a_b               (stored transposed, in row b too)

(derivation in ``docs/relational.md``). ``beta - alpha`` is summed as one
sum, ``sum_c h^a_bc (iota_ab^2 K^a_bc - iota_ab iota_ac)``.

Vectorisation. The policy grants no ``reassoc``, so a loop that carries a
scalar sum runs one element per add latency. Every O(B^2 D) and O(B^3) loop
is therefore written element-wise: :func:`geometry` sums ``Q_i.`` over the
features into the row itself (features outer, pairs inner, on a transposed
float64 copy of the rows: each ``Q_ij`` is still summed in feature order), and
the angle loop accumulates the loss into a ``B x B`` table and writes the
per-``c`` terms of ``beta - alpha`` to a scratch row, reduced by
``reductions.lane_sum`` (fixed SIMD lanes).

Compilation. All parallel work is one ``prange`` kernel, :func:`_tasks`,
whose body picks a phase (geometry, distance, angle, assemble, product):
each ``prange`` loop costs its own parfor lowering, and the launch functions
below -- those of ``kernels.cuda.relational``, with the same arguments --
are plain Python around it. Each task owns fixed rows and sums in a fixed
order, so every result is bit-identical for any thread count.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from kdnumba._policy import callee, jit, parallel_jit
from kdnumba.kernels.cpu.dtypes import MAX_FLOAT64
from kdnumba.kernels.cpu.reductions import lane_sum

#: Rows ``b`` per task of the angle phase: the rows ``a`` it streams are
#: reused by all of a task's rows while in cache (the grouping does not change
#: any sum, so results do not depend on it).
ROWS_PER_TASK = 16


# Phases of :func:`_tasks`.
_GEOMETRY = 0
_DISTANCE = 1
_ANGLE = 2
_ASSEMBLE = 3
_PRODUCT = 4


@callee
def _geometry_row(i, et, eps, q, inv_norm, dist_row_sum):
    """Row ``i``: ``q[i, j] = ||e_i - e_j||^2`` (float64, summed over features
    in order), ``inv_norm[i, j] = iota_ij``, ``dist_row_sum[i] = sum_j d_ij``
    (NaN when the row of ``q`` holds NaN or inf: the ``max(Q, eps)`` clamp and
    ``iota``'s test would otherwise hide it). ``et``: ``e^T`` (D, B) in float64.

    ``(i, j)`` and ``(j, i)`` square the same differences in the same order,
    so ``q`` is exactly symmetric, with an exactly zero diagonal.
    """
    dim, n = et.shape
    q_row = q[i]
    inv_row = inv_norm[i]
    for j in range(n):
        q_row[j] = 0.0
    for k in range(dim):
        x = et[k, i]
        col = et[k]
        for j in range(n):
            diff = x - col[j]
            q_row[j] += diff * diff
    total = 0.0
    finite = True
    for j in range(n):
        acc = q_row[j]
        if not acc <= MAX_FLOAT64:  # NaN or inf
            finite = False
        norm = math.sqrt(acc)
        if j == i:
            inv_row[j] = 0.0
        else:
            inv_row[j] = 1.0 / norm if norm > eps else 0.0
            total += math.sqrt(max(acc, eps))
    dist_row_sum[i] = total if finite else math.nan


@callee
def _distance_row(i, qs, qt, eps, inv_mu_s, inv_mu_t, row_loss, row_hd):
    """Row ``i``: ``sum_j smooth_l1(x_ij)`` and ``sum_j clip(x_ij) d^s_ij`` with
    ``x_ij = d^s_ij / mu_s - d^t_ij / mu_t`` (off-diagonal; the diagonal is 0 - 0)."""
    n = qs.shape[0]
    qs_row = qs[i]
    qt_row = qt[i]
    loss = 0.0
    hd = 0.0
    for j in range(n):
        if j == i:
            continue
        d_s = math.sqrt(max(qs_row[j], eps))
        x = d_s * inv_mu_s - math.sqrt(max(qt_row[j], eps)) * inv_mu_t
        ax = abs(x)
        loss += 0.5 * x * x if ax < 1.0 else ax - 0.5
        hd += min(max(x, -1.0), 1.0) * d_s
    row_loss[i] = loss
    row_hd[i] = hd


@callee
def _angle_task(task, hqs, ins, hqt, int_, r, loss_table, scratch, row_loss):
    """Rows ``b`` of block ``task``: ``r[b]`` (``-2 S`` of the angle term) and
    ``row_loss[b] = sum_{a,c} smooth_l1(K^a_bc - T^a_bc)``. ``hqs``, ``hqt``:
    ``Q / 2`` (exact); ``loss_table[b]`` and ``scratch[task]`` are scratch rows.

    Per entry, with ``h = clip(x, -1, 1)``, ``smooth_l1(x) = h (x - h / 2)``
    (both branches), which needs no compare of its own.
    """
    n = hqs.shape[0]
    b0 = task * ROWS_PER_TASK
    b1 = min(n, b0 + ROWS_PER_TASK)
    terms = scratch[task]
    for b in range(b0, b1):
        r_b = r[b]
        l_b = loss_table[b]
        for c in range(n):
            r_b[c] = 0.0
            l_b[c] = 0.0
    for a in range(n):
        hqs_a = hqs[a]
        ins_a = ins[a]
        hqt_a = hqt[a]
        int_a = int_[a]
        for b in range(b0, b1):
            ins_ab = ins_a[b]
            int_ab = int_a[b]
            if ins_ab == 0.0 and int_ab == 0.0:
                continue  # b == a, or coincident in both: every K and T is 0
            hqs_ab = hqs_a[b]
            hqt_ab = hqt_a[b]
            ins_ab2 = ins_ab * ins_ab
            hqs_b = hqs[b]
            hqt_b = hqt[b]
            r_b = r[b]
            l_b = loss_table[b]
            for c in range(n):  # element-wise only: vectorises
                w_s = ins_ab * ins_a[c]
                k = (hqs_ab + hqs_a[c] - hqs_b[c]) * w_s
                x = k - (hqt_ab + hqt_a[c] - hqt_b[c]) * (int_ab * int_a[c])
                h = min(max(x, -1.0), 1.0)
                l_b[c] += h * (x - 0.5 * h)
                r_b[c] += h * w_s
                terms[c] = h * (ins_ab2 * k - w_s)
            r_b[a] += 2.0 * lane_sum(terms)
    for b in range(b0, b1):
        row_loss[b] = lane_sum(loss_table[b])


@callee
def _assemble_row(i, r, w_a, qs, qt, eps, inv_mu_s, inv_mu_t, k_mean, w_d, out):
    """Row ``i`` of the gradient factor ``M`` (see :func:`assemble`)."""
    n = qs.shape[0]
    qs_row = qs[i]
    qt_row = qt[i]
    o_row = out[i]
    c_sum = 0.0
    r_sum = 0.0
    for j in range(n):
        if j == i:
            continue
        c = 0.0
        if w_d != 0.0 and qs_row[j] >= eps:  # else the clamp is flat: c = 0
            d_s = math.sqrt(max(qs_row[j], eps))
            x = d_s * inv_mu_s - math.sqrt(max(qt_row[j], eps)) * inv_mu_t
            c = (min(max(x, -1.0), 1.0) * inv_mu_s - k_mean) / (2.0 * d_s)
        rr = 0.0
        if w_a != 0.0:  # r is not written when the angle term is skipped
            rr = r[i, j] + r[j, i]
        o_row[j] = w_a * rr - 4.0 * w_d * c
        c_sum += c
        r_sum += rr
    o_row[i] = -w_a * r_sum + 4.0 * w_d * c_sum


@callee
def _product_row(i, m, ec, acc):
    """``acc[i] = m[i] @ ec`` (float64)."""
    n, dim = ec.shape
    a_row = acc[i]
    for d in range(dim):
        a_row[d] = 0.0
    m_row = m[i]
    for k in range(n):
        mik = m_row[k]
        e_row = ec[k]
        for d in range(dim):
            a_row[d] += mik * e_row[d]


@parallel_jit
def _tasks(phase, n_tasks, m0, m1, m2, m3, m4, m5, m6, v0, v1, x0, x1, x2, x3, x4, x5):
    """Task ``0 .. n_tasks - 1`` of ``phase``, in parallel: the one ``prange``
    kernel of the module (float64 arrays only, so one build serves both input
    dtypes). Arguments as the launch functions below pass them."""
    for index in prange(n_tasks):
        # The parfor's index is unsigned: one int64 type for the callees, which
        # would otherwise be compiled for both.
        task = np.int64(index)
        if phase == _GEOMETRY:
            _geometry_row(task, m0, x0, m1, m2, v0)
        elif phase == _DISTANCE:
            _distance_row(task, m0, m1, x0, x1, x2, v0, v1)
        elif phase == _ANGLE:
            _angle_task(task, m0, m1, m2, m3, m4, m5, m6, v0)
        elif phase == _ASSEMBLE:
            _assemble_row(task, m0, x0, m1, m2, x1, x2, x3, x4, x5, m3)
        else:
            _product_row(task, m0, m1, m2)


_NO_MATRIX = np.zeros((0, 0))
_NO_VECTOR = np.zeros(0)


def _launch(phase, n_tasks, matrices=(), vectors=(), scalars=()):
    matrices = tuple(matrices) + (_NO_MATRIX,) * (7 - len(matrices))
    vectors = tuple(vectors) + (_NO_VECTOR,) * (2 - len(vectors))
    scalars = tuple(float(x) for x in scalars) + (0.0,) * (6 - len(scalars))
    _tasks(phase, n_tasks, *matrices, *vectors, *scalars)


# --- launch functions: the interface of ``kernels.cuda.relational`` ----------------


def geometry(e, eps, q, inv_norm, dist_row_sum):
    """Per row ``i`` of ``e`` (B, D): ``q[i, j] = ||e_i - e_j||^2`` (float64, from
    differences), ``inv_norm[i, j] = iota_ij`` and ``dist_row_sum[i] = sum_j d_ij``,
    NaN when row ``i`` of ``q`` holds NaN or inf (a NaN/inf input, or squared
    distances beyond the float64 range), so the caller checks the total only."""
    et = np.ascontiguousarray(e.T, dtype=np.float64)
    _launch(_GEOMETRY, e.shape[0], (et, q, inv_norm), (dist_row_sum,), (eps,))


def distance_rows(qs, qt, eps, inv_mu_s, inv_mu_t, row_loss, row_hd):
    """Per row ``i``: ``sum_j smooth_l1(x_ij)`` and ``sum_j clip(x_ij) d^s_ij``,
    ``x_ij = d^s_ij / mu_s - d^t_ij / mu_t`` (off-diagonal; the diagonal is 0 - 0)."""
    _launch(_DISTANCE, qs.shape[0], (qs, qt), (row_loss, row_hd), (eps, inv_mu_s, inv_mu_t))


def angle_rows(qs, ins, qt, int_, r, row_loss):
    """The angle term's loss and its ``dL/dQ`` (unscaled: a sum, not a mean).

    Parameters (all float64):
        qs, ins: ``(B, B)`` student ``Q`` and ``iota``; qt, int_: the teacher's.
        r: ``(B, B)`` output (overwritten): ``-2 S`` of the angle term,
            i.e. ``sum_a A^a_bc`` at ``(b, c)`` plus ``2 (beta^a_b - alpha^a_b)``
            at ``(b, a)``.
        row_loss: ``(B,)`` output, ``sum_{a,c} smooth_l1(K^a_bc - T^a_bc)``.

    A task owns ``ROWS_PER_TASK`` rows ``b`` and sweeps every ``a``.
    Scratch: three ``(B, B)`` arrays (``Q / 2`` of both, a loss table) and one
    row per task.
    """
    n = qs.shape[0]
    n_tasks = (n + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    loss_table = np.empty((n, n))
    scratch = np.empty((n_tasks, n))
    half_qs, half_qt = 0.5 * qs, 0.5 * qt  # exact: (Q_ab + Q_ac - Q_bc) / 2 as one sum
    _launch(_ANGLE, n_tasks, (half_qs, ins, half_qt, int_, r, loss_table, scratch),
            (row_loss,))


def assemble(r, w_a, qs, qt, eps, inv_mu_s, inv_mu_t, k_mean, w_d, out):
    """The symmetric B x B factor ``M`` of the gradient, ``dL/dE = M E``.

    ``M = w_a [(R + R^T) - diag((R + R^T) 1)] + w_d [4 diag(C 1) - 4 C]``
    with ``R`` from :func:`angle_rows` and ``C_ij = dL_d/dQ_ij`` of the distance term::

        dL_d/dd_ij = h_ij / mu_s - k_mean,   k_mean = sum(h d) / (mu_s^2 B(B-1))
        C_ij = dL_d/dd_ij / (2 d_ij)  where Q_ij >= eps (else the clamp is flat: 0)

    (``w_d`` already holds the ``1/B^2`` of the mean; ``w_a`` the ``1/B^3``.)
    ``r`` is not read when ``w_a == 0`` (pass any float64 2-D array).
    ``out`` must not alias any input.
    """
    _launch(_ASSEMBLE, qs.shape[0], (r, qs, qt, out), (),
            (w_a, eps, inv_mu_s, inv_mu_t, k_mean, w_d))


def center(e, ec):
    """``ec = e - mean_rows(e)`` in float64 (NumPy: the mean is summed in row order)."""
    np.subtract(e, np.mean(e, axis=0, dtype=np.float64), out=ec)


def matmul_rows(m, ec, grad):
    """``grad = m @ ec`` (float64 accumulation, written in ``grad``'s dtype)."""
    acc = grad if grad.dtype == np.float64 else np.empty(ec.shape)
    _launch(_PRODUCT, m.shape[0], (m, ec, acc))
    if acc is not grad:
        grad[...] = acc
