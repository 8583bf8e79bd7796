"""dkd_loss against an independent PyTorch restatement of mdistiller's ``dkd_loss``
(``mdistiller/distillers/DKD.py``) and of the logit-standardisation repo's
``normalize`` (sunshangquan/logit-standardization-KD), differentiated by autograd
in float64. The generic checks come from the registry (tests/test_contract.py)."""

from __future__ import annotations

import numpy as np
import pytest

from kdnumba.functional import dkd_loss

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _peer_dkd(s, t, y, alpha, beta, T, standardize):
    """Loss and student gradient of the peer's code, restated (float64 autograd)."""
    st = torch.tensor(np.asarray(s, np.float64), requires_grad=True)
    tt = torch.tensor(np.asarray(t, np.float64))
    target = torch.tensor(y)
    zs, zt = st, tt
    if standardize:
        zs = (zs - zs.mean(dim=-1, keepdim=True)) / (1e-7 + zs.std(dim=-1, keepdim=True))
        zt = (zt - zt.mean(dim=-1, keepdim=True)) / (1e-7 + zt.std(dim=-1, keepdim=True))
    gt_mask = torch.zeros_like(zs).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(zs).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(p):
        return torch.cat([(p * gt_mask).sum(1, keepdim=True),
                          (p * other_mask).sum(1, keepdim=True)], dim=1)

    pred_s = cat_mask(F.softmax(zs / T, dim=1))
    pred_t = cat_mask(F.softmax(zt / T, dim=1))
    tckd = F.kl_div(torch.log(pred_s), pred_t, reduction="sum") * T ** 2 / len(y)
    p2_t = F.softmax(zt / T - 1000.0 * gt_mask, dim=1)
    logp2_s = F.log_softmax(zs / T - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(logp2_s, p2_t, reduction="sum") * T ** 2 / len(y)
    loss = alpha * tckd + beta * nckd
    loss.backward()
    return loss.item(), st.grad.numpy()


CASES = [
    dict(alpha=1.0, beta=8.0, T=4.0, standardize=False),
    dict(alpha=0.5, beta=2.0, T=1.0, standardize=False),
    dict(alpha=1.0, beta=8.0, T=2.0, standardize=True),
    dict(alpha=0.0, beta=1.0, T=3.0, standardize=False),
]


def _inputs(rng, rows=7, classes=10, scale=2.0):
    s = scale * rng.standard_normal((rows, classes))
    t = s + rng.standard_normal((rows, classes))
    return s, t, rng.integers(0, classes, rows)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-9), (np.float32, 2e-4)])
def test_matches_mdistiller(rng, case, dtype, rtol):
    s, t, y = _inputs(rng)
    s, t = s.astype(dtype), t.astype(dtype)
    ref_loss, ref_grad = _peer_dkd(s, t, y, case["alpha"], case["beta"], case["T"],
                                   case["standardize"])
    loss, grad = dkd_loss(s, t, y, alpha=case["alpha"], beta=case["beta"],
                          temperature=case["T"], standardize=case["standardize"])
    assert grad.dtype == dtype
    assert loss == pytest.approx(ref_loss, rel=rtol)
    np.testing.assert_allclose(grad, ref_grad, rtol=rtol, atol=rtol * np.abs(ref_grad).max())


def test_confident_rows_stay_accurate_where_the_peer_still_works(rng):
    # Targets far ahead (p_rest ~ 1e-9): the peer is still finite in float64.
    s, t, y = _inputs(rng, scale=1.0)
    s[np.arange(len(y)), y] += 20.0
    t[np.arange(len(y)), y] += 18.0
    ref_loss, ref_grad = _peer_dkd(s, t, y, 1.0, 8.0, 1.0, False)
    loss, grad = dkd_loss(s, t, y, temperature=1.0)
    assert loss == pytest.approx(ref_loss, rel=1e-9)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-8, atol=1e-9 * np.abs(ref_grad).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_finite_for_logits_of_1e4_where_the_peer_is_not(rng, dtype):
    s = (1e4 * rng.standard_normal((6, 8))).astype(dtype)
    t = (1e4 * rng.standard_normal((6, 8))).astype(dtype)
    y = rng.integers(0, 8, 6)
    with np.errstate(all="ignore"):
        peer_loss, _ = _peer_dkd(s, t, y, 1.0, 8.0, 4.0, False)
    assert not np.isfinite(peer_loss)  # torch.log of an underflowed probability
    for standardize in (False, True):
        loss, grad = dkd_loss(s, t, y, standardize=standardize)
        assert np.isfinite(loss) and loss >= 0 and np.isfinite(grad).all()
    # same value in float64 and float32 inputs (the math is well-conditioned)
    l64, _ = dkd_loss(s.astype(np.float64), t.astype(np.float64), y)
    assert dkd_loss(s, t, y)[0] == pytest.approx(l64, rel=1e-5)


def test_float32_gradient_of_saturated_rows_matches_float64(rng):
    s = (100.0 * rng.standard_normal((5, 6)))
    t = s + 50.0 * rng.standard_normal((5, 6))
    y = rng.integers(0, 6, 5)
    l64, g64 = dkd_loss(s, t, y, temperature=1.0)
    l32, g32 = dkd_loss(s.astype(np.float32), t.astype(np.float32), y, temperature=1.0)
    # The loss is tiny here (~4e-6) next to terms of size ~100: float32 keeps it
    # to an absolute, not relative, accuracy (as kd_loss).
    assert l32 == pytest.approx(l64, abs=1e-6)
    # gradient entries are differences of float32 probabilities scaled by T/B = 0.2
    assert np.isfinite(g32).all()
    np.testing.assert_allclose(g32, g64, atol=1e-6 * 0.2)
