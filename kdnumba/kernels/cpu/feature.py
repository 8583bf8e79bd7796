"""Feature (FitNets hint) matching: fused mean squared error and its gradient.

The inputs are flattened to 1-D (any shape ``(B, ...)`` is just ``n`` numbers);
one pass over fixed chunks of ``_CHUNK`` elements writes the gradient
``g = c (s - t)`` and one float64 partial ``sum (s - t)^2`` per chunk. Chunk
boundaries depend only on ``n``, never on the thread count, and the caller
reduces the partials in index order, so the loss is bit-identical for any
number of threads.
"""

from __future__ import annotations

from numba import prange

from kdnumba._policy import jit, parallel_jit

#: Elements per parallel task: large enough to amortise scheduling, small
#: enough that a (256, 256, 16, 16) tensor still yields ~1000 tasks.
_CHUNK = 16384
#: float32 partial sums run in float32 SIMD lanes for ``_BLOCK`` elements and
#: are then added to a float64 total (full vector width, 256-term rounding).
_BLOCK = 256


def n_chunks(n: int) -> int:
    """Number of partials :func:`sq_diff_chunks` writes for ``n`` elements."""
    return (n + _CHUNK - 1) // _CHUNK


@jit
def _sq_diff_block(s, t, g, c):
    """``g = c (s - t)``; returns ``sum (s - t)^2`` in the dtype of ``s``."""
    acc = c - c
    for j in range(s.shape[0]):
        d = s[j] - t[j]
        g[j] = c * d
        acc += d * d
    return acc


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
            total += _sq_diff_block(s[b0:b1], t[b0:b1], grad[b0:b1], c)
        partial[k] = total
