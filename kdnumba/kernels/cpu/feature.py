"""Feature (FitNets hint) matching: fused mean squared error and its gradient.

The inputs are flattened to 1-D (any shape ``(B, ...)`` is just ``n`` numbers);
one parallel pass over fixed chunks of ``_CHUNK`` elements writes the
gradient ``g = c (s - t)`` and one float64 partial ``sum (s - t)^2`` per
chunk (by ``reductions.lane_dot``: fixed-order SIMD lanes per block). Chunk
boundaries depend only on ``n``, never on the thread count, and the caller
reduces the partials in index order, so the loss is bit-identical for any
number of threads.
"""

from __future__ import annotations

from numba import prange

from kdnumba._policy import parallel_jit
from kdnumba.kernels.cpu.reductions import lane_dot

#: Elements per parallel task: large enough to amortise scheduling, small
#: enough that a (256, 256, 16, 16) tensor still yields ~1000 tasks.
_CHUNK = 16384
#: Elements per block inside a chunk: the block's differences stay in L1
#: between the three element-wise passes below.
_BLOCK = 1024


def n_chunks(n: int) -> int:
    """Number of partials :func:`sq_diff_chunks` writes for ``n`` elements."""
    return (n + _CHUNK - 1) // _CHUNK


@parallel_jit
def sq_diff_chunks(s, t, c, grad, partial):
    """Fused squared difference over flat arrays.

    Parameters (``F`` is the dtype of ``s``):
        s, t: ``(n,)`` F, contiguous.
        c: F, the gradient factor (``2 / n`` for a mean).
        grad: ``(n,)`` F output, ``c (s - t)``.
        partial: ``(n_chunks(n),)`` float64 output, ``sum (s - t)^2`` per chunk.

    NaN/inf in ``s`` or ``t`` make the chunk's partial non-finite (the policy
    never grants ``nnan``/``ninf``), so the caller only checks the total.
    """
    n = s.shape[0]
    for k in prange(partial.shape[0]):
        start = k * _CHUNK
        stop = min(n, start + _CHUNK)
        total = 0.0
        for b0 in range(start, stop, _BLOCK):
            b1 = min(stop, b0 + _BLOCK)
            # d = s - t into the gradient's memory, sum d^2 with fixed-order
            # SIMD lanes (a running scalar sum would not vectorise: the policy
            # grants no reassoc), then scale in place: g = c * d bit for bit.
            for j in range(b0, b1):
                grad[j] = s[j] - t[j]
            d = grad[b0:b1]
            total += lane_dot(d, d)
            for j in range(b0, b1):
                grad[j] *= c
        partial[k] = total
