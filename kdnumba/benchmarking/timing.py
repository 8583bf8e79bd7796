"""Robust wall-clock timing for a noisy, shared machine.

Several implementations of one workload are timed in *rounds*: in every
round each implementation runs one untimed call if its calls are short (so a
thread pool that another implementation left asleep or busy is awake again),
then a block of samples. Spreading every implementation over several rounds means a burst of
load from another process hits all of them rather than one; timing in blocks
rather than alternating call by call keeps one library's spinning worker
threads (Numba's OpenMP pool, PyTorch's) from slowing the other's next call.

A sample is the mean of ``number`` back-to-back calls, with ``number`` chosen
so that a sample lasts at least ``sample_s`` (calls of a few microseconds are
otherwise near the timer's resolution). An implementation is done once it has
at least ``min_repeats`` samples *and* ``min_time_s`` of samples, or after
``max_time_s``; each round gives it a ``1/rounds`` share of those quotas
(an implementation whose single call exceeds its share gets one sample).

The minimum of the samples is the figure least disturbed by other processes
(noise only ever adds time); the median says what a typical call costs on
this machine now. Reports give both. On a machine with 2 cores, any other
busy process can stall one of the two threads of a parallel kernel for a
scheduler time slice (milliseconds), so medians there are unreliable and
minima are the figures to compare.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class TimingPolicy:
    """How long and how often to sample (see the module docstring)."""

    min_repeats: int = 20
    min_time_s: float = 1.0
    max_time_s: float = 15.0
    sample_s: float = 2e-3
    max_number: int = 10_000
    rounds: int = 4


#: Calls shorter than this get an untimed call at the start of each round
#: (waking a sleeping thread pool costs up to a few ms); longer calls do not
#: need one, and with calls of seconds it would double the run time.
WAKE_BELOW_S = 0.05

FULL = TimingPolicy()
QUICK = TimingPolicy(min_repeats=6, min_time_s=0.15, max_time_s=2.0, sample_s=1e-3, rounds=2)


@dataclass
class Timing:
    """Result of timing one implementation; times are seconds per call."""

    min_s: float
    median_s: float
    repeats: int
    number: int
    first_call_s: float
    spread: float  # median / min - 1: how noisy the samples were

    def as_dict(self) -> dict:
        return asdict(self)


class _Sampler:
    def __init__(self, label: str, fn: Callable[[], Any]):
        self.label = label
        self.fn = fn
        self.samples: list[float] = []
        self.spent = 0.0
        self.number = 1
        self.first_call_s = math.nan
        self.wake = True

    def sample(self) -> None:
        fn = self.fn
        n = self.number
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        self.spent += dt
        self.samples.append(dt / n)


def _median(values: list[float]) -> float:
    v = sorted(values)
    k = len(v)
    return v[k // 2] if k % 2 else 0.5 * (v[k // 2 - 1] + v[k // 2])


def time_interleaved(impls: dict[str, Callable[[], Any]],
                     policy: TimingPolicy = FULL) -> dict[str, Timing]:
    """Time zero-argument callables, interleaved; ``label -> Timing``.

    The first call of each is timed on its own (``first_call_s``: in-process
    compilation, cache loading or lazy initialisation) and then excluded.
    """
    samplers = [_Sampler(label, fn) for label, fn in impls.items()]
    for s in samplers:  # first call, then one timed call that sets ``number``
        t0 = time.perf_counter()
        s.fn()
        s.first_call_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        s.fn()
        once = max(time.perf_counter() - t0, 1e-9)
        s.number = max(1, min(policy.max_number, math.ceil(policy.sample_s / once)))
        if s.number == 1:  # a call long enough to be a sample on its own
            s.samples.append(once)
            s.spent += once
        s.wake = once < WAKE_BELOW_S

    rounds = max(1, policy.rounds)
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(1, rounds + 1):
            # Cumulative quotas at the end of round r.
            want_n = math.ceil(policy.min_repeats * r / rounds)
            want_t = policy.min_time_s * r / rounds
            cap_t = policy.max_time_s * r / rounds
            for s in samplers:
                if s.samples and s.spent >= cap_t:
                    continue  # slow implementation: out of time for this round
                if s.wake:
                    s.fn()  # untimed: wake this implementation's threads and caches
                while True:
                    s.sample()
                    if (len(s.samples) >= want_n and s.spent >= want_t) or s.spent >= cap_t:
                        break
    finally:
        if gc_was_enabled:
            gc.enable()

    out = {}
    for s in samplers:
        lo = min(s.samples)
        med = _median(s.samples)
        out[s.label] = Timing(min_s=lo, median_s=med, repeats=len(s.samples),
                              number=s.number, first_call_s=s.first_call_s,
                              spread=med / lo - 1.0)
    return out


def time_one(fn: Callable[[], Any], policy: TimingPolicy = FULL) -> Timing:
    """:func:`time_interleaved` for a single callable."""
    return time_interleaved({"fn": fn}, policy)["fn"]
