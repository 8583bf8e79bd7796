import numpy as np

import kdnumba
from kdnumba import reference


def test_kd_loss_matches_reference_small():
    rng = np.random.default_rng(0)
    s, t = rng.standard_normal((2, 8, 5))
    y = np.array([0, 1, 2, 3, 4, 0, 1, 2])
    loss, grad = kdnumba.functional.kd_loss(s, t, y)
    ref_loss, ref_grad = reference.kd_loss(s, t, y)
    assert np.isclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-10, atol=1e-14)
