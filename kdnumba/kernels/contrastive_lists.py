"""Host-side positive lists of the contrastive losses, shared by the layers.

A softmax contrastive kernel reads, per anchor ``i``, its positive columns
``members[starts[c] : starts[c + 1]]`` with ``c = pos_class[i]``. When anchor
``i``'s positive is candidate ``i`` (NT-Xent, InfoNCE) the lists are the
diagonal; the functional layer (for either device) and the CPU InfoNCE driver
both need them, so they are built here, once per batch size.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=16)
def diagonal(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(pos_class, members, starts)`` = ``(arange(n), arange(n), arange(n + 1))``,
    int64: anchor ``i``'s positive is candidate ``i``. Cached per ``n`` (two
    ``np.arange`` cost a small call ~2 us); callers only read them."""
    index = np.arange(n, dtype=np.int64)
    return index, index, np.arange(n + 1, dtype=np.int64)
