"""DecoupledDistillationStrategy (mdistiller DKD distiller: CE + warmed-up DKD) and
DISTStrategy (CE + DIST), and the trainer's on_epoch_start hook that drives the
DKD warm-up."""

from __future__ import annotations

import numpy as np
import pytest

import kdnumba
from kdnumba import DecoupledDistillationStrategy, DISTStrategy, HybridDistillationStrategy
from kdnumba.functional import dist_loss, dkd_loss, kd_loss
from kdnumba.training import Distiller
from kdnumba.training.mlp import MLP


def _batch(rng, rows=8, classes=5):
    s = 2.0 * rng.standard_normal((rows, classes))
    return s, s + rng.standard_normal((rows, classes)), rng.integers(0, classes, rows)


def test_exported():
    assert kdnumba.DecoupledDistillationStrategy is DecoupledDistillationStrategy
    assert kdnumba.strategies.DISTStrategy is DISTStrategy


@pytest.mark.parametrize("epoch,factor", [(0, 0.25), (1, 0.5), (3, 1.0), (10, 1.0)])
def test_dkd_strategy_is_ce_plus_warmed_up_dkd(rng, epoch, factor):
    s, t, y = _batch(rng)
    st = DecoupledDistillationStrategy(alpha=1.0, beta=8.0, temperature=4.0, ce_weight=0.5,
                                       warmup=4)
    st.on_epoch_start(epoch)
    assert st.warmup_factor == factor
    loss, grad = st.loss_and_gradient(s, t, y)
    d_loss, d_grad = dkd_loss(s, t, y)
    ce, ce_grad = kd_loss(s, t, y, alpha=1.0, temperature=1.0)
    assert loss == pytest.approx(0.5 * ce + factor * d_loss, rel=1e-12)
    np.testing.assert_allclose(grad, 0.5 * ce_grad + factor * d_grad, rtol=1e-12, atol=1e-15)


def test_dkd_strategy_validation(rng):
    s, t, _ = _batch(rng)
    with pytest.raises(ValueError, match="labels"):
        DecoupledDistillationStrategy().loss_and_gradient(s, t, None)
    with pytest.raises(ValueError, match="warmup"):
        DecoupledDistillationStrategy(warmup=-1)
    with pytest.raises(ValueError, match="beta"):
        DecoupledDistillationStrategy(beta=-2.0)
    assert DecoupledDistillationStrategy(warmup=0).warmup_factor == 1.0
    assert "warmup=20" in repr(DecoupledDistillationStrategy())


def test_dist_strategy_is_ce_plus_dist(rng):
    s, t, y = _batch(rng)
    st = DISTStrategy(beta=2.0, gamma=2.0, temperature=4.0)
    loss, grad = st.loss_and_gradient(s, t, y)
    d_loss, d_grad = dist_loss(s, t, beta=2.0, gamma=2.0, temperature=4.0)
    ce, ce_grad = kd_loss(s, t, y, alpha=1.0, temperature=1.0)
    assert loss == pytest.approx(ce + d_loss, rel=1e-12)
    np.testing.assert_allclose(grad, ce_grad + d_grad, rtol=1e-12, atol=1e-15)
    assert st.loss_and_gradient(s, t, None)[0] == pytest.approx(d_loss, rel=1e-12)


class _Recorder(kdnumba.DistillationLoss):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_epoch_start(self, epoch):
        self.seen.append(epoch)


def test_distiller_calls_on_epoch_start_through_the_strategy_tree(rng):
    x = rng.standard_normal((40, 6)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    teacher = MLP([6, 8, 3], seed=1, dtype=np.float32)
    dkd = DecoupledDistillationStrategy(warmup=3)
    rec = _Recorder()
    hybrid = HybridDistillationStrategy([(dkd, 0.5), (rec, 0.5)])
    student = MLP([6, 8, 3], seed=2, dtype=np.float32)
    Distiller(student, teacher, hybrid, epochs=4, batch_size=20, progress=False).fit(x, y)
    assert rec.seen == [0, 1, 2, 3]
    assert dkd.epoch == 3 and dkd.warmup_factor == 1.0
