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

from kdnumba._output_pool import POOL
from kdnumba._policy import callee, jit, kernel_launch, parallel_jit
from kdnumba.kernels.cpu.dtypes import MAX_FLOAT64
from kdnumba.kernels.cpu.reductions import lane_sum, ordered_sum
from kdnumba.kernels.relational_scalars import run_phases

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


# Serial, and not a phase of ``_tasks``: O(B D) work is below the cost of a
# parallel launch at any batch RKD is used with, and as a phase it made the
# headline call (B = 512, every other phase parallel) compile the serial build
# of ``_tasks`` as well, +1 s of cold compile (issue #16). No fast-math: with
# ``arcp`` LLVM hoists ``1 / B`` out of the column loop, and the means would no
# longer be NumPy's divisions, bit for bit.
@jit(fastmath=False)
def _center_columns(et, ec):
    """``ec = e - mean_rows(e)`` from ``et = e^T`` (float64), column by column:
    each mean summed in row order, then divided by ``B`` (NumPy's
    ``e - e.mean(axis=0, dtype=float64)``, bit for bit)."""
    n = et.shape[1]
    for d in range(et.shape[0]):
        col = et[d]
        total = 0.0
        for i in range(n):
            total += col[i]
        mean = total / n
        for i in range(n):
            ec[i, d] = col[i] - mean


@parallel_jit
def _tasks(phase, n_tasks, m0, m1, m2, m3, m4, m5, m6, v0, v1, x0, x1, x2, x3, x4, x5):
    """Task ``0 .. n_tasks - 1`` of ``phase``, in parallel: the one ``prange``
    kernel of the module (float64 arrays only, so one build serves both input
    dtypes). Arguments as :func:`loss_and_gradient` passes them."""
    for index in prange(n_tasks):
        # The parfor's index is unsigned: one int64 type for the callees, which
        # would otherwise be compiled for both.
        task = np.int64(index)
        if phase == _GEOMETRY:  # the student's rows, then the teacher's
            if task < m1.shape[0]:
                _geometry_row(task, m0, x0, m1, m2, v0)
            else:
                _geometry_row(task - m1.shape[0], m3, x0, m4, m5, v1)
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


# --- the launch function: the interface of ``kernels.cuda.relational`` -------------


def loss_and_gradient(s, t, eps, w_d, w_a, grad):
    """The whole loss in one call: ``(distance_total, loss)``, the gradient in ``grad``.

    Parameters (the same on both devices; ``F`` is the dtype of ``s``):
        s, t: ``(B, D_s)``, ``(B, D_t)`` F, C-contiguous (student, teacher).
        eps: the clamp of squared distances (``NORM_EPS``).
        w_d, w_a: Python floats, the distance and angle weights (``>= 0``).
        grad: ``(B, D_s)`` F output, ``d loss / d s`` (not written when
            ``distance_total`` is not finite).

    Returns ``(distance_total, loss)``, Python floats: ``sum_{i != j} d^s_ij +
    sum_{i != j} d^t_ij`` -- NaN/inf when an input holds NaN/inf (each row of
    ``Q`` is checked before the ``max(Q, eps)`` clamp could hide it), and then
    nothing else is computed and ``loss`` is NaN -- and ``w_d L_d + w_a L_a``
    (inf when finite inputs have squared distances beyond float64).

    Steps (phases of :func:`_tasks`), with ``M = dL/dE`` factor as in the
    module docstring::

        Q, iota of s and t (geometry)      -> mu_s, mu_t (row sums, in order)
        distance term per row              -> L_d, k_mean      (skipped: B = 1, w_d = 0)
        angle term per row block           -> L_a, R           (skipped: B = 1, w_a = 0)
        M from R, Q (assemble, into iota_s's memory, dead by then)
        ec = s - mean_rows(s) (per column) -> grad = M @ ec (float64, cast on the way out)

    ``M`` has zero row sums, so ``M @ s = M @ ec``: the centred rows keep a
    large common offset out of the product.

    Every buffer but the angle term's per-task scratch is allocated first,
    and the kernels run back to back with nothing in between but their calls,
    the angle term's ``Q / 2`` and a few float operations: a small
    call's Python work between two kernels cost more than the kernels
    themselves (issue #16). Each phase keeps its own ``kernel_launch`` with
    its own work (``B^2 (D_s + D_t)``, ``B^2``, ``B^3``, ``B^2 D_s``), so a
    phase runs the serial build exactly when it did as a launch function of
    its own: a parallel launch costs 34-90 us on the ``workqueue`` layer,
    more than the small phases' work even when the call as a whole is large.
    The centring is a serial kernel of its own (:func:`_center_columns`).
    The flow between the phases (the means, which terms run, the loss) is
    ``kernels.relational_scalars.run_phases``, shared with the CUDA twin.
    """
    n, dim_s = s.shape
    dim_t = t.shape[1]
    angle = n > 1 and w_a != 0.0
    # Every buffer first, float64, in two blocks (two allocations whatever the
    # shapes; large ones through the output pool, whose pages are already
    # faulted in). B x B: Q and iota of both, and for the angle term R, its
    # loss table and Q / 2 of both.
    mats = POOL.empty((8 if angle else 4, n, n), np.float64)
    q_s, ins, q_t, int_ = mats[0], mats[1], mats[2], mats[3]
    # Rows: [e_s^T | e_t^T] for the squared distances; the centred rows take
    # e_t^T's place (dead after them), and a float32 call's float64 product
    # e_s^T's (dead once centred).
    size_s = n * dim_s
    rows = POOL.empty(size_s + n * max(dim_s, dim_t), np.float64)
    et_s = rows[:size_s].reshape(dim_s, n)
    et_t = rows[size_s:size_s + n * dim_t].reshape(dim_t, n)
    ec = rows[size_s:2 * size_s].reshape(n, dim_s)
    acc = grad if grad.dtype == np.float64 else rows[:size_s].reshape(n, dim_s)
    np.copyto(et_s, s.T)
    np.copyto(et_t, t.T)
    sums = np.empty((2, n))
    sum_s, sum_t = sums[0], sums[1]
    no_m, no_v = _NO_MATRIX, _NO_VECTOR
    eps = float(eps)

    r = no_m  # the angle term's factor, when it runs

    def geometry():
        with kernel_launch(n * n * (dim_s + dim_t)):
            _tasks(_GEOMETRY, 2 * n, et_s, q_s, ins, et_t, q_t, int_, no_m, sum_s, sum_t,
                   eps, 0.0, 0.0, 0.0, 0.0, 0.0)
        return ordered_sum(sum_s), ordered_sum(sum_t)

    def distance(inv_mu_s, inv_mu_t):
        row_loss, row_hd = sums[0], sums[1]  # the distance sums are read
        with kernel_launch(n * n):
            _tasks(_DISTANCE, n, q_s, q_t, no_m, no_m, no_m, no_m, no_m, row_loss, row_hd,
                   eps, inv_mu_s, inv_mu_t, 0.0, 0.0, 0.0)
        return ordered_sum(row_loss), ordered_sum(row_hd)

    def angle_term():
        nonlocal r
        n_tasks = (n + ROWS_PER_TASK - 1) // ROWS_PER_TASK
        r, loss_table, half_qs, half_qt = mats[4], mats[5], mats[6], mats[7]
        scratch = np.empty((n_tasks, n))
        row_loss = sums[0]
        # Q / 2, exact: (Q_ab + Q_ac - Q_bc) / 2 as one sum.
        np.multiply(q_s, 0.5, out=half_qs)
        np.multiply(q_t, 0.5, out=half_qt)
        with kernel_launch(n * n * n):
            _tasks(_ANGLE, n_tasks, half_qs, ins, half_qt, int_, r, loss_table, scratch,
                   row_loss, no_v, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        return ordered_sum(row_loss)

    def gradient(w_a_mean, inv_mu_s, inv_mu_t, k_mean, w_d_mean):
        m = ins  # iota_s is dead after the angle term: M takes its memory
        _center_columns(et_s, ec)
        with kernel_launch(n * n * dim_s):
            _tasks(_ASSEMBLE, n, r, q_s, q_t, m, no_m, no_m, no_m, no_v, no_v,
                   w_a_mean, eps, inv_mu_s, inv_mu_t, k_mean, w_d_mean)
            _tasks(_PRODUCT, n, m, ec, acc, no_m, no_m, no_m, no_m, no_v, no_v,
                   0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        if acc is not grad:
            grad[...] = acc

    return run_phases(n, w_d, w_a, geometry, distance, angle_term, gradient)
