"""Hardware bounds a kernel can be compared with.

Memory-copy bound
    A parallel Numba kernel ``c[i] = a[i] + b[i]`` reads two arrays and writes
    one -- the access pattern of a fused loss+gradient kernel, which reads
    student and teacher and writes the gradient. Run on arrays whose total
    size equals a case's ``bytes_moved`` it gives the fastest time in which
    those bytes can move here, with the data as hot in cache as the case's
    own repeated calls have it (*cache-hot bound*). Run on arrays of at least
    1 GiB in total it gives the DRAM streaming bandwidth (*DRAM bound*:
    ``bytes_moved / bandwidth``). Bytes are counted as the program sees them
    (2 read + 1 written); the hardware also reads each written line before
    writing it (write-allocate), which both the kernel and the bound pay.

GEMM bound
    ``np.matmul`` of square matrices: the machine's practical peak GFLOP/s in
    a dtype, for cases that declare ``flops``.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from kdnumba import _policy
from kdnumba.benchmarking.timing import TimingPolicy, time_one

#: Total size (2 read + 1 written) of the arrays measuring DRAM bandwidth.
DRAM_BYTES = 1 << 30


#: Elements per ``prange`` chunk. A plain ``prange`` over elements compiles
#: to a loop LLVM does not vectorise well (5x slower on cache-hot data,
#: measured); slices of a fixed size walked by a serial loop vectorise, as in
#: the row kernels being compared.
_CHUNK = 16384


@_policy.jit
def _add_block(a, b, c):
    for j in range(a.shape[0]):
        c[j] = a[j] + b[j]


@_policy.jit
def _fill_block(a, value):
    for j in range(a.shape[0]):
        a[j] = value


@_policy.parallel_jit
def _stream_add(a, b, c):
    n = a.shape[0]
    for k in prange((n + _CHUNK - 1) // _CHUNK):
        lo = k * _CHUNK
        hi = min(n, lo + _CHUNK)
        _add_block(a[lo:hi], b[lo:hi], c[lo:hi])


@_policy.parallel_jit
def _fill(a, value):
    n = a.shape[0]
    for k in prange((n + _CHUNK - 1) // _CHUNK):
        lo = k * _CHUNK
        _fill_block(a[lo:min(n, lo + _CHUNK)], value)


def _stream_arrays(total_bytes: int):
    n = max(1, -(-int(total_bytes) // 24))  # three float64 arrays
    arrays = (np.empty(n), np.empty(n), np.empty(n))
    with _policy.kernel_launch():
        for arr, value in zip(arrays, (1.0, 2.0, 0.0)):
            _fill(arr, value)  # touch every page, in parallel, before timing
    return arrays


def stream_kernel(total_bytes: int):
    """``(run, bytes)``: a zero-argument read-2-write-1 sweep over
    ``total_bytes`` in all (arrays allocated and touched once, here)."""
    a, b, c = _stream_arrays(total_bytes)
    n = a.shape[0]

    def run():
        # Same launch policy as the kernels compared with it: small sizes run
        # on the calling thread, where waking the pool would cost more.
        with _policy.kernel_launch(n):
            _stream_add(a, b, c)

    return run, 3 * a.nbytes


def stream_time(total_bytes: int, policy: TimingPolicy) -> dict:
    """Time of one read-2-write-1 sweep over ``total_bytes`` in all."""
    run, moved = stream_kernel(total_bytes)
    t = time_one(run, policy)
    return {"bytes": moved, "min_s": t.min_s, "median_s": t.median_s,
            "gbps": moved / t.min_s / 1e9, "repeats": t.repeats}


def dram_bandwidth(policy: TimingPolicy, total_bytes: int = DRAM_BYTES) -> dict:
    """Streaming bandwidth from arrays far larger than any cache."""
    # A few samples suffice: each one moves >= 1 GiB.
    slow = TimingPolicy(min_repeats=min(policy.min_repeats, 7), min_time_s=0.0,
                        max_time_s=max(1.0, policy.max_time_s / 3), sample_s=0.0, rounds=1)
    return stream_time(total_bytes, slow)


def gemm_peak(dtype, n: int = 2048, policy: TimingPolicy | None = None) -> dict:
    """Measured ``np.matmul`` GFLOP/s for ``n x n`` matrices of ``dtype``."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    c = np.empty((n, n), dtype=dtype)
    slow = TimingPolicy(min_repeats=5, min_time_s=0.0, max_time_s=3.0, sample_s=0.0, rounds=1)
    t = time_one(lambda: np.matmul(a, b, out=c), policy or slow)
    flops = 2 * n ** 3
    return {"dtype": np.dtype(dtype).name, "n": n, "min_s": t.min_s,
            "gflops": flops / t.min_s / 1e9}
