"""Contrastive losses on the CUDA path (the public functions with device="cuda")
against the CPU kernels, and the float32 loss of confident positives."""

from __future__ import annotations

import numpy as np
import pytest
from cuda_support import assert_matches_cpu, device, foreign, to_host

from kdnumba.functional import info_nce, nt_xent, supervised_contrastive, triplet_loss

DTYPES = [np.float32, np.float64]
TOL = {np.float32: dict(rtol=2e-4, atol=2e-6), np.float64: dict(rtol=1e-10, atol=1e-13)}
PUBLIC = {"nt_xent": nt_xent, "info_nce": info_nce, "supervised_contrastive": supervised_contrastive,
          "triplet_loss": triplet_loss}


def _gpu(name):
    """The public function ``name`` pinned to the CUDA path."""
    return lambda *args, **kw: PUBLIC[name](*args, **kw, device="cuda")


def _emb(rng, dtype, n=7, dim=6, n_neg=0):
    s = rng.standard_normal((n, dim)).astype(dtype)
    t = (s + 0.5 * rng.standard_normal((n, dim))).astype(dtype)
    neg = rng.standard_normal((n_neg, dim)).astype(dtype) if n_neg else None
    return s, t, neg


def _check(got, ref, dtype):
    assert_matches_cpu(got, ref, dtype, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["nt_xent", "info_nce"])
def test_host_inputs_match_cpu(rng, dtype, name):
    s, t, neg = _emb(rng, dtype, n_neg=3)
    public = {"nt_xent": nt_xent, "info_nce": info_nce}[name]
    cuda_fn = _gpu(name)
    for negatives in (None, neg):
        got = cuda_fn(s, t, temperature=0.2, negatives=negatives)
        assert isinstance(got[1], np.ndarray)
        _check(got, public(s, t, temperature=0.2, negatives=negatives, device="cpu"), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_supervised_matches_cpu(rng, dtype):
    s, t, neg = _emb(rng, dtype, n_neg=2)
    y = np.array([2, 0, 2, 5, 0, 2, 7])
    got = _gpu("supervised_contrastive")(foreign(s), foreign(t), foreign(y),
                                             temperature=0.1, negatives=neg)
    assert not isinstance(got[1], np.ndarray)
    ref = supervised_contrastive(s, t, y, temperature=0.1, negatives=neg, device="cpu")
    _check(got, ref, dtype)


def test_device_inputs_sharp_temperature_and_zero_rows(rng):
    # tau = 0.01: logits up to 100, the online maximum keeps exp in range.
    s, t, neg = _emb(rng, np.float64, n=6, dim=5, n_neg=2)
    s[3] = 0.0  # a zero row: the clamped branch of the normalisation
    for name, public in (("nt_xent", nt_xent), ("info_nce", info_nce)):
        got = _gpu(name)(device(s), device(t), temperature=0.01,
                                         negatives=device(neg))
        assert not isinstance(got[1], np.ndarray)
        _check(got, public(s, t, temperature=0.01, negatives=neg, device="cpu"), np.float64)


def test_batch_larger_than_a_tile_and_wide_rows(rng):
    s, t, _ = _emb(rng, np.float32, n=9, dim=11)
    _check(_gpu("nt_xent")(s, t.astype(np.float64)),
           nt_xent(s, t.astype(np.float64), device="cpu"), np.float32)


def test_single_row_and_empty_queue(rng):
    s, t, _ = _emb(rng, np.float64, n=1, dim=3)
    empty = np.zeros((0, 3))
    _check(_gpu("nt_xent")(s, t, negatives=empty),
           nt_xent(s, t, negatives=empty, device="cpu"), np.float64)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_errors_match_cpu(rng):
    s, t, neg = _emb(rng, np.float64, n=4, dim=3, n_neg=2)
    bad = t.copy()
    bad[1, 2] = np.nan
    cases = [
        (dict(student_emb=s, teacher_emb=t[:3]), ValueError, "batch size mismatch"),
        (dict(student_emb=s, teacher_emb=t[:, :2]), ValueError, "embedding width mismatch"),
        (dict(student_emb=s, teacher_emb=bad), ValueError, "teacher_emb contains NaN"),
        (dict(student_emb=s, teacher_emb=t, negatives=neg[:, :2]), ValueError,
         "negatives have width|width mismatch"),
        (dict(student_emb=s.astype(np.int32), teacher_emb=t), TypeError, "float32 or float64"),
        (dict(student_emb=s, teacher_emb=t, temperature=0.0), ValueError, "temperature"),
    ]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            nt_xent(**kwargs, device="cpu")
        dev = {k: (foreign(val) if isinstance(val, np.ndarray) else val)
               for k, val in kwargs.items()}
        student, teacher = dev.pop("student_emb"), dev.pop("teacher_emb")
        with pytest.raises(exc, match=match):
            _gpu("nt_xent")(student, teacher, **dev)
    with pytest.raises(ValueError, match="hard classes"):
        _gpu("supervised_contrastive")(s, t, np.full((4, 2), 0.5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_triplet_matches_cpu(rng, dtype):
    s = (3.0 * rng.standard_normal((9, 5))).astype(dtype)
    y = np.array([0, 1, 0, 2, 1, 0, 3, 1, 2])  # class 3 is a singleton: not an anchor
    s[4] = s[1]  # coincident positives: zero unit vector, no NaN
    got = _gpu("triplet_loss")(foreign(s), foreign(y), margin=0.5)
    assert not isinstance(got[1], np.ndarray)
    _check(got, triplet_loss(s, y, margin=0.5, device="cpu"), dtype)
    # Large margin: every anchor active; several anchors share hard positives.
    _check(_gpu("triplet_loss")(s, y, margin=50.0),
           triplet_loss(s, y, margin=50.0, device="cpu"), dtype)


def test_triplet_without_qualifying_anchors(rng):
    s = rng.standard_normal((3, 4))
    loss, grad = _gpu("triplet_loss")(device(s), np.array([0, 1, 2]))
    assert loss == 0.0
    np.testing.assert_array_equal(to_host(grad), np.zeros_like(s))
    with pytest.raises(ValueError, match="margin must be >= 0"):
        _gpu("triplet_loss")(s, np.array([0, 0, 1]), margin=-1.0)


def test_public_api_routes_to_cuda(rng):
    s, t, _ = _emb(rng, np.float64, n=4, dim=3)
    loss, grad = nt_xent(foreign(s), foreign(t))
    assert not isinstance(grad, np.ndarray)
    _check((loss, grad), nt_xent(s, t, device="cpu"), np.float64)
    y = np.array([0, 1, 0, 1])
    _check(supervised_contrastive(foreign(s), foreign(t), y),
           supervised_contrastive(s, t, y, device="cpu"), np.float64)
    _check(info_nce(foreign(s), foreign(t)), info_nce(s, t, device="cpu"), np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ragged_tiles_and_split_accumulator(rng, dtype):
    # Under the simulator: 6 anchors = 2 row tiles, 6 + 5 candidates = 3 column
    # tiles, D = 9 > ACC_DIM = 8 (a second launch for one accumulator column).
    s, t, neg = _emb(rng, dtype, n=6, dim=9, n_neg=5)
    for name, public in (("nt_xent", nt_xent), ("info_nce", info_nce)):
        got = _gpu(name)(s, t, temperature=0.3, negatives=neg)
        _check(got, public(s, t, temperature=0.3, negatives=neg, device="cpu"), dtype)


def _confident(rng, dtype, n=6, dim=5):
    s = rng.standard_normal((n, dim)).astype(dtype)
    return s, (s + 1e-4 * rng.standard_normal((n, dim))).astype(dtype)


@pytest.mark.parametrize("name", ["nt_xent", "info_nce", "supervised_contrastive"])
def test_float32_confident_positives_never_negative_and_relatively_accurate(rng, name):
    # tau = 0.003: logits up to 333; the loss is tiny. Its positive term and
    # log-sum-exp come from the same rounded logits, so it is >= 0 and close
    # to the float64 value relative to its own size.
    s, t = _confident(rng, np.float32)
    labels = (np.arange(6),) if name == "supervised_contrastive" else ()
    for tau in (0.003, 0.02, 0.2):
        loss32, _ = _gpu(name)(s, t, *labels, temperature=tau)
        loss64, _ = PUBLIC[name](s.astype(np.float64), t.astype(np.float64), *labels,
                                 temperature=tau, device="cpu")
        assert loss32 >= 0.0, (tau, loss32)
        assert loss32 == pytest.approx(loss64, rel=1e-3, abs=1e-12), tau


def test_extreme_finite_float32_inputs_give_finite_losses():
    x = np.array([[3e38, 3e38], [1.0, 2.0]], np.float32)
    y = np.array([[1.0, 2.0], [3e38, -3e38]], np.float32)
    for name in ("nt_xent", "info_nce"):
        got = _gpu(name)(x, y)
        _check(got, PUBLIC[name](x, y, device="cpu"), np.float32)
        assert np.isfinite(got[0])


@pytest.mark.parametrize("name", ["nt_xent", "triplet_loss"])
def test_out_receives_the_gradient(rng, name):
    s, t, _ = _emb(rng, np.float64, n=5, dim=3)
    args = (s, t) if name == "nt_xent" else (s, np.array([0, 0, 1, 1, 0]))
    out = np.full_like(s, np.nan)
    loss, grad = _gpu(name)(*args, out=out)
    assert grad is out
    _check((loss, out), PUBLIC[name](*args, device="cpu"), np.float64)
    dev_out = device(np.full_like(s, np.nan))
    loss, grad = _gpu(name)(device(s), *args[1:], out=dev_out)
    assert grad is dev_out
    _check((loss, grad), PUBLIC[name](*args, device="cpu"), np.float64)
