"""Relational KD (``rkd_loss``) on the GPU: the CPU algorithm, one thread per item.

The CUDA twin of ``kernels.cpu.relational`` (see its docstring for the
math): everything is built from the float64 matrix of squared pairwise
distances ``Q`` and ``iota`` (inverse distances, 0 on the diagonal and for
coincident rows), in float64 whatever the input dtype; only the gradient is
written in the input's dtype. Memory is O(B^2) like the CPU path.

Deterministic by construction: every kernel gives each output element (a
pair, a row, a column) to one thread, which sums in the CPU kernels' index
order; there is no atomic and no cross-thread reduction. Per-row float64
partials are added by :mod:`kdnumba.kernels.cuda.reduce` (fixed order).
Kernels grid-stride over their items, so any grid covers the problem.

:func:`loss_and_gradient` is that of ``kernels.cpu.relational``, with the same
arguments and results; it allocates its scratch on the device and launches,
in order on one stream (B rows of D features):

* geometry: one thread per ``(i, j)`` -- ``Q_ij`` from differences,
  ``iota_ij``; then one thread per row -- ``sum_j d_ij``, NaN when the row's
  ``Q`` is not finite (the ``max(Q, eps)`` clamp would otherwise hide a NaN
  input);
* distance term, angle term, gradient factor ``M``: one thread per row;
  the angle term's O(B^3) work is B threads of O(B^2) each (fine for B up
  to a few thousand);
* centring: one thread per column; ``M @ ec``: one thread per gradient
  element.

No ``min``/``max`` builtins (numba 0.68's CUDA target fails to compile them).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from kdnumba.kernels.cuda import compile_kernel, item_launch, reduce
from kdnumba.kernels.relational_scalars import run_phases

_PAIRS_SIG = "void({F}[:, ::1], float64, float64[:, ::1], float64[:, ::1])"
_ROW_SUMS_SIG = "void(float64[:, ::1], float64, float64[::1])"
_DISTANCE_SIG = ("void(float64[:, ::1], float64[:, ::1], float64, float64, float64, "
                 "float64[::1], float64[::1])")
_ANGLE_SIG = ("void(float64[:, ::1], float64[:, ::1], float64[:, ::1], float64[:, ::1], "
              "float64[:, ::1], float64[:, ::1], float64[:, ::1], float64[::1])")
_ASSEMBLE_SIG = ("void(float64[:, ::1], float64, float64[:, ::1], float64[:, ::1], float64, "
                 "float64, float64, float64, float64, float64[:, ::1])")
_CENTER_SIG = "void({F}[:, ::1], float64[:, ::1])"
_MATMUL_SIG = "void(float64[:, ::1], float64[:, ::1], {F}[:, ::1])"


@cuda.jit(device=True)
def _distance(q, eps):
    """``d = sqrt(max(Q, eps))`` (RepDistiller's ``pdist`` clamp)."""
    return math.sqrt(q if q > eps else eps)


@cuda.jit(device=True)
def _smooth_l1(x):
    """``x^2 / 2`` for ``|x| < 1``, else ``|x| - 1/2``."""
    ax = abs(x)
    return 0.5 * x * x if ax < 1.0 else ax - 0.5


@cuda.jit(device=True)
def _clip1(x):
    """``clip(x, -1, 1)``, the derivative of :func:`_smooth_l1`."""
    if x > 1.0:
        return 1.0
    if x < -1.0:
        return -1.0
    return x


@cuda.jit(device=True)
def _distance_residual(qs_ij, qt_ij, eps, inv_mu_s, inv_mu_t):
    """``(x_ij, d^s_ij)`` with ``x_ij = d^s_ij / mu_s - d^t_ij / mu_t`` (off-diagonal pairs)."""
    d_s = _distance(qs_ij, eps)
    return d_s * inv_mu_s - _distance(qt_ij, eps) * inv_mu_t, d_s


def _pairs_kernel(e, eps, q, inv):
    n, dim = e.shape
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for p in range(start, n * n, stride):
        i = p // n
        j = p - i * n
        acc = 0.0
        for k in range(dim):
            # (x - y)^2 == (y - x)^2 exactly: Q is symmetric with a zero diagonal.
            diff = np.float64(e[i, k]) - np.float64(e[j, k])
            acc += diff * diff
        q[i, j] = acc
        norm = math.sqrt(acc)
        if i != j and norm > eps:
            inv[i, j] = 1.0 / norm
        else:
            inv[i, j] = 0.0


def _row_sums_kernel(q, eps, row_sum):
    n = q.shape[0]
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        total = 0.0
        finite = True
        for j in range(n):
            x = q[i, j]
            if not (x <= 1.7976931348623157e308):  # NaN or inf
                finite = False
            if j != i:
                total += _distance(x, eps)
        row_sum[i] = total if finite else math.nan


def _distance_kernel(qs, qt, eps, inv_mu_s, inv_mu_t, row_loss, row_hd):
    n = qs.shape[0]
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        loss = 0.0
        hd = 0.0
        for j in range(n):
            if j == i:
                continue
            x, d_s = _distance_residual(qs[i, j], qt[i, j], eps, inv_mu_s, inv_mu_t)
            loss += _smooth_l1(x)
            hd += _clip1(x) * d_s
        row_loss[i] = loss
        row_hd[i] = hd


def _angle_kernel(qs, ins, qt, int_, r, alpha, hk, row_loss):
    # Thread b owns row b of r, alpha and hk; the sums run in the CPU's order
    # (a ascending, then c ascending), the (b, a) terms added after the sweep.
    n = qs.shape[0]
    for b in range(cuda.grid(1), n, cuda.gridsize(1)):
        for c in range(n):
            r[b, c] = 0.0
        loss = 0.0
        for a in range(n):
            ins_ab = ins[a, b]
            int_ab = int_[a, b]
            al = 0.0
            hsum = 0.0
            if not (ins_ab == 0.0 and int_ab == 0.0):
                qs_ab = qs[a, b]
                qt_ab = qt[a, b]
                pair_loss = 0.0
                for c in range(n):
                    w_s = ins_ab * ins[a, c]
                    k = 0.5 * (qs_ab + qs[a, c] - qs[b, c]) * w_s
                    t = 0.5 * (qt_ab + qt[a, c] - qt[b, c]) * (int_ab * int_[a, c])
                    x = k - t
                    pair_loss += _smooth_l1(x)
                    h = _clip1(x)
                    w = h * w_s
                    r[b, c] += w
                    al += w
                    hsum += h * k
                loss += pair_loss
            alpha[b, a] = al
            hk[b, a] = hsum
        for a in range(n):
            beta = hk[b, a] * ins[a, b] * ins[a, b]
            r[b, a] += 2.0 * (beta - alpha[b, a])
        row_loss[b] = loss


def _assemble_kernel(r, w_a, qs, qt, eps, inv_mu_s, inv_mu_t, k_mean, w_d, out):
    n = qs.shape[0]
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        c_sum = 0.0
        r_sum = 0.0
        for j in range(n):
            if j == i:
                continue
            c = 0.0
            a = qs[i, j]
            if w_d != 0.0 and a >= eps:  # else the clamp is flat: c = 0
                x, d_s = _distance_residual(a, qt[i, j], eps, inv_mu_s, inv_mu_t)
                c = (_clip1(x) * inv_mu_s - k_mean) / (2.0 * d_s)
            rr = 0.0
            if w_a != 0.0:  # r is not written when the angle term is skipped
                rr = r[i, j] + r[j, i]
            out[i, j] = w_a * rr - 4.0 * w_d * c
            c_sum += c
            r_sum += rr
        out[i, i] = -w_a * r_sum + 4.0 * w_d * c_sum


def _center_kernel(e, ec):
    n, dim = e.shape
    for k in range(cuda.grid(1), dim, cuda.gridsize(1)):
        mean = 0.0
        for i in range(n):
            mean += np.float64(e[i, k])
        mean /= n
        for i in range(n):
            ec[i, k] = np.float64(e[i, k]) - mean


def _matmul_kernel(m, ec, grad):
    n, dim = ec.shape
    for p in range(cuda.grid(1), n * dim, cuda.gridsize(1)):
        i = p // dim
        d = p - i * dim
        acc = 0.0
        for k in range(n):
            acc += m[i, k] * ec[k, d]
        grad[i, d] = acc


KERNELS = [
    (_pairs_kernel, _PAIRS_SIG),
    (_row_sums_kernel, _ROW_SUMS_SIG),
    (_distance_kernel, _DISTANCE_SIG),
    (_angle_kernel, _ANGLE_SIG),
    (_assemble_kernel, _ASSEMBLE_SIG),
    (_center_kernel, _CENTER_SIG),
    (_matmul_kernel, _MATMUL_SIG),
]


def _launch(pyfunc, signature, n_items, dtype=None):
    """The kernel configured for ``n_items`` independent items (grid-strided)."""
    return compile_kernel(pyfunc, signature, dtype)[item_launch(n_items)]


# --- the launch function: the interface of ``kernels.cpu.relational`` ----------------

def loss_and_gradient(s, t, eps, w_d, w_a, grad):
    """The whole loss on one stream: ``(distance_total, loss)``, host floats, the
    gradient in ``grad`` (device arrays ``s``, ``t``, ``grad``): the interface
    and results of ``kernels.cpu.relational.loss_and_gradient``, which
    describes the steps. Scratch: four ``(B, B)`` arrays for ``Q`` and
    ``iota``, and when the angle term is on three more (``R`` and two for its
    per-row sums); ``M`` takes ``iota_s``'s memory."""
    n, dim_s = s.shape
    empty = cuda.device_array
    q_s, ins = empty((n, n), dtype=np.float64), empty((n, n), dtype=np.float64)
    q_t, int_ = empty((n, n), dtype=np.float64), empty((n, n), dtype=np.float64)
    sum_s, sum_t = empty(n, dtype=np.float64), empty(n, dtype=np.float64)
    ec = empty((n, dim_s), dtype=np.float64)
    eps = float(eps)

    # The angle term's factor; one element when the term is off, not read (some
    # drivers reject zero-size allocations).
    r = empty((1, 1), dtype=np.float64)

    def geometry():
        pairs = _launch(_pairs_kernel, _PAIRS_SIG, n * n, s.dtype)
        row_sums = _launch(_row_sums_kernel, _ROW_SUMS_SIG, n)
        pairs(s, eps, q_s, ins)
        row_sums(q_s, eps, sum_s)
        pairs(t, eps, q_t, int_)
        row_sums(q_t, eps, sum_t)
        return reduce.total(sum_s), reduce.total(sum_t)

    def distance(inv_mu_s, inv_mu_t):
        row_loss, row_hd = sum_s, sum_t  # the distance sums are read
        _launch(_distance_kernel, _DISTANCE_SIG, n)(q_s, q_t, eps, inv_mu_s, inv_mu_t,
                                                    row_loss, row_hd)
        return reduce.total(row_loss), reduce.total(row_hd)

    def angle_term():
        nonlocal r
        r = empty((n, n), dtype=np.float64)
        alpha, hk = empty((n, n), dtype=np.float64), empty((n, n), dtype=np.float64)
        _launch(_angle_kernel, _ANGLE_SIG, n)(q_s, ins, q_t, int_, r, alpha, hk, sum_s)
        return reduce.total(sum_s)

    def gradient(w_a_mean, inv_mu_s, inv_mu_t, k_mean, w_d_mean):
        m = ins  # iota_s is dead after the angle term: M takes its memory
        _launch(_assemble_kernel, _ASSEMBLE_SIG, n)(r, w_a_mean, q_s, q_t, eps, inv_mu_s,
                                                    inv_mu_t, k_mean, w_d_mean, m)
        _launch(_center_kernel, _CENTER_SIG, dim_s, s.dtype)(s, ec)
        _launch(_matmul_kernel, _MATMUL_SIG, n * dim_s, grad.dtype)(m, ec, grad)

    return run_phases(n, w_d, w_a, geometry, distance, angle_term, gradient)
