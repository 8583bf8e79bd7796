"""GPU benchmarks (pytest-benchmark): kdnumba's CUDA kernels vs PyTorch CUDA.

Skipped unless a real CUDA GPU is usable (never under the simulator). Run::

    python -m pytest bench/test_bench_cuda.py --benchmark-enable \
        --benchmark-group-by=group --benchmark-columns=min,median,max

Timing rules:

* inputs are device arrays created once, outside the timed region; every
  timed call ends with ``numba.cuda.synchronize()`` (and for PyTorch
  ``torch.cuda.synchronize()``), so the figure is the device work plus the
  launch overhead, with host <-> device transfers excluded;
* the transfers are timed separately (``test_transfers``): host -> device of
  the inputs and device -> host of the gradient, as a user with host arrays
  and ``device="cuda"`` would pay them;
* each case records in ``extra_info`` the bytes that must cross memory
  (inputs read + gradient written) and the achieved fraction of the GPU's
  peak memory bandwidth (from the device's memory clock and bus width, or
  ``KDNUMBA_GPU_PEAK_GBPS`` if set).

Targets of issue 6: KD loss+gradient at B=8192, C=32000 float32 at >= 60 % of
peak bandwidth and faster than PyTorch (``F.kl_div`` + ``F.cross_entropy`` +
``backward``); NT-Xent at B=65536, D=128 without the dense matrix, and faster
than PyTorch at B=16384. Record the figures, the GPU and the date in
``docs/benchmarks.md``.
"""

from __future__ import annotations

import functools
import os
import time

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("CUDA benchmarks need a real GPU, not the simulator", allow_module_level=True)

from kdnumba import _dispatch  # noqa: E402

_REASON = _dispatch.cuda_unavailable_reason()
if _REASON is not None:
    pytest.skip(f"no usable CUDA GPU: {_REASON}", allow_module_level=True)

from numba import cuda  # noqa: E402

from kdnumba.reference.response import kd_loss_torch  # noqa: E402
from kdnumba.functional import (  # noqa: E402
    attention_transfer,
    feature_loss,
    kd_loss,
    nt_xent,
    selectivity_loss,
)

TEMPERATURE, ALPHA = 3.0, 0.3


def _peak_bandwidth() -> float | None:
    """Peak memory bandwidth in bytes/s, or ``None`` if unknown."""
    env = os.environ.get("KDNUMBA_GPU_PEAK_GBPS")
    if env:
        return float(env) * 1e9
    dev = cuda.get_current_device()
    try:
        clock_khz = dev.MEMORY_CLOCK_RATE
        bus_bits = dev.GLOBAL_MEMORY_BUS_WIDTH
    except Exception:  # attribute names differ between numba versions
        return None
    return 2.0 * clock_khz * 1e3 * bus_bits / 8.0  # DDR: two transfers per clock


def _record(benchmark, bytes_moved: int):
    peak = _peak_bandwidth()
    name = cuda.get_current_device().name
    benchmark.extra_info["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
    benchmark.extra_info["bytes_moved"] = bytes_moved
    stats = getattr(benchmark, "stats", None)
    if stats is not None and peak:
        seconds = stats.stats.min
        benchmark.extra_info["achieved_GBps"] = bytes_moved / seconds / 1e9
        benchmark.extra_info["fraction_of_peak"] = bytes_moved / seconds / peak


def _synced(fn):
    def run():
        result = fn()
        cuda.synchronize()
        return result
    return run


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


# --- response KD ------------------------------------------------------------------------

KD_SHAPES = [(8192, 32000), (4096, 1000)]


def _kd_inputs(n_rows, n_cols, seed=0):
    rng = np.random.default_rng(seed)
    s = (2.0 * rng.standard_normal((n_rows, n_cols))).astype(np.float32)
    t = (s + rng.standard_normal((n_rows, n_cols))).astype(np.float32)
    y = rng.integers(0, n_cols, n_rows)
    return s, t, y


@pytest.mark.parametrize("shape", KD_SHAPES, ids=lambda s: f"B{s[0]}_C{s[1]}")
def test_kd_loss_kdnumba(benchmark, shape):
    benchmark.group = f"kd_loss/{shape[0]}x{shape[1]}/float32"
    s, t, y = _kd_inputs(*shape)
    ds, dt, dy = cuda.to_device(s), cuda.to_device(t), cuda.to_device(y)
    out = cuda.device_array_like(ds)
    run = _synced(lambda: kd_loss(ds, dt, dy, temperature=TEMPERATURE, alpha=ALPHA,
                                  device="cuda", out=out))
    run()  # compile
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
    _record(benchmark, 3 * s.nbytes + y.nbytes)


@pytest.mark.parametrize("shape", KD_SHAPES, ids=lambda s: f"B{s[0]}_C{s[1]}")
def test_kd_loss_torch(benchmark, shape):
    torch = _torch_cuda()
    if torch is None:
        pytest.skip("PyTorch with CUDA is not installed")
    benchmark.group = f"kd_loss/{shape[0]}x{shape[1]}/float32"
    s, t, y = _kd_inputs(*shape)
    ts = torch.tensor(s, device="cuda", requires_grad=True)
    tt = torch.tensor(t, device="cuda")
    ty = torch.tensor(y, device="cuda")
    kd = functools.partial(kd_loss_torch, temperature=TEMPERATURE, alpha=ALPHA)

    def run():
        ts.grad = None
        loss = kd(ts, tt, ty)
        loss.backward()
        torch.cuda.synchronize()
        return float(loss)

    run()
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
    _record(benchmark, 3 * s.nbytes + y.nbytes)


def test_transfers(benchmark):
    """Host <-> device copies a host-array user pays with ``device="cuda"``."""
    benchmark.group = "transfers/kd_loss 8192x32000 float32"
    s, t, y = _kd_inputs(8192, 32000)
    grad = cuda.device_array_like(s)

    def run():
        t0 = time.perf_counter()
        cuda.to_device(s)
        cuda.to_device(t)
        cuda.to_device(y)
        cuda.synchronize()
        t1 = time.perf_counter()
        grad.copy_to_host()
        cuda.synchronize()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    h2d, d2h = run()
    benchmark.pedantic(run, rounds=5, iterations=1)
    benchmark.extra_info["host_to_device_s"] = h2d
    benchmark.extra_info["device_to_host_s"] = d2h
    benchmark.extra_info["bytes_h2d"] = 2 * s.nbytes + y.nbytes
    benchmark.extra_info["bytes_d2h"] = s.nbytes


# --- NT-Xent ---------------------------------------------------------------------------------

def _nt_xent_inputs(n_rows, seed=1):
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((n_rows, 128)).astype(np.float32)
    t = (s + 0.3 * rng.standard_normal((n_rows, 128))).astype(np.float32)
    return s, t


@pytest.mark.parametrize("n_rows", [16384, 65536])
def test_nt_xent_kdnumba(benchmark, n_rows):
    benchmark.group = f"nt_xent/B{n_rows}_D128/float32"
    s, t = _nt_xent_inputs(n_rows)
    ds, dt = cuda.to_device(s), cuda.to_device(t)
    run = _synced(lambda: nt_xent(ds, dt, temperature=0.07, device="cuda"))
    run()
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["flops"] = 4 * n_rows * n_rows * 128
    _record(benchmark, 3 * s.nbytes)


@pytest.mark.parametrize("n_rows", [16384])
def test_nt_xent_torch(benchmark, n_rows):
    torch = _torch_cuda()
    if torch is None:
        pytest.skip("PyTorch with CUDA is not installed")
    F = torch.nn.functional
    benchmark.group = f"nt_xent/B{n_rows}_D128/float32"
    s, t = _nt_xent_inputs(n_rows)
    ts = torch.tensor(s, device="cuda", requires_grad=True)
    tt = torch.tensor(t, device="cuda")
    target = torch.arange(n_rows, device="cuda")

    def run():
        ts.grad = None
        logits = F.normalize(ts, dim=1) @ F.normalize(tt, dim=1).T / 0.07
        loss = F.cross_entropy(logits, target)
        loss.backward()
        torch.cuda.synchronize()
        return float(loss)

    run()
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    _record(benchmark, 3 * s.nbytes)


# --- the other families (device arrays, kernel time only) ------------------------------------

#: benchmark group -> (seed, shape of student and teacher, the call on device arrays)
FAMILY_CASES = {
    "selectivity/variance/B4096_N4096/float32": (
        2, (4096, 4096), lambda s, t: selectivity_loss(s, t, metric="variance", device="cuda")),
    "feature/256x256x16x16/float32": (
        3, (256, 256, 16, 16), lambda s, t: feature_loss(s, t, device="cuda")),
    "attention_transfer/128x256x32x32/float32": (
        4, (128, 256, 32, 32), lambda s, t: attention_transfer(s, t, device="cuda")),
}


@pytest.mark.parametrize("group", list(FAMILY_CASES), ids=lambda group: group.split("/")[0])
def test_family(benchmark, group):
    seed, shape, call = FAMILY_CASES[group]
    benchmark.group = group
    rng = np.random.default_rng(seed)
    s = rng.standard_normal(shape).astype(np.float32)
    t = rng.standard_normal(shape).astype(np.float32)
    ds, dt = cuda.to_device(s), cuda.to_device(t)
    run = _synced(lambda: call(ds, dt))
    run()
    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)
    _record(benchmark, 3 * s.nbytes)
