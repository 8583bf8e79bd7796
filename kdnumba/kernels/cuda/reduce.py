"""Deterministic totals of device vectors (one thread block, fixed order).

The loss of every family is a sum of per-row (or per-column) float64
partials that live on the device. :func:`total` adds them with a single
block: thread ``k`` sums elements ``k, k + nt, ...`` in index order, then a
shared-memory tree combines the threads; the order depends only on the
vector length, so the result is the same on every run. Only the total (8
bytes) crosses to the host.
"""

from __future__ import annotations

from numba import cuda, types

from kdnumba.kernels.cuda import block_reductions, block_size, compile_kernel

tree_sum, _ = block_reductions(globals())

_SIGNATURE = "void(float64[::1], float64[::1])"


def _total_kernel(values, out):
    sh = cuda.shared.array(0, dtype=types.float64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    acc = 0.0
    for k in range(tid, values.shape[0], nt):
        acc += values[k]
    sh[tid] = acc
    cuda.syncthreads()
    tree_sum(sh, 1, tid, nt)
    if tid == 0:
        out[0] = sh[0]


KERNELS = [(_total_kernel, _SIGNATURE)]


def total(values) -> float:
    """``sum(values)`` of a float64 device vector, as a Python float."""
    out = cuda.device_array(1, dtype="float64")
    threads = block_size(values.shape[0], items_per_thread=8)
    compile_kernel(_total_kernel, _SIGNATURE)[1, threads, 0, threads * 8](values, out)
    return float(out.copy_to_host()[0])
