"""Contrastive losses on the GPU: tiled similarities + online log-sum-exp, no ``B x B``.

The CUDA twin of ``kernels.cpu.contrastive``: the softmax losses (NT-Xent,
supervised contrastive, InfoNCE) and the batch-hard triplet loss
(:func:`triplet`, see its kernels' docstrings). Same notation: *anchors* ``a_i`` (normalised
rows scaled by ``1/tau``), *candidates* ``c_j`` (normalised rows), logits
``z_ij = a_i . c_j``.

:func:`softmax_tiles` is a flash-attention-style kernel. A block owns
``TILE`` rows and streams over the columns in tiles of ``TILE``: the
``TILE x TILE`` logits come from ``TILE``-wide chunks of the embedding
staged in shared memory (thread ``(r, c)`` computes ``z_rc``); then either

* ``ONLINE`` (rows = anchors): each row keeps a running maximum ``m`` and
  sum ``S`` of ``exp(z - m)`` (rescaled when ``m`` grows, added in column
  order by one thread per row), and optionally the float64 accumulator
  ``acc_i = sum_j exp(z_ij - m_i) c_j`` (rescaled alike) -- so that
  ``lse_i = m_i + log S_i`` and ``sum_j p_ij c_j = acc_i / S_i``; or
* ``FIXED`` (rows = candidates, columns = anchors, ``lse`` known from an
  ``ONLINE`` pass): ``acc_j = sum_i exp(z_ij - lse_i) a_i`` -- the
  candidate side of InfoNCE's gradient.

Every row is owned by one block and every accumulator element by one
thread, columns are visited in order: deterministic, no atomics, memory
``O((B + K) D)``. The finishing kernels (:func:`finish_student_anchored`,
:func:`finish_teacher_anchored`) apply the positive term and the chain rule
through the clamped normalisation ``x_hat = x / max(||x||, EPS)``, one thread
per row (``O(B D)`` work, negligible next to the ``O(B^2 D)`` tiles).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, types

from kdnumba.kernels.cuda import block_size, compile_kernel, float_name, grid_size, is_simulator

#: SPEC's norm clamp (same as the CPU kernels).
EPS = 1e-12

#: Modes of :func:`softmax_tiles`.
ONLINE = 0
FIXED = 1

#: Rows per block and columns per tile (a TILE x TILE thread block); fixed at
#: import because shared arrays need compile-time shapes.
TILE = 4 if is_simulator() else 16

_F64_MAX = float(np.finfo(np.float64).max)

# Kernels here avoid the ``min``/``max`` builtins: numba 0.68's CUDA target
# fails to compile their vararg overloads (the simulator does not notice).


# --- row norms, normalisation, class means --------------------------------------------

_NORMS_SIG = "void({F}[:, ::1], float64[::1])"


def _norms_kernel(x, out):
    """One thread per row (O(B D) work, negligible next to the tiles; no
    barriers). Overflow-safe like the CPU kernel."""
    n, dim = x.shape
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        acc = 0.0
        for k in range(dim):
            v = np.float64(x[i, k])
            acc += v * v
        if not (acc <= _F64_MAX):
            # NaN/inf (stays non-finite) or float64 overflow of huge finite
            # entries: rescale by the largest magnitude.
            big = 0.0
            for k in range(dim):
                v = abs(np.float64(x[i, k]))
                if v > big:
                    big = v
            if big <= _F64_MAX and big > 0.0:
                acc = 0.0
                for k in range(dim):
                    v = np.float64(x[i, k]) / big
                    acc += v * v
                out[i] = big * math.sqrt(acc)
                continue
        out[i] = math.sqrt(acc)


_NORMALIZE_SIG = "void({F}[:, ::1], float64[::1], float64, {F}[:, ::1])"


def _normalize_kernel(x, norms, scale, out):
    n, dim = x.shape
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for e in range(start, n * dim, step):
        i = e // dim
        k = e % dim
        nrm = norms[i]
        out[i, k] = x[i, k] * out.dtype.type(scale / (nrm if nrm > EPS else EPS))


_CLASS_MEANS_SIG = "void({F}[:, ::1], float64[::1], int64[::1], int64[::1], {F}[:, ::1])"


def _class_means_kernel(t, t_norms, members, starts, out):
    dim = t.shape[1]
    for c in range(cuda.blockIdx.x, out.shape[0], cuda.gridDim.x):
        lo = starts[c]
        hi = starts[c + 1]
        for k in range(cuda.threadIdx.x, dim, cuda.blockDim.x):
            acc = 0.0
            for m in range(lo, hi):  # members of class c in row order
                row = members[m]
                nrm = t_norms[row]
                acc += np.float64(t[row, k]) / (nrm if nrm > EPS else EPS)
            out[c, k] = acc / (hi - lo)


# --- the tiled softmax -----------------------------------------------------------------

_TILES_SIG = ("void({F}[:, ::1], {F}[:, ::1], int64, int64, float64[::1], float64[::1], "
              "float64[::1], float64[:, ::1])")


def _tiles_kernel(rows, cols, mode, want_acc, lse_cols, m_out, s_out, acc):
    a_s = cuda.shared.array((TILE, TILE), dtype=rows.dtype)
    c_s = cuda.shared.array((TILE, TILE), dtype=rows.dtype)
    e_s = cuda.shared.array((TILE, TILE), dtype=types.float64)
    f_s = cuda.shared.array(TILE, dtype=types.float64)
    m_s = cuda.shared.array(TILE, dtype=types.float64)
    z_s = cuda.shared.array(TILE, dtype=types.float64)
    n_tiles = (rows.shape[0] + TILE - 1) // TILE
    for tile in range(cuda.blockIdx.x, n_tiles, cuda.gridDim.x):
        _row_tile(tile, a_s, c_s, e_s, f_s, m_s, z_s, rows, cols, mode, want_acc, lse_cols,
                  m_out, s_out, acc)
        cuda.syncthreads()


@cuda.jit(device=True)
def _tile_dot(a_s, c_s, rows, cols, i, j0, r, c, zero):
    """``rows[i] . cols[j0 + c]`` for thread ``(r, c)`` of a TILE x TILE block,
    through TILE-wide chunks of the embeddings staged in shared memory (every
    thread of the block must call it). Summed in the rows' dtype, in order."""
    n_rows, dim = rows.shape
    n_cols = cols.shape[0]
    dot = zero
    for k0 in range(0, dim, TILE):
        kk = k0 + c
        a_s[r, c] = rows[i, kk] if (i < n_rows and kk < dim) else zero
        c_s[r, c] = cols[j0 + r, kk] if (j0 + r < n_cols and kk < dim) else zero
        cuda.syncthreads()
        for q in range(TILE):
            dot += a_s[r, q] * c_s[c, q]
        cuda.syncthreads()
    return dot


@cuda.jit(device=True)
def _row_tile(tile, a_s, c_s, e_s, f_s, m_s, z_s, rows, cols, mode, want_acc, lse_cols,
              m_out, s_out, acc):
    """Rows ``tile * TILE ...`` against every column (see the module docstring)."""
    c = cuda.threadIdx.x
    r = cuda.threadIdx.y
    n_rows, dim = rows.shape
    n_cols = cols.shape[0]
    i = tile * TILE + r
    online = mode == ONLINE
    zero = rows.dtype.type(0.0)
    if c == 0:
        m_s[r] = -math.inf
        z_s[r] = 0.0
        f_s[r] = 1.0
    if want_acc != 0 and i < n_rows:
        for k in range(c, dim, TILE):
            acc[i, k] = 0.0
    for j0 in range(0, n_cols, TILE):
        j = j0 + c
        dot = _tile_dot(a_s, c_s, rows, cols, i, j0, r, c, zero)
        if online:
            e_s[r, c] = np.float64(dot) if j < n_cols else -math.inf
        else:
            e_s[r, c] = math.exp(np.float64(dot) - lse_cols[j]) if j < n_cols else 0.0
        cuda.syncthreads()
        if online and c == 0:
            # One thread per row: maximum, rescale, sum -- in column order.
            m_old = m_s[r]
            m_new = m_old
            for q in range(TILE):
                z = e_s[r, q]
                if z > m_new or z != z:
                    m_new = z
            f = math.exp(m_old - m_new) if m_old > -math.inf else 0.0
            total = z_s[r] * f
            for q in range(TILE):
                e = math.exp(e_s[r, q] - m_new)
                e_s[r, q] = e
                total += e
            z_s[r] = total
            m_s[r] = m_new
            f_s[r] = f
        cuda.syncthreads()
        if want_acc != 0 and i < n_rows:
            f = f_s[r]
            n_here = n_cols - j0 if n_cols - j0 < TILE else TILE
            for k in range(c, dim, TILE):
                v = acc[i, k] * f
                for q in range(n_here):
                    v += e_s[r, q] * cols[j0 + q, k]
                acc[i, k] = v
        cuda.syncthreads()
    if online and c == 0 and i < n_rows:
        m_out[i] = m_s[r]
        s_out[i] = z_s[r]


# --- finishing passes --------------------------------------------------------------------

_FINISH_STUDENT_SIG = ("void({F}[:, ::1], float64[::1], float64[:, ::1], float64[::1], "
                       "float64[::1], {F}[:, ::1], int64[::1], float64, float64[::1], "
                       "{F}[:, ::1])")


@cuda.jit(device=True)
def _chain(s, i, norm, g_row_dot, g, k, inv_b):
    """``d loss / d s_ik`` from ``g = d loss / d s_hat_ik`` through the clamped
    normalisation: ``(g - s_hat_ik (s_hat_i . g)) / ||s_i||`` or ``g / EPS``."""
    if norm > EPS:
        return (g - np.float64(s[i, k]) / norm * g_row_dot) / norm * inv_b
    return g * (inv_b / EPS)


def _finish_student_kernel(s, s_norms, acc, m, z, pos, pos_index, inv_tau, row_loss, grad):
    """One thread per anchor row (O(B D)): ``loss_i = lse_i - s_hat_i . pos_i / tau``,
    ``d loss / d s_hat_i = (acc_i / S_i - pos_i) / (B tau)``."""
    n, dim = s.shape
    inv_b = 1.0 / n
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        norm = s_norms[i]
        inv_n = 1.0 / (norm if norm > EPS else EPS)
        w = 1.0 / z[i]
        p = pos_index[i]
        dot = 0.0
        proj = 0.0
        for k in range(dim):
            pk = np.float64(pos[p, k])
            xk = np.float64(s[i, k]) * inv_n
            dot += xk * pk
            proj += xk * ((acc[i, k] * w - pk) * inv_tau)
        row_loss[i] = m[i] + math.log(z[i]) - dot * inv_tau
        for k in range(dim):
            g = (acc[i, k] * w - np.float64(pos[p, k])) * inv_tau
            grad[i, k] = _chain(s, i, norm, proj, g, k, inv_b)


_FINISH_TEACHER_SIG = ("void({F}[:, ::1], float64[::1], {F}[:, ::1], float64[:, ::1], "
                       "float64[::1], float64[::1], float64[::1], {F}[:, ::1])")


def _finish_teacher_kernel(s, s_norms, anchors, acc, m, z, row_loss, grad):
    """One thread per row ``i`` (anchor ``t_i`` and candidate ``s_i``):
    ``loss_i = lse_i - a_i . s_hat_i``, ``d loss / d s_hat_i = (acc_i - a_i) / B``."""
    n, dim = s.shape
    inv_b = 1.0 / n
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        norm = s_norms[i]
        inv_n = 1.0 / (norm if norm > EPS else EPS)
        dot = 0.0
        proj = 0.0
        for k in range(dim):
            ak = np.float64(anchors[i, k])
            xk = np.float64(s[i, k]) * inv_n
            dot += ak * xk
            proj += xk * (acc[i, k] - ak)
        row_loss[i] = m[i] + math.log(z[i]) - dot
        for k in range(dim):
            g = acc[i, k] - np.float64(anchors[i, k])
            grad[i, k] = _chain(s, i, norm, proj, g, k, inv_b)


# --- batch-hard triplet ----------------------------------------------------------------------

_SELECT_SIG = ("void({F}[:, ::1], float64[::1], int64[::1], boolean[::1], int64[::1], "
               "int64[::1])")


def _triplet_select_kernel(x, sq, labels, qualifies, pos_idx, neg_idx):
    """Hardest positive / negative per anchor from tiles of the Gram matrix.

    Ranking key ``||x_j||^2 - 2 x_i . x_j`` (the squared distance minus a
    per-anchor constant); positive: ``j != i`` with the anchor's label, largest
    key; negative: another label, smallest key; ties: smallest ``j`` (one
    thread per anchor scans the tile's keys in column order, strict ``>``/``<``).
    """
    a_s = cuda.shared.array((TILE, TILE), dtype=x.dtype)
    c_s = cuda.shared.array((TILE, TILE), dtype=x.dtype)
    k_s = cuda.shared.array((TILE, TILE), dtype=types.float64)
    bp_s = cuda.shared.array(TILE, dtype=types.float64)
    bn_s = cuda.shared.array(TILE, dtype=types.float64)
    jp_s = cuda.shared.array(TILE, dtype=types.int64)
    jn_s = cuda.shared.array(TILE, dtype=types.int64)
    c = cuda.threadIdx.x
    r = cuda.threadIdx.y
    n = x.shape[0]
    zero = x.dtype.type(0.0)
    for tile in range(cuda.blockIdx.x, (n + TILE - 1) // TILE, cuda.gridDim.x):
        i = tile * TILE + r
        if c == 0:
            bp_s[r] = -math.inf
            bn_s[r] = math.inf
            jp_s[r] = -1
            jn_s[r] = -1
        for j0 in range(0, n, TILE):
            dot = _tile_dot(a_s, c_s, x, x, i, j0, r, c, zero)
            j = j0 + c
            k_s[r, c] = sq[j] - 2.0 * np.float64(dot) if j < n else 0.0
            cuda.syncthreads()
            if c == 0 and i < n and qualifies[i]:
                yi = labels[i]
                for q in range(TILE):
                    jj = j0 + q
                    if jj < n:
                        key = k_s[r, q]
                        if labels[jj] == yi:
                            if jj != i and key > bp_s[r]:
                                bp_s[r] = key
                                jp_s[r] = jj
                        elif key < bn_s[r]:
                            bn_s[r] = key
                            jn_s[r] = jj
            cuda.syncthreads()
        if c == 0 and i < n:
            pos_idx[i] = jp_s[r]
            neg_idx[i] = jn_s[r]
        cuda.syncthreads()


_TRIPLET_ROWS_SIG = ("void({F}[:, ::1], float64, int64[::1], int64[::1], float64, float64, "
                     "float64[::1], float64[::1], float64[::1], float64[::1])")


def _triplet_rows_kernel(x, scale, pos_idx, neg_idx, margin, w, row_loss, d_pos, d_neg,
                         active):
    """Per anchor: exact distances from differences (float64), the hinge, and
    ``d_pos``/``d_neg`` (unscaled distances; the weight of each unit vector is
    ``w / d``, 0 where ``d == 0``); ``active = 1.0`` where the hinge is positive."""
    n, dim = x.shape
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        row_loss[i] = 0.0
        active[i] = 0.0
        d_pos[i] = 0.0
        d_neg[i] = 0.0
        jp = pos_idx[i]
        jn = neg_idx[i]
        if jp < 0:
            continue
        ap = 0.0
        an = 0.0
        for k in range(dim):
            xi = np.float64(x[i, k])
            dp = xi - np.float64(x[jp, k])
            dn = xi - np.float64(x[jn, k])
            ap += dp * dp
            an += dn * dn
        dp_raw = math.sqrt(ap)
        dn_raw = math.sqrt(an)
        d_pos[i] = dp_raw
        d_neg[i] = dn_raw
        h = scale * dp_raw - scale * dn_raw + margin
        if h > 0.0:
            row_loss[i] = h * w
            active[i] = 1.0


_TRIPLET_GRAD_SIG = ("void({F}[:, ::1], int64[::1], int64[::1], float64[::1], float64[::1], "
                     "float64[::1], int64[::1], int64[::1], int64[::1], int64[::1], float64, "
                     "{F}[:, ::1])")


@cuda.jit(device=True)
def _unit(x, a, b, k, d):
    """``(x_a - x_b)_k / d`` (0 when ``d == 0``: coincident points)."""
    if d > 0.0:
        return (np.float64(x[a, k]) - np.float64(x[b, k])) / d
    return 0.0


def _triplet_grad_kernel(x, pos_idx, neg_idx, d_pos, d_neg, active, pos_members, pos_starts,
                         neg_members, neg_starts, w, grad):
    """Gather, one thread per element ``(j, k)``: row ``j``'s own hinge
    ``u_jp - u_jn``, minus ``u_ij`` for anchors ``i`` whose hardest positive is
    ``j``, plus ``u_ij`` for anchors whose hardest negative is ``j`` (active
    anchors only; lists in anchor order) -- no scatter, no atomics."""
    n, dim = x.shape
    for e in range(cuda.grid(1), n * dim, cuda.gridsize(1)):
        j = e // dim
        k = e % dim
        g = 0.0
        if active[j] != 0.0:
            g += _unit(x, j, pos_idx[j], k, d_pos[j]) - _unit(x, j, neg_idx[j], k, d_neg[j])
        for m in range(pos_starts[j], pos_starts[j + 1]):
            i = pos_members[m]
            g -= _unit(x, i, j, k, d_pos[i])
        for m in range(neg_starts[j], neg_starts[j + 1]):
            i = neg_members[m]
            g += _unit(x, i, j, k, d_neg[i])
        grad[j, k] = g * w


_SCALE_SIG = "void({F}[:, ::1], float64, {F}[:, ::1])"


def _scale_kernel(x, factor, out):
    n, dim = x.shape
    for e in range(cuda.grid(1), n * dim, cuda.gridsize(1)):
        out[e // dim, e % dim] = x[e // dim, e % dim] * out.dtype.type(factor)


KERNELS = [(_norms_kernel, _NORMS_SIG), (_normalize_kernel, _NORMALIZE_SIG),
           (_class_means_kernel, _CLASS_MEANS_SIG), (_tiles_kernel, _TILES_SIG),
           (_finish_student_kernel, _FINISH_STUDENT_SIG),
           (_finish_teacher_kernel, _FINISH_TEACHER_SIG),
           (_triplet_select_kernel, _SELECT_SIG), (_triplet_rows_kernel, _TRIPLET_ROWS_SIG),
           (_triplet_grad_kernel, _TRIPLET_GRAD_SIG), (_scale_kernel, _SCALE_SIG)]


def _kernel(pyfunc, signature, dtype):
    return compile_kernel(pyfunc, signature.format(F=float_name(dtype)))


# --- launchers ------------------------------------------------------------------------------

def norms(x):
    """Row norms (float64 device vector); NaN/inf rows give a non-finite norm."""
    n = x.shape[0]
    out = cuda.device_array(n, dtype=np.float64)
    threads = block_size(n, items_per_thread=1)
    _kernel(_norms_kernel, _NORMS_SIG, x.dtype)[grid_size(-(-n // threads)), threads](x, out)
    return out


def normalized(x, x_norms, scale, out=None):
    """``x_i * scale / max(||x_i||, EPS)`` in ``x``'s dtype (into ``out`` if given)."""
    n, dim = x.shape
    if out is None:
        out = cuda.device_array((n, dim), dtype=x.dtype)
    threads = block_size(n * dim, items_per_thread=1)
    blocks = grid_size(min(-(-n * dim // threads), 4096))
    _kernel(_normalize_kernel, _NORMALIZE_SIG, x.dtype)[blocks, threads](
        x, x_norms, float(scale), out)
    return out


def class_means(t, t_norms, members, starts):
    """``mu_c = mean_{i in class c} t_hat_i`` in ``t``'s dtype; ``members``: row
    indices grouped by class (row order inside a class), ``starts``: CSR offsets."""
    n_classes = starts.shape[0] - 1
    dim = t.shape[1]
    out = cuda.device_array((n_classes, dim), dtype=t.dtype)
    threads = block_size(dim, items_per_thread=4)
    _kernel(_class_means_kernel, _CLASS_MEANS_SIG, t.dtype)[grid_size(n_classes), threads](
        t, t_norms, members, starts, out)
    return out


def softmax_tiles(rows, cols, mode, *, lse_cols=None, want_acc=True):
    """Run the tiled softmax kernel (see the module docstring).

    Returns ``(m, s, acc)``: for ``ONLINE`` the per-row maximum and rescaled
    sum (``lse = m + log s``), and ``acc`` (``(R, D)`` float64, or ``None``
    when not wanted); for ``FIXED`` ``(None, None, acc)``.
    """
    n_rows, dim = rows.shape
    m = cuda.device_array(n_rows, dtype=np.float64)
    s = cuda.device_array(n_rows, dtype=np.float64)
    acc = cuda.device_array((n_rows, dim) if want_acc else (1, 1), dtype=np.float64)
    lse = lse_cols if lse_cols is not None else m
    _kernel(_tiles_kernel, _TILES_SIG, rows.dtype)[grid_size(-(-n_rows // TILE)), (TILE, TILE)](
        rows, cols, int(mode), int(want_acc), lse, m, s, acc)
    if mode == ONLINE:
        return m, s, (acc if want_acc else None)
    return None, None, acc


def _rows_launch(n):
    threads = block_size(n, items_per_thread=1)
    return grid_size(-(-n // threads)), threads


def finish_student_anchored(s, s_norms, acc, m, z, pos, pos_index, inv_tau):
    """``(row_loss, grad)`` of the student-anchored losses (device arrays)."""
    n, dim = s.shape
    row_loss = cuda.device_array(n, dtype=np.float64)
    grad = cuda.device_array((n, dim), dtype=s.dtype)
    _kernel(_finish_student_kernel, _FINISH_STUDENT_SIG, s.dtype)[_rows_launch(n)](
        s, s_norms, acc, m, z, pos, pos_index, float(inv_tau), row_loss, grad)
    return row_loss, grad


def finish_teacher_anchored(s, s_norms, anchors, acc, m, z):
    """``(row_loss, grad)`` of teacher-anchored InfoNCE (device arrays)."""
    n, dim = s.shape
    row_loss = cuda.device_array(n, dtype=np.float64)
    grad = cuda.device_array((n, dim), dtype=s.dtype)
    _kernel(_finish_teacher_kernel, _FINISH_TEACHER_SIG, s.dtype)[_rows_launch(n)](
        s, s_norms, anchors, acc, m, z, row_loss, grad)
    return row_loss, grad


def student_anchored(s, s_norms, cand, cand_norms, pos, pos_index, temperature):
    """NT-Xent / supervised contrastive on device arrays: ``(row_loss, grad)``.

    ``cand``: ``(N, D)`` un-normalised candidates (teacher rows, then queued
    negatives); ``pos``: ``None`` (anchor ``i``'s positive is normalised
    candidate ``i``) or ``(P, D)`` normalised/averaged positives;
    ``pos_index``: ``(B,)`` int64 device array indexing them.
    """
    inv_tau = 1.0 / temperature
    anchors = normalized(s, s_norms, inv_tau)
    cand_hat = normalized(cand, cand_norms, 1.0)
    m, z, acc = softmax_tiles(anchors, cand_hat, ONLINE)
    return finish_student_anchored(s, s_norms, acc, m, z,
                                   cand_hat if pos is None else pos, pos_index, inv_tau)


def teacher_anchored(s, s_norms, t, t_norms, neg, neg_norms, temperature):
    """InfoNCE (teacher anchors, student + optional constant candidates): ``(row_loss, grad)``."""
    n, dim = s.shape
    n_neg = 0 if neg is None else neg.shape[0]
    anchors = normalized(t, t_norms, 1.0 / temperature)
    cand = cuda.device_array((n + n_neg, dim), dtype=s.dtype)
    normalized(s, s_norms, 1.0, out=cand[:n])
    if n_neg:
        normalized(neg, neg_norms, 1.0, out=cand[n:])
    m, z, _ = softmax_tiles(anchors, cand, ONLINE, want_acc=False)
    lse = cuda.device_array(n, dtype=np.float64)
    _lse(m, z, lse)
    _, _, acc = softmax_tiles(cand[:n], anchors, FIXED, lse_cols=lse)
    return finish_teacher_anchored(s, s_norms, anchors, acc, m, z)


_LSE_SIG = "void(float64[::1], float64[::1], float64[::1])"


def _lse_kernel(m, z, out):
    i = cuda.grid(1)
    if i < out.shape[0]:
        out[i] = m[i] + math.log(z[i])


KERNELS.append((_lse_kernel, _LSE_SIG))


def _lse(m, z, out):
    n = out.shape[0]
    threads = block_size(n, items_per_thread=1)
    compile_kernel(_lse_kernel, _LSE_SIG)[-(-n // threads), threads](m, z, out)


def _flat(n):
    threads = block_size(n, items_per_thread=1)
    return grid_size(min(-(-n // threads), 65535)), threads


def triplet(s, s_norms_host, labels, qualifies, n_qualifying, margin):
    """Batch-hard triplet loss on device arrays: ``(row_loss, grad)``.

    ``s_norms_host``: the rows' norms (NumPy, to pick the power-of-two scale);
    ``labels``: int64 ``(B,)`` and ``qualifies``: bool ``(B,)`` (NumPy; the
    class bookkeeping is host work); ``n_qualifying >= 1``. Rows are rescaled
    by a power of two (exact) so that selection and distances run on rows of
    norm <= 1, as on the CPU.
    """
    n, dim = s.shape
    dtype = np.dtype(s.dtype)
    max_norm = float(np.max(s_norms_host))
    exponent = math.frexp(max_norm)[1] if max_norm > 0.0 else 0
    scale = math.ldexp(1.0, exponent)
    x = cuda.device_array((n, dim), dtype=dtype)
    _kernel(_scale_kernel, _SCALE_SIG, dtype)[_flat(n * dim)](s, math.ldexp(1.0, -exponent), x)
    sq = cuda.to_device(((s_norms_host / scale) ** 2).astype(dtype).astype(np.float64))
    d_labels = cuda.to_device(np.ascontiguousarray(labels, dtype=np.int64))
    pos_idx = cuda.device_array(n, dtype=np.int64)
    neg_idx = cuda.device_array(n, dtype=np.int64)
    _kernel(_triplet_select_kernel, _SELECT_SIG, dtype)[
        grid_size(-(-n // TILE)), (TILE, TILE)](
        x, sq, d_labels, cuda.to_device(np.ascontiguousarray(qualifies, dtype=np.bool_)),
        pos_idx, neg_idx)
    row_loss, d_pos, d_neg, active = (cuda.device_array(n, dtype=np.float64) for _ in range(4))
    w = 1.0 / n_qualifying
    _kernel(_triplet_rows_kernel, _TRIPLET_ROWS_SIG, dtype)[_flat(n)](
        x, scale, pos_idx, neg_idx, float(margin), w, row_loss, d_pos, d_neg, active)
    # Who receives which unit vector: CSR lists by target row, in anchor order
    # (B integers on the host; the gradient then gathers without atomics).
    p_host, n_host = pos_idx.copy_to_host(), neg_idx.copy_to_host()
    on = active.copy_to_host() != 0.0
    lists = []
    for target in (p_host, n_host):
        anchors = np.flatnonzero(on)
        order = np.argsort(target[anchors], kind="stable")
        members = anchors[order].astype(np.int64)
        starts = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(target[anchors], minlength=n), out=starts[1:])
        lists += [cuda.to_device(members if members.size else np.zeros(1, np.int64)),
                  cuda.to_device(starts)]
    grad = cuda.device_array((n, dim), dtype=dtype)
    _kernel(_triplet_grad_kernel, _TRIPLET_GRAD_SIG, dtype)[_flat(n * dim)](
        x, pos_idx, neg_idx, d_pos, d_neg, active, *lists, w, grad)
    return row_loss, grad
