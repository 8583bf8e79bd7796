"""CRD against RepDistiller: ``crd/criterion.py`` + ``crd/memory.py`` restated in
PyTorch (``kdnumba.reference.crd``: our own code, written from reading theirs)
and differentiated by autograd; the memory update step by step; the sampler.

The generic checks (finite differences, dtypes, threads, bad input) come from
the registry through ``tests/test_contract.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdnumba.functional import CRDMemory, crd_loss
from kdnumba.functional.crd import ContrastSampler
from kdnumba.reference.crd import crd_loss_torch, crd_update_torch


def _batch(rng, rows, dim, n_data, k, dtype=np.float64, scale=1.0):
    s = (scale * rng.standard_normal((rows, dim))).astype(dtype)
    t = (s + scale * rng.standard_normal((rows, dim))).astype(dtype)
    idx = rng.choice(n_data, rows, replace=False).astype(np.int64)
    contrast = rng.integers(0, n_data, (rows, k + 1)).astype(np.int64)
    contrast[:, 0] = idx
    return s, t, idx, contrast


def _peer(s, t, idx, contrast, memory):
    """RepDistiller's loss and both gradients by autograd, in the inputs' dtype."""
    ts = torch.tensor(s, requires_grad=True)
    tt = torch.tensor(t, requires_grad=True)
    loss = crd_loss_torch(ts, tt, idx, contrast, memory)
    loss.backward()
    return loss.item(), ts.grad.numpy(), tt.grad.numpy()


def _close(got, want, rtol):
    assert got[0] == pytest.approx(want[0], rel=rtol)
    for g, w in zip(got[1:], want[1:]):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * np.abs(w).max())


@pytest.mark.parametrize("rows, dim, n_data, k, temperature", [
    (5, 6, 40, 7, 0.07), (3, 4, 9, 1, 0.5), (8, 16, 200, 31, 0.1), (4, 3, 10, 0, 0.07)])
def test_matches_repdistiller_in_float64(rows, dim, n_data, k, temperature):
    rng = np.random.default_rng(rows + k)
    s, t, idx, contrast = _batch(rng, rows, dim, n_data, k)
    memory = CRDMemory(n_data, dim, temperature=temperature, seed=1, dtype=np.float64)
    memory.set_constants(3.0 * n_data, 0.5 * n_data)
    _close(crd_loss(s, t, idx, contrast, memory), _peer(s, t, idx, contrast, memory), 1e-9)


def test_float32_matches_repdistiller():
    rng = np.random.default_rng(3)
    s, t, idx, contrast = _batch(rng, 6, 8, 50, 9, np.float32)
    memory = CRDMemory(50, 8, seed=2)  # float32 banks, as RepDistiller's
    memory.set_constants(40.0, 60.0)
    got = crd_loss(s, t, idx, contrast, memory)
    assert got[1].dtype == got[2].dtype == np.float32
    _close(got, _peer(s, t, idx, contrast, memory), 2e-4)


def test_first_batch_sets_the_constants_then_they_stay():
    rng = np.random.default_rng(4)
    s, t, idx, contrast = _batch(rng, 5, 6, 30, 8)
    memory = CRDMemory(30, 6, seed=5, dtype=np.float64)
    assert memory.z_student is None and memory.z_teacher is None
    peer = _peer(s, t, idx, contrast, memory.copy())  # RepDistiller's first call: Z from it
    got = crd_loss(s, t, idx, contrast, memory)
    _close(got, peer, 1e-9)
    # Z_v1 = mean(out_v1) * n_data, student anchors against the teacher bank
    unit = s / np.linalg.norm(s, axis=1, keepdims=True)
    dots = np.einsum("bkd,bd->bk", memory.memory_teacher[contrast], unit)
    assert memory.z_student == pytest.approx(np.exp(dots / 0.07).mean() * 30, rel=1e-12)
    frozen = (memory.z_student, memory.z_teacher)
    s2, t2, idx2, contrast2 = _batch(rng, 5, 6, 30, 8)
    crd_loss(s2, t2, idx2, contrast2, memory)
    assert (memory.z_student, memory.z_teacher) == frozen


def test_banks_match_repdistiller_after_two_steps():
    rng = np.random.default_rng(6)
    n_data, dim = 25, 6
    memory = CRDMemory(n_data, dim, momentum=0.5, seed=7, dtype=np.float64)
    peer_s = memory.memory_student.copy()
    peer_t = memory.memory_teacher.copy()
    for step in range(2):
        s, t, idx, contrast = _batch(rng, 5, dim, n_data, 6)
        got = crd_loss(s, t, idx, contrast, memory)
        peer_memory = CRDMemory.from_arrays(peer_s, peer_t, z_student=memory.z_student,
                                            z_teacher=memory.z_teacher)
        _close(got, _peer(s, t, idx, contrast, peer_memory), 1e-9)
        memory.update(idx, s, t)
        ps, pt = crd_update_torch(peer_s, peer_t, idx, s, t, 0.5)
        peer_s, peer_t = ps.numpy(), pt.numpy()
        np.testing.assert_allclose(memory.memory_student, peer_s, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(memory.memory_teacher, peer_t, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(np.linalg.norm(memory.memory_student[idx], axis=1), 1.0)


def test_update_leaves_inputs_and_other_rows_alone_and_last_duplicate_wins():
    rng = np.random.default_rng(8)
    memory = CRDMemory(10, 4, momentum=0.3, seed=9)
    before = memory.memory_student.copy()
    s = rng.standard_normal((3, 4)).astype(np.float32)
    t = rng.standard_normal((3, 4)).astype(np.float32)
    keep = s.copy(), t.copy()
    memory.update(np.array([2, 5, 2]), s, t)
    np.testing.assert_array_equal(s, keep[0])
    untouched = [r for r in range(10) if r not in (2, 5)]
    np.testing.assert_array_equal(memory.memory_student[untouched], before[untouched])
    unit = s[2] / np.linalg.norm(s[2])
    row = 0.3 * before[2].astype(np.float64) + 0.7 * unit
    np.testing.assert_allclose(memory.memory_student[2], row / np.linalg.norm(row), rtol=1e-6)


def test_scale_of_the_embeddings_only_scales_the_gradient():
    rng = np.random.default_rng(10)
    s, t, idx, contrast = _batch(rng, 4, 5, 20, 6)
    memory = CRDMemory(20, 5, seed=1, dtype=np.float64)
    memory.set_constants(10.0, 10.0)
    a = crd_loss(s, t, idx, contrast, memory)
    b = crd_loss(1e3 * s, 1e-3 * t, idx, contrast, memory)
    assert b[0] == pytest.approx(a[0], rel=1e-13)
    np.testing.assert_allclose(b[1], a[1] * 1e-3, rtol=1e-10)
    np.testing.assert_allclose(b[2], a[2] * 1e3, rtol=1e-10)


def test_banks_of_any_scale_stay_finite():
    """exp(M.v / T) overflows RepDistiller's float32 for ||M_j|| > 6.2; log-space does not."""
    rng = np.random.default_rng(11)
    s, t, idx, contrast = _batch(rng, 4, 5, 20, 6, np.float32)
    bank = 100.0 * rng.standard_normal((20, 5))
    memory = CRDMemory.from_arrays(bank, -bank)
    loss, gs, gt = crd_loss(s, t, idx, contrast, memory)
    assert np.isfinite(loss) and loss >= 0
    assert np.isfinite(gs).all() and np.isfinite(gt).all()
    assert np.isfinite(memory.log_constants).all()


def test_memory_arguments_are_checked():
    with pytest.raises(ValueError, match="momentum"):
        CRDMemory(4, 2, momentum=1.5)
    with pytest.raises(ValueError, match="temperature"):
        CRDMemory(4, 2, temperature=0.0)
    with pytest.raises(ValueError, match="memory_student"):
        CRDMemory.from_arrays(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="memory_teacher"):
        CRDMemory.from_arrays(np.zeros((4, 2)), np.full((4, 2), np.nan))
    memory = CRDMemory(4, 2, seed=0)
    with pytest.raises(ValueError, match="indices"):
        memory.update(np.array([0, 4]), np.ones((2, 2)), np.ones((2, 2)))
    with pytest.raises(ValueError, match="teacher_emb"):
        memory.update(np.array([0, 1]), np.ones((2, 2)), np.ones((2, 3)))


def test_sampler_draws_negatives_from_the_other_classes():
    labels = np.repeat(np.arange(5), 8)  # 40 samples, 5 classes
    sampler = ContrastSampler(labels, 16, seed=0)
    idx = np.array([0, 9, 39, 17])
    out = sampler.sample(idx)
    assert out.shape == (4, 17) and out.dtype == np.int64
    np.testing.assert_array_equal(out[:, 0], idx)
    for row, i in zip(out, idx):
        assert (labels[row[1:]] != labels[i]).all()
        assert len(set(row[1:].tolist())) == 16  # without replacement (32 candidates)
    np.testing.assert_array_equal(ContrastSampler(labels, 16, seed=0).sample(idx), out)
    many = ContrastSampler(labels, 50, seed=1).sample(idx)  # K > 32: with replacement
    assert (labels[many[:, 1:]] != labels[idx][:, None]).all()
    relaxed = ContrastSampler(labels, 3, mode="relax", seed=2).sample(idx)
    np.testing.assert_array_equal(labels[relaxed[:, 0]], labels[idx])


def test_sampler_covers_every_other_sample():
    labels = np.array([2, 0, 1, 0, 2, 1, 1])
    sampler = ContrastSampler(labels, 4, seed=3)
    seen = set()
    for _ in range(200):
        seen.update(sampler.sample(np.array([2]))[0, 1:].tolist())
    assert seen == {0, 1, 3, 4}  # every sample not of class 1


def test_strategy_is_the_weighted_loss_and_updates_after_the_step():
    from kdnumba.strategies.crd import CRDStrategy
    rng = np.random.default_rng(12)
    labels = np.repeat(np.arange(4), 10)
    strategy = CRDStrategy(40, crd_weight=0.6, n_negatives=8, labels=labels, seed=3,
                           embed_dim=None)  # no heads: the activations are the embeddings
    s = rng.standard_normal((5, 2, 3))  # flattened to width 6
    t = rng.standard_normal((5, 6))
    idx = np.array([0, 11, 22, 33, 39])
    contrast = strategy.on_batch(idx, labels[idx])
    assert (labels[contrast[:, 1:]] != labels[idx][:, None]).all()
    loss, grads = strategy.intermediate_loss_and_gradient({"embeddings": s}, {"embeddings": t})
    memory = strategy.memory_bank
    ref = crd_loss(s.reshape(5, 6), t, idx, contrast, memory)
    assert loss == pytest.approx(0.6 * ref[0], rel=1e-14)
    np.testing.assert_allclose(grads["embeddings"], 0.6 * ref[1].reshape(5, 2, 3), rtol=1e-14)
    unweighted = strategy.crd_loss_and_gradients(s, t)
    np.testing.assert_allclose(unweighted[2], ref[2], rtol=1e-14)
    expected = memory.copy()
    expected.update(idx, s.reshape(5, 6), t)
    strategy.after_step()
    np.testing.assert_array_equal(strategy.memory_bank.memory_student, expected.memory_student)
    np.testing.assert_array_equal(strategy.memory_bank.memory_teacher, expected.memory_teacher)
    assert strategy.memory is None  # the parameter keeps its value
    with pytest.raises(ValueError, match="on_batch"):
        strategy.after_step()
    with pytest.raises(ValueError, match="on_batch"):
        strategy.intermediate_loss_and_gradient({"embeddings": s}, {"embeddings": t})
    with pytest.raises(ValueError, match="labels"):
        strategy.on_batch(idx, labels[idx][::-1])


def test_strategy_heads_chain_rule_and_step():
    """Embed heads (different widths): the student gradient is ``w gs W_s^T``, the
    heads' gradients ``x^T (w g)``; after_step moves both heads and writes the
    pre-step head outputs into the banks."""
    from kdnumba.strategies.crd import CRDStrategy
    rng = np.random.default_rng(5)
    n, b = 30, 6
    strategy = CRDStrategy(n, crd_weight=0.5, n_negatives=7, embed_dim=4, seed=1,
                           head_learning_rate=1e-2)
    s = rng.standard_normal((b, 5))
    t = rng.standard_normal((b, 9))
    idx = rng.choice(n, b, replace=False)
    contrast = strategy.on_batch(idx)
    assert (contrast[:, 0] == idx).all()
    loss, grads = strategy.intermediate_loss_and_gradient({"embeddings": s}, {"embeddings": t})
    hs, ht = strategy.student_head, strategy.teacher_head
    assert (hs.weight.shape, ht.weight.shape) == ((5, 4), (9, 4))
    e_s, e_t = s @ hs.weight + hs.bias, t @ ht.weight + ht.bias
    before = strategy.memory_bank.copy()
    ref = crd_loss(e_s, e_t, idx, contrast, before)
    assert loss == pytest.approx(0.5 * ref[0], rel=1e-13)
    np.testing.assert_allclose(grads["embeddings"], 0.5 * ref[1] @ hs.weight.T, rtol=1e-12)
    np.testing.assert_allclose(hs.weight_grad, s.T @ (0.5 * ref[1]), rtol=1e-12)
    np.testing.assert_allclose(ht.weight_grad, t.T @ (0.5 * ref[2]), rtol=1e-12)
    np.testing.assert_allclose(ht.bias_grad, (0.5 * ref[2]).sum(0), rtol=1e-12)
    w_s, w_t = hs.weight.copy(), ht.weight.copy()
    strategy.after_step()
    assert not np.allclose(hs.weight, w_s) and not np.allclose(ht.weight, w_t)
    before.update(idx, e_s, e_t)
    np.testing.assert_allclose(strategy.memory_bank.memory_student, before.memory_student,
                               rtol=1e-6)
    np.testing.assert_allclose(strategy.memory_bank.memory_teacher, before.memory_teacher,
                               rtol=1e-6)
    # the student gradient by finite differences through the head
    strategy.on_batch(idx, contrast_indices=contrast)
    _, grads = strategy.intermediate_loss_and_gradient({"embeddings": s}, {"embeddings": t})
    eps, (i, j) = 1e-6, (2, 3)
    plus, minus = s.copy(), s.copy()
    plus[i, j] += eps
    minus[i, j] -= eps
    lp = strategy.compute_intermediate_loss({"embeddings": plus}, {"embeddings": t})
    lm = strategy.compute_intermediate_loss({"embeddings": minus}, {"embeddings": t})
    assert grads["embeddings"][i, j] == pytest.approx((lp - lm) / (2 * eps), rel=1e-6)


def test_strategy_state_dict_round_trip():
    from kdnumba.strategies.crd import CRDStrategy
    rng = np.random.default_rng(2)
    a = CRDStrategy(20, n_negatives=5, embed_dim=3, seed=4)
    s, t = rng.standard_normal((4, 6)), rng.standard_normal((4, 7))
    for _ in range(2):
        a.on_batch(rng.choice(20, 4, replace=False))
        a.intermediate_loss_and_gradient({"embeddings": s}, {"embeddings": t})
        a.after_step()
    b = CRDStrategy(20, n_negatives=5, embed_dim=3, seed=99)
    b.load_state_dict(a.state_dict())
    idx = np.arange(4)
    np.testing.assert_array_equal(a.on_batch(idx), b.on_batch(idx))  # same RNG state
    la = a.intermediate_loss_and_gradient({"embeddings": s}, {"embeddings": t})
    lb = b.intermediate_loss_and_gradient({"embeddings": s}, {"embeddings": t})
    assert la[0] == lb[0]
    np.testing.assert_array_equal(la[1]["embeddings"], lb[1]["embeddings"])
