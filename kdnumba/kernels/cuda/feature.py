"""Feature (FitNets hint) matching on the GPU: fused squared difference.

The CUDA twin of ``kernels.cpu.feature``: over flat arrays, fixed chunks of
:data:`CHUNK` elements, each reduced by one block (threads stride through the
chunk, coalesced; a shared-memory tree in fixed order), write the gradient
``g = c (s - t)`` and one float64 partial ``sum (s - t)^2`` per chunk. Chunk
boundaries depend only on ``n``: deterministic. NaN/inf make a partial
non-finite, so the caller checks only the total.
"""

from __future__ import annotations

import numpy as np
from numba import cuda, types

from kdnumba.kernels.cuda import (block_reductions, block_size, compile_kernel, grid_size,
                                  is_simulator)

tree_sum, _ = block_reductions(globals())

#: Elements per partial (one block's share; smaller under the simulator).
CHUNK = 64 if is_simulator() else 8192

_SIGNATURE = "void({F}[::1], {F}[::1], {F}, {F}[::1], float64[::1])"


def _sq_diff_kernel(s, t, c, grad, partial):
    sh = cuda.shared.array(0, dtype=types.float64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    n = s.shape[0]
    for ch in range(cuda.blockIdx.x, partial.shape[0], cuda.gridDim.x):
        start = ch * CHUNK
        stop = start + CHUNK
        if stop > n:
            stop = n
        acc = 0.0
        for e in range(start + tid, stop, nt):
            d = s[e] - t[e]
            grad[e] = c * d
            d64 = np.float64(d)
            acc += d64 * d64
        sh[tid] = acc
        cuda.syncthreads()
        tree_sum(sh, 1, tid, nt)
        if tid == 0:
            partial[ch] = sh[0]
        cuda.syncthreads()


KERNELS = [(_sq_diff_kernel, _SIGNATURE)]


def n_chunks(n: int) -> int:
    """Number of partials :func:`sq_diff_chunks` writes for ``n`` elements."""
    return -(-n // CHUNK)


def sq_diff_chunks(s, t, c, grad, partial):
    """``grad = c (s - t)`` and ``partial[k] = sum (s - t)^2`` over chunk ``k``.

    ``s``, ``t``, ``grad``: flat C-contiguous device arrays of one float dtype
    ``F``; ``c`` is converted to ``F``; ``partial``: float64 ``(n_chunks(n),)``.
    """
    dtype = np.dtype(s.dtype)
    threads = block_size(CHUNK)
    compile_kernel(_sq_diff_kernel, _SIGNATURE, dtype)[
        grid_size(partial.shape[0]), threads, 0, threads * 8](
        s, t, dtype.type(c), grad, partial)
