"""CRD at scale: time per step against RepDistiller's computation (PyTorch CPU) at
CIFAR-100 scale, and peak extra memory at ImageNet scale.

    python bench/crd_scale.py cifar      # n_data=50,000: kdnumba vs PyTorch, same process
    python bench/crd_scale.py imagenet   # n_data=1,281,167: time and peak extra memory

A step is what RepDistiller's ``CRDLoss`` does per batch: scores, loss, both
gradients and the memory update (B=64, K=16,384, D=128, float32 banks). The
PyTorch side is ``kdnumba.reference.crd`` (RepDistiller's formulas, ``.cuda()``
removed): the ``B x (K+1) x D`` gather, ``bmm``, ``exp``, ``ContrastLoss``,
``backward()`` and the in-place momentum update. Peak extra memory is the
process's high-water RSS (``VmHWM``, reset through ``/proc/self/clear_refs``)
above its RSS once the banks exist and the kernels are compiled, and
tracemalloc's peak of NumPy allocations during the step.
"""

from __future__ import annotations

import statistics
import sys
import time
import tracemalloc

import numpy as np

B, K, D = 64, 16_384, 128


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return -1


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def batch(rng, n_data, labels):
    from kdnumba.functional.crd import ContrastSampler
    sampler = ContrastSampler(labels, K, seed=1)
    idx = rng.choice(n_data, B, replace=False)
    contrast = sampler.sample(idx)
    s = rng.standard_normal((B, D)).astype(np.float32)
    t = rng.standard_normal((B, D)).astype(np.float32)
    return s, t, idx, contrast


def kdnumba_step(memory, s, t, idx, contrast):
    from kdnumba.functional import crd_loss
    out = crd_loss(s, t, idx, contrast, memory)
    memory.update(idx, s, t)
    return out


def torch_step(memory, s, t, idx, contrast, banks):
    import torch
    from kdnumba.reference.crd import crd_loss_torch
    ts = torch.from_numpy(s).requires_grad_(True)
    tt = torch.from_numpy(t).requires_grad_(True)
    loss = crd_loss_torch(ts, tt, idx, contrast, memory)
    loss.backward()
    with torch.no_grad():  # RepDistiller's update, in place on the (shared) banks
        y = torch.from_numpy(idx)
        for bank, x in ((banks[0], ts), (banks[1], tt)):
            v = x / x.pow(2).sum(1, keepdim=True).pow(0.5)
            rows = torch.index_select(bank, 0, y) * memory.momentum + v * (1 - memory.momentum)
            bank.index_copy_(0, y, rows / rows.pow(2).sum(1, keepdim=True).pow(0.5))
    return loss.item(), ts.grad, tt.grad


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def cifar(repeats=7):
    import numba
    import torch
    from kdnumba.functional import CRDMemory
    n_data = 50_000
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(100), n_data // 100)
    memory = CRDMemory(n_data, D, seed=0)
    peer_memory = memory.copy()
    banks = (torch.from_numpy(peer_memory.memory_student),
             torch.from_numpy(peer_memory.memory_teacher))
    s, t, idx, contrast = batch(rng, n_data, labels)
    ours = kdnumba_step(memory, s, t, idx, contrast)  # compiles, sets Z
    theirs = torch_step(peer_memory, s, t, idx, contrast, banks)
    peer_memory.set_constants(memory.z_student, memory.z_teacher)
    print(f"first step: loss kdnumba {ours[0]:.6f}  torch {theirs[0]:.6f}")
    t_ours = timed(lambda: kdnumba_step(memory, s, t, idx, contrast), repeats)
    t_torch = timed(lambda: torch_step(peer_memory, s, t, idx, contrast, banks), repeats)
    print(f"n_data={n_data} B={B} K={K} D={D} float32, numba threads "
          f"{numba.get_num_threads()}, torch threads {torch.get_num_threads()}")
    print(f"  kdnumba step (loss + 2 grads + update): median {t_ours[0]*1e3:.1f} ms "
          f"(min {t_ours[1]*1e3:.1f})")
    print(f"  PyTorch RepDistiller step (fwd + bwd + update): median {t_torch[0]*1e3:.1f} ms "
          f"(min {t_torch[1]*1e3:.1f})")
    print(f"  speed-up (median): {t_torch[0] / t_ours[0]:.2f}x")


def imagenet(repeats=5):
    from kdnumba.functional import CRDMemory
    n_data = 1_281_167
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 1000, n_data)
    t0 = time.perf_counter()
    memory = CRDMemory(n_data, D, seed=0)
    banks_gb = 2 * memory.memory_student.nbytes / 1e9
    print(f"banks: {banks_gb:.2f} GB float32, built in {time.perf_counter() - t0:.1f} s")
    s, t, idx, contrast = batch(rng, n_data, labels)
    kdnumba_step(memory, s, t, idx, contrast)  # compile + constants
    base = _rss_kib("VmRSS")
    ok = _reset_hwm()
    tracemalloc.start()
    t_ours = timed(lambda: kdnumba_step(memory, s, t, idx, contrast), repeats)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    hwm = _rss_kib("VmHWM")
    print(f"n_data={n_data} B={B} K={K} D={D}: step median {t_ours[0]*1e3:.1f} ms "
          f"(min {t_ours[1]*1e3:.1f})")
    print(f"  inputs: contrast_indices {contrast.nbytes/2**20:.1f} MiB (int64, B x (K+1))")
    print(f"  tracemalloc peak during steps: {traced_peak/2**20:.2f} MiB")
    if ok:
        print(f"  peak RSS above the post-warm-up RSS: {(hwm - base)/1024:.1f} MiB "
              f"(RSS {base/2**20:.2f} GiB)")
    gather = B * (K + 1) * D * 4
    print(f"  (RepDistiller's gather alone: 2 x {gather/2**20:.0f} MiB per step)")


if __name__ == "__main__":
    {"cifar": cifar, "imagenet": imagenet}[sys.argv[1] if len(sys.argv) > 1 else "cifar"]()
