"""Attention kernels on the GPU: attention transfer, KL between attention maps.

The CUDA twin of ``kernels.cpu.attention``: the same launch functions
(:func:`at_rows`, :func:`kl_prob_rows`, :func:`avg_pool`, :func:`avg_unpool`)
with the same arguments, writing into the caller's outputs, and the same
formulas. :func:`at_rows` on features ``(B, C, S)`` runs three kernels
(with three float64 ``(B, S)`` scratch arrays on the device):

1. ``_power_sums`` -- one thread per ``(b, j)`` (coalesced in ``j``):
   ``q_bj = k sum_c v(f_bcj)``, ``v(x) = x^p`` (or ``|x|^p``), float64.
2. ``_at_samples`` -- one block per sample, threads over ``j``, three
   shared-memory tree reductions in fixed order: ``||q_s||``, ``||q_t||``;
   then ``sum d^2`` and ``sum a_s d`` with ``d = a_s - a_t``; it writes the
   sample's loss and ``k g_q``, the factor of ``v'(f_cj)`` in the gradient::

       g_a = 2 w d   (or w d / ||d||, "paper")
       g_q = (g_a - a_s (a_s . g_a)) / ||q_s||   (||q_s|| >= eps; else g_a / eps)

3. ``_at_gradient`` -- elementwise ``grad_bcj = (k g_q)_bj v'(f_bcj)``.

:func:`kl_prob_rows` (KL between attention probabilities) is one block per
row with the CPU kernel's loss and gradient, and it marks a row whose
probabilities are invalid (negative entry, sum off by more than 1e-3,
NaN/inf) with a NaN loss, as the CPU kernel does, so the caller needs no
statistics pass on the host unless the total is not finite.

Average pooling of unequal spatial sizes (``attention_transfer(pool=True)``)
is not implemented on the GPU: :func:`avg_pool` raises ``NotImplementedError``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, types

from kdnumba._constants import ROW_SUM_TOL
from kdnumba.kernels.cuda import (block_reductions, block_size, compile_kernel, grid_size,
                                  item_launch)

tree_sum, tree_max = block_reductions(globals())



@cuda.jit(device=True)
def _ipow(x, k):
    """``x**k`` for a small integer ``k >= 0`` (float64)."""
    r = 1.0
    for _ in range(k):
        r *= x
    return r


@cuda.jit(device=True)
def _power(x, p, use_abs):
    return _ipow(abs(x), p) if use_abs else _ipow(x, p)


@cuda.jit(device=True)
def _power_derivative(x, p, use_abs):
    """``p x^(p-1)``, or ``p |x|^(p-1) sign(x)`` (``sign(0) = 0``)."""
    if use_abs:
        r = _ipow(abs(x), p - 1) * p
        if x > 0:
            return r
        if x < 0:
            return -r
        return 0.0
    return _ipow(x, p - 1) * p


_POWER_SUMS_SIG = "void({F}[:, :, ::1], int64, boolean, float64, float64[:, ::1])"


def _power_sums_kernel(f, p, use_abs, k, q):
    n_b, n_c, n_sp = f.shape
    for e in range(cuda.grid(1), n_b * n_sp, cuda.gridsize(1)):
        b = e // n_sp
        j = e % n_sp
        acc = 0.0
        for c in range(n_c):
            acc += _power(np.float64(f[b, c, j]), p, use_abs)
        q[b, j] = k * acc


_SAMPLES_SIG = ("void(float64[:, ::1], float64[:, ::1], float64, float64, boolean, float64, "
                "float64[:, ::1], float64[::1])")


def _at_samples_kernel(q_s, q_t, eps, w, paper_loss, k_s, gq, row_loss):
    sh = cuda.shared.array(0, dtype=types.float64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    n_b, n_sp = q_s.shape
    for b in range(cuda.blockIdx.x, n_b, cuda.gridDim.x):
        ss = 0.0
        st = 0.0
        for j in range(tid, n_sp, nt):
            ss += q_s[b, j] * q_s[b, j]
            st += q_t[b, j] * q_t[b, j]
        sh[tid] = ss
        sh[nt + tid] = st
        cuda.syncthreads()
        tree_sum(sh, 2, tid, nt)
        norm_s = math.sqrt(sh[0])
        norm_t = math.sqrt(sh[nt])
        cuda.syncthreads()
        inv_s = 1.0 / (norm_s if norm_s > eps else eps)
        inv_t = 1.0 / (norm_t if norm_t > eps else eps)
        dd = 0.0
        ad = 0.0
        for j in range(tid, n_sp, nt):
            a = q_s[b, j] * inv_s
            d = a - q_t[b, j] * inv_t
            dd += d * d
            ad += a * d
        sh[tid] = dd
        sh[nt + tid] = ad
        cuda.syncthreads()
        tree_sum(sh, 2, tid, nt)
        dd = sh[0]
        ad = sh[nt]
        cuda.syncthreads()
        if paper_loss:
            nd = math.sqrt(dd)
            loss = w * nd
            c_d = w / nd if nd > 0.0 else 0.0
        else:
            loss = w * dd
            c_d = 2.0 * w
        if tid == 0:
            row_loss[b] = loss
        dot = c_d * ad  # a_s . g_a
        for j in range(tid, n_sp, nt):
            a = q_s[b, j] * inv_s
            g_a = c_d * (a - q_t[b, j] * inv_t)
            if norm_s >= eps:
                gq[b, j] = (g_a - a * dot) * (k_s / norm_s)
            else:
                gq[b, j] = g_a * (k_s / eps)


_GRAD_SIG = "void({F}[:, :, ::1], int64, boolean, float64[:, ::1], {F}[:, :, ::1])"


def _at_gradient_kernel(f, p, use_abs, gq, grad):
    n_b, n_c, n_sp = f.shape
    for e in range(cuda.grid(1), n_b * n_c * n_sp, cuda.gridsize(1)):
        b = e // (n_c * n_sp)
        r = e % (n_c * n_sp)
        c = r // n_sp
        j = r % n_sp
        grad[b, c, j] = gq[b, j] * _power_derivative(np.float64(f[b, c, j]), p, use_abs)


_KL_SIG = "void({F}[:, ::1], {F}[:, ::1], {F}, {F}, {F}[:, ::1], float64[::1])"


def _kl_rows_kernel(s, t, eps, c, grad, row_loss):
    sh = cuda.shared.array(0, dtype=types.float64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    n_rows, n_cols = s.shape
    for i in range(cuda.blockIdx.x, n_rows, cuda.gridDim.x):
        loss = 0.0
        s_sum = 0.0
        t_sum = 0.0
        s_neg = -math.inf  # max(-s): > 0 iff some s < 0
        t_neg = -math.inf
        for j in range(tid, n_cols, nt):
            sj = s[i, j]
            tj = t[i, j]
            s_sum += sj
            t_sum += tj
            if -np.float64(sj) > s_neg or sj != sj:
                s_neg = -np.float64(sj)
            if -np.float64(tj) > t_neg or tj != tj:
                t_neg = -np.float64(tj)
            if sj >= eps:
                grad[i, j] = -c * tj / sj
            else:
                grad[i, j] = sj - sj
            if tj > 0:
                sc = sj if sj > eps else eps
                loss += tj * math.log(np.float64(tj) / np.float64(sc))
        sh[tid] = loss
        sh[nt + tid] = s_sum
        sh[2 * nt + tid] = t_sum
        sh[3 * nt + tid] = s_neg
        sh[4 * nt + tid] = t_neg
        cuda.syncthreads()
        tree_sum(sh, 3, tid, nt)
        tree_max(sh[3 * nt:], 2, tid, nt)
        if tid == 0:
            loss = sh[0]
            s_sum = sh[nt]
            t_sum = sh[2 * nt]
            s_min = -sh[3 * nt]
            t_min = -sh[4 * nt]
            valid = (s_min >= 0.0 and t_min >= 0.0 and abs(s_sum - 1.0) <= ROW_SUM_TOL
                     and abs(t_sum - 1.0) <= ROW_SUM_TOL)
            row_loss[i] = loss if valid else math.nan
        cuda.syncthreads()


KERNELS = [(_power_sums_kernel, _POWER_SUMS_SIG), (_at_samples_kernel, _SAMPLES_SIG),
           (_at_gradient_kernel, _GRAD_SIG), (_kl_rows_kernel, _KL_SIG)]


def _power_sums(f, p, use_abs, k, q):
    """``q_bj = k sum_c v(f_bcj)`` of ``(B, C, S)`` features into float64 ``q`` ``(B, S)``."""
    n_b, _, n_sp = f.shape
    compile_kernel(_power_sums_kernel, _POWER_SUMS_SIG, f.dtype)[item_launch(n_b * n_sp)](
        f, int(p), bool(use_abs), float(k), q)


def _at_samples(q_s, q_t, eps, w, paper_loss, k_s, gq, row_loss):
    """Per-sample losses into ``row_loss`` and ``k g_q`` into ``gq`` (float64)."""
    n_b, n_sp = q_s.shape
    threads = block_size(n_sp)
    compile_kernel(_at_samples_kernel, _SAMPLES_SIG)[grid_size(n_b), threads, 0,
                                                      2 * threads * 8](
        q_s, q_t, float(eps), float(w), bool(paper_loss), float(k_s), gq, row_loss)


def _at_gradient(f, p, use_abs, gq, grad):
    """``grad_bcj = gq_bj v'(f_bcj)``."""
    n = int(np.prod(f.shape))
    compile_kernel(_at_gradient_kernel, _GRAD_SIG, f.dtype)[item_launch(n)](
        f, int(p), bool(use_abs), gq, grad)


def at_rows(s, t, p, use_abs, mean_channels, paper_loss, eps, w, grad, row_loss):
    """Attention-transfer loss per sample and gradient (``kernels.cpu.attention.at_rows``):
    ``s`` ``(B, Cs, S)``, ``t`` ``(B, Ct, S)``, ``grad`` like ``s``, ``row_loss`` ``(B,)``."""
    n_b, c_s, n_sp = s.shape
    k_s = 1.0 / c_s if mean_channels else 1.0
    k_t = 1.0 / t.shape[1] if mean_channels else 1.0
    q_s = cuda.device_array((n_b, n_sp), dtype=np.float64)
    q_t = cuda.device_array((n_b, n_sp), dtype=np.float64)
    _power_sums(s, p, use_abs, k_s, q_s)
    _power_sums(t, p, use_abs, k_t, q_t)
    gq = cuda.device_array((n_b, n_sp), dtype=np.float64)
    _at_samples(q_s, q_t, eps, w, paper_loss, k_s, gq, row_loss)
    _at_gradient(s, p, use_abs, gq, grad)


def kl_prob_rows(s, t, eps, c, grad, row_loss):
    """KL(t_r || s_r) over rows of probabilities (see ``kernels.cpu.attention``);
    an invalid row gets a NaN ``row_loss``."""
    dtype = np.dtype(s.dtype)
    threads = block_size(s.shape[1])
    compile_kernel(_kl_rows_kernel, _KL_SIG, dtype)[
        grid_size(s.shape[0]), threads, 0, 5 * threads * 8](
        s, t, dtype.type(eps), dtype.type(c), grad, row_loss)


def avg_pool(x, factors, out):
    """Not on the GPU yet: ``NotImplementedError`` (``kernels.cpu.attention.avg_pool``)."""
    raise NotImplementedError(
        "attention_transfer(pool=True) with different spatial sizes is not implemented "
        "on CUDA: pool the larger map on the device first (e.g. "
        "torch.nn.functional.adaptive_avg_pool2d), or use device='cpu'")


def avg_unpool(g, factors, out):
    """Not on the GPU yet: ``NotImplementedError`` (see :func:`avg_pool`)."""
    avg_pool(g, factors, out)
