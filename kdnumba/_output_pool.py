"""Recycled memory for large host outputs: blocks whose pages are already
faulted in.

Why: glibc serves every allocation of 32 MiB or more (its largest mmap
threshold on 64-bit Linux) with a fresh ``mmap`` and unmaps it on free, so
each call that returns such a gradient pays for the kernel zeroing every page
on first touch. On the 2-core Zen 3 machine of ``docs/benchmarks.md`` that was
2.7 ms of an 8.9 ms ``selectivity_loss`` at B=4096, N=2048 float32 (32 MiB
gradient; 6.2 ms with ``out=``). Smaller blocks are recycled by malloc
itself. A training loop asks for the same shapes every step, so the pool
hands back a block nobody references any more instead.

How a block is known to be free: every array handed out is a view of a block
the pool owns (a 1-D ``uint8`` NumPy array), and NumPy views keep their base
alive: the caller's gradient, any slice of it, ``torch.from_numpy`` of it,
a ``memoryview``. A block is free when the pool's own reference is the only
one left. Nothing has to be returned explicitly; a caller that keeps a
gradient keeps its block, and the pool allocates another. Raw pointers taken
from a dropped array (``arr.ctypes.data``) are as dangling as with any freed
NumPy array.

Limits: requests below :data:`MIN_BYTES`, or above the pool's limit, are
plain ``np.empty``; free blocks are kept up to ``KDNUMBA_OUTPUT_POOL_MB`` MiB
in all (default 512; 0 turns the pool off), least recently used dropped
first, when the next block is taken. Contents are uninitialised,
as with ``np.empty``: every user writes every element. Thread-safe (one
lock); after ``fork`` the child's blocks are its own copies, referenced as in
the parent.
"""

from __future__ import annotations

import os
import sys
import threading

import numpy as np

#: Smallest request served from the pool: glibc's largest mmap threshold (below
#: it, freed memory is reused by malloc and its pages stay mapped).
MIN_BYTES = 32 << 20

_ENV = "KDNUMBA_OUTPUT_POOL_MB"


def _limit_bytes() -> int:
    raw = os.environ.get(_ENV, "512")
    try:
        mib = float(raw)
    except ValueError:
        raise ValueError(f"{_ENV} must be a number of MiB, got {raw!r}") from None
    return max(0, int(mib * (1 << 20)))


def _references_when_unused() -> int | None:
    """``sys.getrefcount`` of a block held only by the pool's list, as
    :meth:`OutputPool._free_index` sees it; ``None`` (pool off) if a view
    does not add a reference on this interpreter."""
    blocks = [np.empty(1, np.uint8)]
    alone = sys.getrefcount(blocks[0])
    view = blocks[0][:]
    shared = sys.getrefcount(blocks[0])
    del view
    return alone if shared == alone + 1 else None


class OutputPool:
    """Blocks of ``min_bytes`` (:data:`MIN_BYTES`) or more, reused once
    unreferenced; at most ``limit_bytes`` of free blocks kept."""

    def __init__(self, limit_bytes: int, min_bytes: int = MIN_BYTES):
        self.limit_bytes = limit_bytes
        self.min_bytes = min_bytes
        self._blocks: list[np.ndarray] = []  # least recently handed out first
        self._lock = threading.Lock()
        self._unused_refs = _references_when_unused()

    def empty(self, shape, dtype) -> np.ndarray:
        """An uninitialised C-ordered array, like ``np.empty(shape, dtype)``."""
        arr = np.empty(shape, dtype)  # small requests (the hot path) stop here
        if not self._pooled(arr.nbytes):
            return arr
        return self._from_block(arr.nbytes, arr.dtype, arr.shape)  # arr's pages untouched

    def empty_like(self, like: np.ndarray) -> np.ndarray:
        """``empty(like.shape, like.dtype)``."""
        if not self._pooled(like.nbytes):
            return np.empty(like.shape, like.dtype)
        return self._from_block(like.nbytes, like.dtype, like.shape)

    def _pooled(self, nbytes: int) -> bool:
        """Whether a request of ``nbytes`` goes through the pool: at least
        ``min_bytes``, and no more than the pool may keep (a larger block
        would be dropped when freed, and kept until the next request)."""
        return (self.min_bytes <= nbytes <= self.limit_bytes
                and self._unused_refs is not None)

    def _from_block(self, nbytes: int, dtype, shape) -> np.ndarray:
        with self._lock:
            i = self._free_index(nbytes)
            block = np.empty(nbytes, np.uint8) if i is None else self._blocks.pop(i)
            self._blocks.append(block)
            self._trim()
        return block.view(dtype).reshape(shape)

    def _free_index(self, nbytes: int) -> int | None:
        """Index of the least recently used free block of exactly ``nbytes``."""
        blocks = self._blocks
        for i in range(len(blocks)):
            if blocks[i].nbytes == nbytes and sys.getrefcount(blocks[i]) == self._unused_refs:
                return i
        return None

    def _trim(self) -> None:
        """Drop the least recently used free blocks beyond the limit."""
        blocks = self._blocks
        free = [i for i in range(len(blocks))
                if sys.getrefcount(blocks[i]) == self._unused_refs]
        kept = sum(blocks[i].nbytes for i in free)
        drop = []
        for i in free:
            if kept <= self.limit_bytes:
                break
            kept -= blocks[i].nbytes
            drop.append(i)
        for i in reversed(drop):
            del blocks[i]

    def held_bytes(self) -> tuple[int, int]:
        """``(free, in_use)`` bytes of the pool's blocks (for tests and docs)."""
        with self._lock:
            blocks = self._blocks
            free = sum(blocks[i].nbytes for i in range(len(blocks))
                       if sys.getrefcount(blocks[i]) == self._unused_refs)
            return free, sum(b.nbytes for b in blocks) - free

    def _after_fork_in_child(self) -> None:
        # A thread of the parent may have held the lock at the fork; the child
        # has only the forking thread, so nobody would ever release it.
        self._lock = threading.Lock()


#: The process's pool (``HostBackend`` allocates outputs and scratch from it).
POOL = OutputPool(_limit_bytes())
os.register_at_fork(after_in_child=POOL._after_fork_in_child)
