"""The pool of large output blocks (kdnumba/_output_pool.py): a block is
reused only when nothing references it any more, never while a caller holds
the array or anything derived from it."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from kdnumba import _output_pool
from kdnumba._output_pool import OutputPool

KIB = 1 << 10


def _pool(limit=1 << 20, min_bytes=4 * KIB):
    return OutputPool(limit, min_bytes=min_bytes)


def _address(a):
    return a.__array_interface__["data"][0]


def test_a_dropped_array_is_reused():
    pool = _pool()
    a = pool.empty((64, 32), np.float32)  # 8 KiB
    where = _address(a)
    del a
    b = pool.empty((32, 64), np.float32)  # same bytes, other shape
    assert _address(b) == where and b.shape == (32, 64) and b.dtype == np.float32
    assert b.flags.c_contiguous and b.flags.writeable


def test_a_held_array_or_a_view_of_it_is_never_reused():
    pool = _pool()
    a = pool.empty(2048, np.float64)
    b = pool.empty(2048, np.float64)
    assert not np.shares_memory(a, b)
    tail = a[1000:]           # a slice keeps the block
    a_mem = memoryview(b)     # so does any buffer export
    del a, b
    c = pool.empty(2048, np.float64)
    assert not np.shares_memory(c, tail)
    assert _address(c) != a_mem.obj.__array_interface__["data"][0]
    del tail
    d = pool.empty(2048, np.float64)  # the first block is free again
    assert not np.shares_memory(d, c)


def test_small_requests_and_a_zero_limit_are_plain_numpy():
    pool = _pool()
    small = pool.empty(10, np.float64)
    assert small.base is None
    off = _pool(limit=0)
    big = off.empty(8 * KIB, np.uint8)
    assert big.base is None
    assert off.held_bytes() == (0, 0)
    pool_of_8k = _pool(limit=8 * KIB)
    huge = pool_of_8k.empty(9 * KIB, np.uint8)  # above what the pool may keep
    assert huge.base is None and pool_of_8k.held_bytes() == (0, 0)


def test_free_blocks_beyond_the_limit_are_dropped_oldest_first():
    pool = _pool(limit=8 * KIB)
    held = [pool.empty(4 * KIB, np.uint8) for _ in range(4)]
    assert pool.held_bytes() == (0, 16 * KIB)
    del held
    pool.empty(1, np.uint8)                    # small: does not trim
    assert pool.held_bytes()[0] == 16 * KIB    # freed, not yet trimmed
    keep = pool.empty(5 * KIB, np.uint8)       # a new size: trims the free ones
    free, in_use = pool.held_bytes()
    assert free <= 8 * KIB and in_use == 5 * KIB
    assert keep.nbytes == 5 * KIB


def test_threads_never_get_overlapping_live_arrays():
    pool = _pool(limit=1 << 22)
    live, lock, errors = {}, threading.Lock(), []

    def work(seed):
        try:
            rng = np.random.default_rng(seed)
            mine = []
            for _ in range(200):
                a = pool.empty(int(rng.choice([1024, 2048])), np.float32)
                a[[0, -1]] = seed
                with lock:
                    if any(np.shares_memory(a, other) for other in live.values()):
                        errors.append("overlap")
                    live[id(a)] = a
                mine.append(a)
                if rng.random() < 0.5:  # drop one of this thread's arrays
                    gone = mine.pop(int(rng.integers(len(mine))))
                    with lock:
                        del live[id(gone)]
                    del gone
            if any(a[0] != seed or a[-1] != seed for a in mine):
                errors.append("overwritten")
        except Exception as exc:  # a failure in a thread must fail the test
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert pool.held_bytes()[0] > 0  # blocks were freed and kept for reuse


def test_bad_limit_names_the_variable(monkeypatch):
    monkeypatch.setenv("KDNUMBA_OUTPUT_POOL_MB", "lots")
    with pytest.raises(ValueError, match="KDNUMBA_OUTPUT_POOL_MB"):
        _output_pool._limit_bytes()
    monkeypatch.setenv("KDNUMBA_OUTPUT_POOL_MB", "0")
    assert _output_pool._limit_bytes() == 0


def test_a_kept_gradient_survives_the_next_call():
    # selectivity_loss at 4096 x 2048 float32 returns a 32 MiB gradient, the
    # pool's smallest size: a caller that keeps the first must find it intact.
    from kdnumba.functional import selectivity_loss
    rng = np.random.default_rng(3)
    s = rng.standard_normal((4096, 2048)).astype(np.float32)
    t = rng.standard_normal((4096, 2048)).astype(np.float32)
    _, first = selectivity_loss(s, t)
    kept = first.copy()
    _, second = selectivity_loss(t, s)
    assert not np.shares_memory(first, second)
    np.testing.assert_array_equal(first, kept)
    del first
    _, third = selectivity_loss(s, t)          # may reuse the first's block
    np.testing.assert_array_equal(third, kept)
    assert not np.shares_memory(second, third)


def test_a_fork_while_the_lock_is_held_leaves_the_child_a_working_pool():
    import os
    import signal

    from kdnumba._output_pool import MIN_BYTES, POOL
    POOL._lock.acquire()  # as if another thread were allocating at the fork
    try:
        pid = os.fork()
        if pid == 0:  # the child: a deadlock would end in SIGALRM
            signal.alarm(20)
            try:
                a = POOL.empty(MIN_BYTES, np.uint8)
                os._exit(0 if a.nbytes == MIN_BYTES else 2)
            except BaseException:
                os._exit(1)
    finally:
        POOL._lock.release()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
