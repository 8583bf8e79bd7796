"""SP and PKT: agreement with RepDistiller's formulas (PyTorch autograd), the
tiled path, degenerate rows, and the strategies. Generic checks live in
test_contract.py."""

from __future__ import annotations

import numpy as np
import pytest

from kdnumba import PKTStrategy, SimilarityPreservingStrategy
from kdnumba.functional import pkt_loss, sp_loss
from kdnumba.kernels.cpu import similarity as kernels
from kdnumba.reference import similarity as reference

torch = pytest.importorskip("torch")


def _peer(torch_fn, student, teacher, **options):
    """Loss and gradient of the peer's formula by PyTorch autograd (float64 or float32)."""
    s = torch.tensor(student, requires_grad=True)
    loss = torch_fn(s, torch.tensor(teacher), **options)
    loss.backward()
    return float(loss.detach()), s.grad.numpy()


def _close(loss, grad, ref_loss, ref_grad, rtol):
    assert loss == pytest.approx(ref_loss, rel=rtol, abs=1e-300)
    np.testing.assert_allclose(grad, ref_grad, rtol=rtol, atol=rtol * np.abs(ref_grad).max())


CASES = {
    "sp conv maps, different widths": (sp_loss, reference.sp_loss_torch,
                                       (12, 4, 3, 3), (12, 8, 2, 2), {}),
    "sp vectors": (sp_loss, reference.sp_loss_torch, (9, 7), (9, 7), {}),
    "pkt different widths": (pkt_loss, reference.pkt_loss_torch, (12, 5), (12, 9), {}),
    "pkt eps 1e-4": (pkt_loss, reference.pkt_loss_torch, (10, 6), (10, 6), {"eps": 1e-4}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_peer_formula(case):
    fn, torch_fn, s_shape, t_shape, options = CASES[case]
    rng = np.random.default_rng(7)
    student = rng.standard_normal(s_shape)
    teacher = rng.standard_normal(t_shape) + 0.3
    loss, grad = fn(student, teacher, **options)
    _close(loss, grad, *_peer(torch_fn, student, teacher, **options), 1e-9)
    s32, t32 = student.astype(np.float32), teacher.astype(np.float32)
    loss32, grad32 = fn(s32, t32, **options)
    assert grad32.dtype == np.float32
    _close(loss32, grad32, *_peer(torch_fn, s32.astype(np.float64), t32.astype(np.float64),
                                  **options), 2e-4)


@pytest.mark.parametrize("rows", [1, 3, 5])
def test_row_tiles_give_the_one_tile_result(rows):
    rng = np.random.default_rng(3)
    s, t = rng.standard_normal((11, 6)), rng.standard_normal((11, 4))
    for launch, eps in ((kernels.sp, 1e-12), (kernels.pkt, 1e-7)):
        whole_loss, whole_grad = np.empty(11), np.empty_like(s)
        launch(s, t, eps, None, whole_loss, whole_grad)
        loss, grad = np.empty(11), np.empty_like(s)
        launch(s, t, eps, rows, loss, grad)
        np.testing.assert_allclose(loss, whole_loss, rtol=1e-13)
        np.testing.assert_allclose(grad, whole_grad, rtol=1e-12, atol=1e-15)


def test_default_tiles_bound_the_memory():
    assert kernels.default_tile_rows(512, 4) == 512
    rows = kernels.default_tile_rows(100_000, 4)
    assert rows * 100_000 * 4 * 3 <= max(kernels.TILE_BYTES, 3 * 4 * 100_000 * 64)


def test_sp_zero_student_row_matches_the_peer():
    # A zero row: its Gram row is 0 and F.normalize's clamp is active.
    rng = np.random.default_rng(1)
    student = rng.standard_normal((6, 4))
    student[2] = 0.0
    teacher = rng.standard_normal((6, 5))
    loss, grad = sp_loss(student, teacher)
    _close(loss, grad, *_peer(reference.sp_loss_torch, student, teacher), 1e-9)


def test_pkt_identical_inputs_give_a_tiny_loss():
    x = np.random.default_rng(2).standard_normal((8, 5))
    loss, grad = pkt_loss(x, x)
    assert abs(loss) < 1e-15
    assert np.abs(grad).max() < 1e-5  # eps inside the log: not exactly 0


def _acts(rng, shapes):
    return {name: rng.standard_normal(shape) for name, shape in shapes.items()}


def test_sp_strategy_weights_layers_and_maps_names():
    rng = np.random.default_rng(4)
    s_acts = _acts(rng, {"a": (6, 3, 2, 2), "b": (6, 5)})
    t_acts = _acts(rng, {"A": (6, 8), "b": (6, 2, 3)})
    strategy = SimilarityPreservingStrategy({"a": "A", "b": "b"}, sp_weight=0.4, gamma=3.0)
    loss, grads = strategy.intermediate_loss_and_gradient(s_acts, t_acts)
    la, ga = sp_loss(s_acts["a"], t_acts["A"])
    lb, gb = sp_loss(s_acts["b"], t_acts["b"])
    assert loss == pytest.approx(0.4 * 3.0 * (la + lb) / 2, rel=1e-12)
    np.testing.assert_allclose(grads["a"], 0.4 * 3.0 / 2 * ga, rtol=1e-12)
    np.testing.assert_allclose(grads["b"], 0.4 * 3.0 / 2 * gb, rtol=1e-12)
    out_loss, _ = strategy.loss_and_gradient(rng.standard_normal((6, 3)),
                                             rng.standard_normal((6, 3)))
    assert np.isfinite(out_loss)


def test_pkt_strategy_and_missing_layers():
    rng = np.random.default_rng(5)
    s_acts = _acts(rng, {"embeddings": (7, 4)})
    t_acts = _acts(rng, {"embeddings": (7, 6)})
    strategy = PKTStrategy(pkt_weight=0.5, eps=1e-5)
    loss, grads = strategy.intermediate_loss_and_gradient(s_acts, t_acts)
    ref_loss, ref_grad = pkt_loss(s_acts["embeddings"], t_acts["embeddings"], eps=1e-5)
    assert loss == pytest.approx(0.5 * ref_loss, rel=1e-12)
    np.testing.assert_allclose(grads["embeddings"], 0.5 * ref_grad, rtol=1e-12)
    with pytest.raises(ValueError, match="other"):
        PKTStrategy("other").intermediate_loss_and_gradient(s_acts, t_acts)
    skipped = PKTStrategy(["embeddings", "other"], missing_layer="skip")
    loss, grads = skipped.intermediate_loss_and_gradient(s_acts, t_acts)
    assert list(grads) == ["embeddings"]
    with pytest.raises(ValueError, match="gamma"):
        SimilarityPreservingStrategy(gamma=-1.0)
    with pytest.raises(ValueError, match="eps"):
        PKTStrategy(eps=0.0)
