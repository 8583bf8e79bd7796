"""kd_loss's divergences and logit standardisation against the peers' formulas.

Independent restatements, written from reading the peers and differentiated by
PyTorch autograd in float64 (never the kernels' algebra):

* ``"jsd"``: TRL ``GKDTrainer.generalized_jsd_loss`` -- mixture log-probabilities
  ``logsumexp([log p_s + log(1 - beta), log p_t + log(beta)])`` and
  ``beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)`` (beta weights the teacher);
* ``"tvd"``: Liger-Kernel's TVD, ``0.5 * sum |p - q|`` (autograd's ``abs`` has
  subgradient 0 at 0, as the kernel);
* ``"reverse_kl"``: ``F.kl_div`` with the arguments swapped (MiniLLM's KL(p_s || p_t));
* ``standardize``: sunshangquan/logit-standardization-KD's ``normalize``,
  ``(z - mean) / (1e-7 + z.std())``, before the temperature; CE on raw logits.

Loss and gradient to 1e-9 relative in float64, 2e-4 in float32. The generic
contract (references, finite differences, threads, bad input, CUDA) runs from
the registry in ``tests/test_contract.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from kdnumba.functional import kd_loss

torch = pytest.importorskip("torch")
F = torch.nn.functional

DIVERGENCES = ("kl", "reverse_kl", "jsd", "tvd")


def peer(s, t, labels, *, temperature, alpha, divergence, jsd_beta=0.5, standardize=False):
    """``(loss, grad)`` of the peers' formulas by autograd, in float64."""
    S = torch.tensor(np.asarray(s, np.float64), requires_grad=True)
    Tt = torch.tensor(np.asarray(t, np.float64))
    s_soft, t_soft = S, Tt
    if standardize:  # sunshangquan's normalize (torch.std is unbiased)
        s_soft = (S - S.mean(-1, keepdim=True)) / (1e-7 + S.std(-1, keepdim=True))
        t_soft = (Tt - Tt.mean(-1, keepdim=True)) / (1e-7 + Tt.std(-1, keepdim=True))
    log_p = F.log_softmax(s_soft / temperature, -1)
    log_q = F.log_softmax(t_soft / temperature, -1)
    if divergence == "kl":
        per_row = (log_q.exp() * (log_q - log_p)).sum(-1)
    elif divergence == "reverse_kl":
        per_row = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    elif divergence == "jsd":  # TRL
        beta = torch.tensor(jsd_beta, dtype=torch.float64)
        log_m = torch.logsumexp(torch.stack([log_p + torch.log1p(-beta),
                                             log_q + torch.log(beta)]), dim=0)
        kl_teacher = F.kl_div(log_m, log_q, reduction="none", log_target=True)
        kl_student = F.kl_div(log_m, log_p, reduction="none", log_target=True)
        per_row = (beta * kl_teacher + (1 - beta) * kl_student).sum(-1)
    else:  # Liger TVD
        per_row = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    loss = temperature ** 2 * per_row.mean()
    if labels is not None:
        loss = alpha * F.cross_entropy(S, torch.tensor(labels)) + (1 - alpha) * loss
    loss.backward()
    return loss.item(), S.grad.numpy()


def close(got, want, rtol):
    loss, grad = got
    ref_loss, ref_grad = want
    assert loss == pytest.approx(ref_loss, rel=rtol, abs=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=rtol,
                               atol=rtol * np.abs(ref_grad).max())


def inputs(seed, rows=9, classes=13, scale=2.0):
    rng = np.random.default_rng(seed)
    s = scale * rng.standard_normal((rows, classes))
    t = s + rng.standard_normal((rows, classes))
    return s, t, rng.integers(0, classes, rows)


@pytest.mark.parametrize("standardize", [False, True], ids=["raw", "standardized"])
@pytest.mark.parametrize("with_labels", [False, True], ids=["soft", "labels"])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_the_peer(divergence, temperature, with_labels, standardize):
    s, t, y = inputs(0)
    labels = y if with_labels else None
    opts = dict(temperature=temperature, alpha=0.3, divergence=divergence, jsd_beta=0.3,
                standardize=standardize)
    want = peer(s, t, labels, **opts)
    close(kd_loss(s, t, labels, **opts), want, 1e-9)
    s32, t32 = s.astype(np.float32), t.astype(np.float32)
    want32 = peer(s32, t32, labels, **opts)  # the peer on the same rounded inputs
    got32 = kd_loss(s32, t32, labels, **opts)
    assert got32[1].dtype == np.float32
    close(got32, want32, 2e-4)


@pytest.mark.parametrize("beta", [0.01, 0.5, 0.99])
def test_jsd_beta_weights_the_teacher(beta):
    s, t, _ = inputs(1)
    close(kd_loss(s, t, temperature=2.0, divergence="jsd", jsd_beta=beta),
          peer(s, t, None, temperature=2.0, alpha=0.0, divergence="jsd", jsd_beta=beta), 1e-9)
    # JSD_beta(p_t, p_s) = JSD_{1-beta}(p_s, p_t): swapping the roles moves the weight.
    swapped = kd_loss(t, s, temperature=2.0, divergence="jsd", jsd_beta=1 - beta)[0]
    assert kd_loss(s, t, temperature=2.0, divergence="jsd", jsd_beta=beta)[0] == \
        pytest.approx(swapped, rel=1e-12)


def test_reverse_kl_is_kl_with_the_roles_swapped():
    s, t, _ = inputs(2)
    assert kd_loss(s, t, divergence="reverse_kl", temperature=2.0)[0] == \
        pytest.approx(kd_loss(t, s, temperature=2.0)[0], rel=1e-12)


def test_tvd_subgradient_is_zero_where_student_equals_teacher():
    s, _, _ = inputs(3)
    loss, grad = kd_loss(s, s.copy(), divergence="tvd", temperature=2.0)
    assert loss == 0.0 and not grad.any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_logits_of_1e4_are_finite_and_correct(divergence, dtype):
    rng = np.random.default_rng(4)
    s = (1e4 * rng.choice([-1.0, 1.0], (6, 50)) + rng.standard_normal((6, 50))).astype(dtype)
    t = (1e4 * rng.choice([-1.0, 1.0], (6, 50)) + rng.standard_normal((6, 50))).astype(dtype)
    y = rng.integers(0, 50, 6)
    for temperature in (1.0, 3.0):
        loss, grad = kd_loss(s, t, y, temperature=temperature, divergence=divergence)
        assert np.isfinite(loss) and np.isfinite(grad).all()
        want = peer(s, t, y, temperature=temperature, alpha=0.3, divergence=divergence)
        if np.isfinite(want[0]) and np.isfinite(want[1]).all():
            close((loss, grad), want, 1e-9 if dtype == np.float64 else 2e-4)


def test_kl_is_the_default_and_parsed_spellings():
    s, t, y = inputs(5)
    base = kd_loss(s, t, y)
    for spelling in ("kl", "KL", " kl"):
        got = kd_loss(s, t, y, divergence=spelling)
        assert got[0] == base[0] and np.array_equal(got[1], base[1])
    a = kd_loss(s, t, divergence="reverse-kl")
    b = kd_loss(s, t, divergence="reverse_kl")
    assert a[0] == b[0]


def test_standardize_hard_term_stays_on_raw_logits():
    s, t, y = inputs(6)
    # alpha = 1: only the hard term, identical with and without standardisation.
    a = kd_loss(s, t, y, alpha=1.0, standardize=True)
    b = kd_loss(s, t, y, alpha=1.0)
    assert a[0] == pytest.approx(b[0], rel=1e-12)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-12, atol=1e-15)
    # Standardisation makes the soft term invariant to a per-row affine change.
    c = kd_loss(3.0 * s + 7.0, t, standardize=True)
    d = kd_loss(s, t, standardize=True)
    assert c[0] == pytest.approx(d[0], rel=1e-6)
