"""CRD with its memory banks in GPU memory: loss, first-batch constants and the
update agree with the CPU path (simulator or GPU; tiny shapes)."""

from __future__ import annotations

import numpy as np
import pytest

from kdnumba.functional import CRDMemory, crd_loss


def test_memory_on_the_device_matches_the_host():
    rng = np.random.default_rng(0)
    s = rng.standard_normal((3, 4))
    t = s + rng.standard_normal((3, 4))
    idx = np.array([1, 6, 1])  # a repeated row: the last occurrence wins
    contrast = rng.integers(0, 9, (3, 4))
    contrast[:, 0] = idx
    host = CRDMemory(9, 4, seed=1, dtype=np.float64)
    gpu = host.copy().to("cuda")
    ref = crd_loss(s, t, idx, contrast, host)  # sets the constants
    got = crd_loss(s, t, idx, contrast, gpu, device="cuda")
    assert gpu.z_student == pytest.approx(host.z_student, rel=1e-12)
    assert gpu.z_teacher == pytest.approx(host.z_teacher, rel=1e-12)
    assert got[0] == pytest.approx(ref[0], rel=1e-12)
    for g, r in zip(got[1:], ref[1:]):
        np.testing.assert_allclose(g, r, rtol=1e-11, atol=1e-14)
    host.update(idx, s, t)
    gpu.update(idx, s, t)
    np.testing.assert_allclose(gpu.memory_student.copy_to_host(), host.memory_student, rtol=1e-13)
    np.testing.assert_allclose(gpu.memory_teacher.copy_to_host(), host.memory_teacher, rtol=1e-13)
    assert crd_loss(s, t, idx, contrast, gpu, device="cpu")[0] == pytest.approx(
        crd_loss(s, t, idx, contrast, host)[0], rel=1e-12)
