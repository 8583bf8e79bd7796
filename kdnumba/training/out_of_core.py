"""Minibatches out of core: the chunk-then-row shuffle and a background prefetcher.

Reading a shuffled minibatch from a chunked store costs one chunk decode per
chunk it touches. A full permutation touches a new chunk for nearly every row;
:func:`chunk_shuffled_order` shuffles the chunks, then the rows within each, so
consecutive minibatches read one chunk (two at a boundary) and each chunk is
decoded once per epoch. :class:`Prefetcher` assembles the next minibatches on
a background thread while the student trains on the current one; memory is
bounded by the view's decoded chunks (two) plus ``depth`` minibatches.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import numpy as np

from kdnumba import _validation as v


def chunk_shuffled_order(rng: np.random.Generator, n: int, chunk_rows: int) -> np.ndarray:
    """A permutation of ``range(n)``: the chunks ``[k * chunk_rows, (k+1) * chunk_rows)``
    in the order ``rng.permutation(n_chunks)``, each chunk's rows in the order of
    a further ``rng.permutation`` of its length (drawn in chunk order). Same
    generator state, same order."""
    n = v.check_int(n, "n", minimum=0)
    chunk_rows = v.check_int(chunk_rows, "chunk_rows", minimum=1)
    n_chunks = -(-n // chunk_rows)
    parts = []
    for c in rng.permutation(n_chunks):
        lo = int(c) * chunk_rows
        hi = min(n, lo + chunk_rows)
        parts.append(lo + rng.permutation(hi - lo))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


class Prefetcher:
    """Iterate ``load(idx)`` over the minibatches ``order[lo:lo + batch_size]``,
    computed ``depth`` minibatches ahead on a daemon thread.

    ``load`` runs on that thread, in minibatch order; an exception it raises is
    re-raised by the iteration at that minibatch. Leaving the iteration early
    (``close()``, or the loop's exception) stops the thread.
    """

    _END = object()

    def __init__(self, load: Callable[[np.ndarray], object], order: np.ndarray,
                 batch_size: int, depth: int = 2):
        self._load = load
        self._order = order
        self._batch_size = v.check_int(batch_size, "batch_size", minimum=1)
        self._queue: queue.Queue = queue.Queue(maxsize=v.check_int(depth, "depth", minimum=1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kdnumba-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for lo in range(0, len(self._order), self._batch_size):
                idx = self._order[lo:lo + self._batch_size]
                if not self._put((idx, self._load(idx))):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put((None, exc))
            return
        self._put((None, self._END))

    def __iter__(self) -> Iterator[tuple[np.ndarray, object]]:
        try:
            while True:
                idx, item = self._queue.get()
                if idx is None:
                    if item is self._END:
                        return
                    raise item
                yield idx, item
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
