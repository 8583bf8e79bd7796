"""sparse_kd_loss: a teacher stored as its top-K logits.

It must equal kd_loss against the dense teacher whose logits are -inf off the
top K (computed here with true -inf by masking, and with kd_loss itself on a
finite fill far enough below to underflow exactly), match a ``torch.gather``
restatement in float64 / float32, handle K = 1 and K = C, stay finite at
logits of +-1e4, and reject repeated or out-of-range indices naming
``teacher_topk_indices`` and the row. The generic contract runs from the
registry (tests/test_contract.py, tests/cuda/test_cuda_contract.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from kdnumba.functional import kd_loss, sparse_kd_loss

torch = pytest.importorskip("torch")
F = torch.nn.functional


def topk_teacher(seed, rows=7, classes=40, k=6):
    rng = np.random.default_rng(seed)
    s = 2.0 * rng.standard_normal((rows, classes))
    t = s + rng.standard_normal((rows, classes))
    idx = rng.permuted(np.argsort(-t, axis=1)[:, :k], axis=1)
    return s, np.take_along_axis(t, idx, 1), idx, rng.integers(0, classes, rows)


def dense_minus_inf(s, values, idx, labels, temperature, alpha):
    """kd_loss's formula with a dense teacher of -inf off the support, by autograd
    (terms with q = 0 masked out: 0 * log 0 = 0)."""
    dense = torch.full(s.shape, -torch.inf, dtype=torch.float64)
    dense.scatter_(1, torch.tensor(idx), torch.tensor(values, dtype=torch.float64))
    S = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    log_p = F.log_softmax(S / temperature, -1)
    log_q = F.log_softmax(dense / temperature, -1)
    q = log_q.exp()
    terms = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q))
    loss = temperature ** 2 * terms.sum() / s.shape[0]
    if labels is not None:
        loss = alpha * F.cross_entropy(S, torch.tensor(labels)) + (1 - alpha) * loss
    loss.backward()
    return loss.item(), S.grad.numpy()


def close(got, want, rtol):
    assert got[0] == pytest.approx(want[0], rel=rtol, abs=1e-12)
    np.testing.assert_allclose(got[1], want[1], rtol=rtol, atol=rtol * np.abs(want[1]).max())


@pytest.mark.parametrize("with_labels", [False, True], ids=["soft", "labels"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_equals_kd_loss_with_minus_inf_off_the_top_k(temperature, with_labels):
    s, v, idx, y = topk_teacher(0)
    labels = y if with_labels else None
    want = dense_minus_inf(s, v, idx, labels, temperature, 0.4)
    close(sparse_kd_loss(s, v, idx, labels, temperature=temperature, alpha=0.4), want, 1e-9)
    got32 = sparse_kd_loss(s.astype(np.float32), v.astype(np.float32), idx, labels,
                           temperature=temperature, alpha=0.4)
    close(got32, dense_minus_inf(s.astype(np.float32).astype(np.float64),
                                 v.astype(np.float32).astype(np.float64), idx, labels,
                                 temperature, 0.4), 2e-4)
    # kd_loss itself, with a finite fill whose exponentials underflow to exactly 0.
    dense = np.full(s.shape, -1e5)
    np.put_along_axis(dense, idx, v, 1)
    close(kd_loss(s, dense, labels, temperature=temperature, alpha=0.4), want, 1e-9)


def test_matches_a_torch_gather_restatement():
    s, v, idx, _ = topk_teacher(1)
    S = torch.tensor(s, requires_grad=True)
    log_q = F.log_softmax(torch.tensor(v) / 2.0, -1)
    log_p = torch.gather(F.log_softmax(S / 2.0, -1), 1, torch.tensor(idx))
    loss = 4.0 * (log_q.exp() * (log_q - log_p)).sum() / s.shape[0]
    loss.backward()
    close(sparse_kd_loss(s, v, idx, temperature=2.0), (loss.item(), S.grad.numpy()), 1e-9)


def test_k_equal_to_one_and_to_c():
    s, _, _, y = topk_teacher(2, classes=11, k=3)
    rng = np.random.default_rng(2)
    t = s + rng.standard_normal(s.shape)
    # K = C in a shuffled order is kd_loss with the full teacher.
    idx = rng.permuted(np.tile(np.arange(11), (s.shape[0], 1)), axis=1)
    close(sparse_kd_loss(s, np.take_along_axis(t, idx, 1), idx, y, temperature=3.0, alpha=0.3),
          kd_loss(s, t, y, temperature=3.0, alpha=0.3), 1e-9)
    # K = 1: q is one-hot, soft = T^2 mean(-log p^T(s)[idx]).
    idx1 = idx[:, :1]
    loss, grad = sparse_kd_loss(s, np.zeros((s.shape[0], 1)), idx1, temperature=2.0)
    close((loss, grad), dense_minus_inf(s, np.zeros((s.shape[0], 1)), idx1, None, 2.0, 0.0),
          1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_logits_of_1e4_are_finite(dtype):
    rng = np.random.default_rng(3)
    s = (1e4 * rng.choice([-1.0, 1.0], (5, 60))).astype(dtype)
    idx = rng.permuted(np.tile(np.arange(60), (5, 1)), axis=1)[:, :8]
    v = (1e4 * rng.choice([-1.0, 1.0], (5, 8))).astype(dtype)
    loss, grad = sparse_kd_loss(s, v, idx, rng.integers(0, 60, 5), alpha=0.3)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    want = dense_minus_inf(s.astype(np.float64), v.astype(np.float64), idx,
                           None, 1.0, 0.0)
    got = sparse_kd_loss(s, v, idx)
    close(got, want, 1e-9 if dtype == np.float64 else 2e-4)


def test_bad_indices_name_the_argument_and_the_row():
    s, v, idx, _ = topk_teacher(4)
    dup = idx.copy()
    dup[5, 3] = dup[5, 0]
    with pytest.raises(ValueError, match=r"teacher_topk_indices.*unique.*row 5"):
        sparse_kd_loss(s, v, dup)
    for bad in (-1, 40, 10**12):
        wrong = idx.copy()
        wrong[2, 1] = bad
        with pytest.raises(ValueError, match=r"teacher_topk_indices.*\[0, 40\).*row 2"):
            sparse_kd_loss(s, v, wrong)
    with pytest.raises(TypeError, match="teacher_topk_indices"):
        sparse_kd_loss(s, v, idx.astype(float))
    # a later good call is unaffected (the marks live in the gradient row)
    close(sparse_kd_loss(s, v, idx), dense_minus_inf(s, v, idx, None, 1.0, 0.0), 1e-9)


def test_out_receives_the_gradient_and_inputs_are_untouched():
    s, v, idx, _ = topk_teacher(5)
    before = (s.copy(), v.copy(), idx.copy())
    out = np.full_like(s, np.nan)
    loss, grad = sparse_kd_loss(s, v, idx, out=out)
    assert grad is out and np.isfinite(out).all()
    for a, b in zip((s, v, idx), before):
        np.testing.assert_array_equal(a, b)
