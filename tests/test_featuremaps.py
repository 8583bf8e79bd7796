"""NST and HCL: agreement with the peers' formulas (RepDistiller ``NST.py``,
mdistiller ``ReviewKD.py`` ``hcl_loss``) written out here again in PyTorch and
run by autograd, PyTorch's adaptive-pooling bins, both NST orders of
operations, and the strategies. Generic checks live in test_contract.py."""

from __future__ import annotations

import numpy as np
import pytest

from kdnumba import HCLStrategy, NSTStrategy
from kdnumba.functional import hcl_loss, nst_loss
from kdnumba.kernels.cpu import featuremaps as kernels

torch = pytest.importorskip("torch")
F = torch.nn.functional


# --- the peers, rewritten from their code ----------------------------------------------

def peer_nst(f_s, f_t):
    """RepDistiller ``NSTLoss.nst_loss`` (equal spatial sizes, ``full_loss=True``)."""
    def flat(f):
        return F.normalize(f.reshape(f.shape[0], f.shape[1], -1), dim=2)

    def poly(a, b):  # (B, Cb, Ca): (a_i . b_j)^2, via the peer's broadcast
        return (a[:, None, :, :] * b[:, :, None, :]).sum(-1) ** 2

    s, t = flat(f_s), flat(f_t)
    return poly(t, t).mean().detach() + poly(s, s).mean() - 2 * poly(s, t).mean()


def peer_hcl(fs, ft):
    """mdistiller ``hcl_loss`` for one pair."""
    loss = F.mse_loss(fs, ft)
    cnt = tot = 1.0
    for level in (4, 2, 1):
        if level >= fs.shape[2]:
            continue
        cnt /= 2.0
        loss = loss + cnt * F.mse_loss(F.adaptive_avg_pool2d(fs, level),
                                       F.adaptive_avg_pool2d(ft, level))
        tot += cnt
    return loss / tot


def _peer(fn, student, teacher):
    s = torch.tensor(student, requires_grad=True)
    loss = fn(s, torch.tensor(teacher))
    loss.backward()
    return float(loss.detach()), s.grad.numpy()


def _close(loss, grad, ref_loss, ref_grad, rtol):
    assert loss == pytest.approx(ref_loss, rel=rtol, abs=1e-300)
    np.testing.assert_allclose(grad, ref_grad, rtol=rtol, atol=rtol * np.abs(ref_grad).max())


NST_CASES = {  # student shape, teacher channels
    "64 vs 128 channels, 4x4": ((3, 6, 4, 4), 12),
    "fewer teacher channels, 5x3": ((2, 7, 5, 3), 3),
    "large map (C x C order)": ((2, 3, 8, 8), 4),
    "1x2 maps": ((4, 3, 1, 2), 5),
}
HCL_SHAPES = [(2, 3, 7, 7), (2, 2, 5, 9), (3, 2, 3, 3), (2, 2, 4, 4), (2, 2, 9, 3),
              (2, 2, 8, 8), (2, 2, 2, 5), (2, 1, 1, 1)]


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-9), (np.float32, 2e-4)])
@pytest.mark.parametrize("case", list(NST_CASES))
def test_nst_matches_repdistiller(case, dtype, rtol):
    shape, ct = NST_CASES[case]
    rng = np.random.default_rng(0)
    s = rng.standard_normal(shape).astype(dtype)
    t = rng.standard_normal((shape[0], ct) + shape[2:]).astype(dtype)
    ref = _peer(peer_nst, s.astype(np.float64), t.astype(np.float64))
    loss, grad = nst_loss(s, t)
    _close(loss, grad.astype(np.float64), *ref, rtol)


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-9), (np.float32, 2e-4)])
@pytest.mark.parametrize("shape", HCL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_hcl_matches_mdistiller(shape, dtype, rtol):
    rng = np.random.default_rng(1)
    s = rng.standard_normal(shape).astype(dtype)
    t = (s + rng.standard_normal(shape)).astype(dtype)
    ref = _peer(peer_hcl, s.astype(np.float64), t.astype(np.float64))
    loss, grad = hcl_loss(s, t)
    _close(loss, grad.astype(np.float64), *ref, rtol)


@pytest.mark.parametrize("size, level", [(7, 4), (5, 4), (9, 4), (3, 2), (3, 4), (5, 2), (6, 4)])
def test_pooling_bins_are_pytorchs(size, level):
    """start floor(i n / l), end ceil((i + 1) n / l): adaptive_avg_pool1d exactly."""
    x = np.random.default_rng(2).standard_normal(size)
    bins = [((i * size) // level, -(-((i + 1) * size) // level)) for i in range(level)]
    ours = [x[a:b].mean() for a, b in bins]
    theirs = F.adaptive_avg_pool1d(torch.tensor(x)[None, None], level)[0, 0].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-15)


def test_hcl_levels_follow_the_peer():
    from kdnumba.functional.featuremaps import hcl_levels
    assert hcl_levels(8) == ((4, 2, 1), (0.5, 0.25, 0.125))
    assert hcl_levels(4) == ((2, 1), (0.5, 0.25))  # a level equal to H is skipped
    assert hcl_levels(2) == ((1,), (0.5,))
    assert hcl_levels(1) == ((), ())


@pytest.mark.parametrize("shape, ct", [((3, 4, 3, 3), 6), ((2, 5, 6, 6), 2)])
def test_nst_both_orders_agree(shape, ct):
    rng = np.random.default_rng(3)
    s = rng.standard_normal(shape).reshape(shape[0], shape[1], -1)
    t = rng.standard_normal((shape[0], ct) + shape[2:]).reshape(shape[0], ct, -1)
    results = []
    for spatial in (True, False):
        grad = np.empty_like(s)
        rows = np.empty(shape[0])
        kernels.nst_rows(s, t, spatial, 1e-12, 1.0 / shape[0], grad, rows)
        results.append((rows, grad))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-12)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-10, atol=1e-14)


def test_nst_order_choice():
    assert kernels.nst_spatial(64, 128, 64)        # 8x8 maps: P x P is less work
    assert not kernels.nst_spatial(64, 64, 1024)   # 32x32 maps: C x C


def test_nst_zero_map_takes_the_clamped_branch():
    rng = np.random.default_rng(4)
    s = rng.standard_normal((2, 3, 2, 2))
    s[0, 1] = 0.0
    t = rng.standard_normal((2, 4, 2, 2))
    ref = _peer(peer_nst, s, t)
    _close(*nst_loss(s, t), *ref, 1e-9)


def test_strategies_weigh_and_scale_the_functional_losses():
    rng = np.random.default_rng(5)
    s_acts = {"a": rng.standard_normal((4, 3, 4, 4)), "b": rng.standard_normal((4, 2, 5, 5))}
    t_acts = {"A": rng.standard_normal((4, 6, 4, 4)), "b": rng.standard_normal((4, 2, 5, 5))}
    nst = NSTStrategy({"a": "A"}, nst_weight=0.4, gamma=50.0)
    loss, grads = nst.intermediate_loss_and_gradient(s_acts, t_acts)
    ref_loss, ref_grad = nst_loss(s_acts["a"], t_acts["A"])
    assert loss == pytest.approx(0.4 * 50.0 * ref_loss)
    np.testing.assert_allclose(grads["a"], 0.4 * 50.0 * ref_grad)
    hcl = HCLStrategy(["b", "c"], hcl_weight=0.5, missing_layer="skip")
    loss, grads = hcl.intermediate_loss_and_gradient(s_acts, t_acts)
    ref_loss, ref_grad = hcl_loss(s_acts["b"], t_acts["b"])
    assert loss == pytest.approx(0.5 / 2 * ref_loss)
    assert list(grads) == ["b"]
    with pytest.raises(ValueError, match="'a'.*spatial size"):
        NSTStrategy("a").intermediate_loss_and_gradient({"a": s_acts["a"]},
                                                        {"a": t_acts["b"]})
    with pytest.raises(ValueError, match="gamma"):
        HCLStrategy(gamma=-1.0)
