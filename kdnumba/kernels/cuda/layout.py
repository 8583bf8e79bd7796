"""Gather kernels: copy a strided device array into a C-contiguous one, casting.

Used only when a GPU input is not already C-contiguous in the compute dtype
(a transposed view, a float64 teacher for a float32 student, int32 class
indices). One thread per element, flat index ``k`` unravelled in C order, so
the writes are coalesced. These kernels are type-generic (compiled lazily for
the array types met), unlike the family kernels: they move data, they do no
arithmetic.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from kdnumba.kernels.cuda import block_size

#: Highest rank :func:`gather` supports (activations are at most (B, C, H, W)).
MAX_NDIM = 4


@cuda.jit
def _gather1(src, dst):
    k = cuda.grid(1)
    if k < dst.shape[0]:
        dst[k] = src[k]


@cuda.jit
def _gather2(src, dst):
    k = cuda.grid(1)
    n1 = dst.shape[1]
    if k < dst.shape[0] * n1:
        i = k // n1
        j = k % n1
        dst[i, j] = src[i, j]


@cuda.jit
def _gather3(src, dst):
    k = cuda.grid(1)
    n1 = dst.shape[1]
    n2 = dst.shape[2]
    if k < dst.shape[0] * n1 * n2:
        i = k // (n1 * n2)
        r = k % (n1 * n2)
        dst[i, r // n2, r % n2] = src[i, r // n2, r % n2]


@cuda.jit
def _gather4(src, dst):
    k = cuda.grid(1)
    n1 = dst.shape[1]
    n2 = dst.shape[2]
    n3 = dst.shape[3]
    if k < dst.shape[0] * n1 * n2 * n3:
        i = k // (n1 * n2 * n3)
        r = k % (n1 * n2 * n3)
        a = r // (n2 * n3)
        r = r % (n2 * n3)
        dst[i, a, r // n3, r % n3] = src[i, a, r // n3, r % n3]


_KERNELS = {1: _gather1, 2: _gather2, 3: _gather3, 4: _gather4}

#: Representative typings, for ahead-of-time compile checks (the kernels
#: themselves compile lazily for whatever types they meet).
KERNELS = [
    (_gather1.py_func, "void(int32[:], int64[::1])"),
    (_gather2.py_func, "void(float64[:, :], {F}[:, ::1])"),
    (_gather3.py_func, "void(float32[:, :, :], {F}[:, :, ::1])"),
    (_gather4.py_func, "void(float64[:, :, :, :], {F}[:, :, :, ::1])"),
]


def gather(src, dst) -> None:
    """``dst[...] = src[...]`` (cast to ``dst.dtype``); ``dst`` C-contiguous, same shape."""
    n = int(np.prod(dst.shape))
    threads = block_size(n, items_per_thread=1)
    _KERNELS[len(dst.shape)][-(-n // threads), threads](src, dst)
