"""kdnumba.torch: autograd functions and modules over the fused kernels."""

from __future__ import annotations

import inspect
import pathlib
import re
import sys

import numpy as np
import pytest
from testkit import SquaredGap, kd_labels, weighted_squares

torch = pytest.importorskip("torch", reason="PyTorch is not installed: pip install 'kdnumba[torch]'")
F = torch.nn.functional

import kdnumba  # noqa: E402
import kdnumba.torch as kdt  # noqa: E402
from kdnumba import functional  # noqa: E402
from kdnumba.bridges import REGISTERED, registered_losses  # noqa: E402
from kdnumba.strategies import IntermediateActivations  # noqa: E402

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "torch.md"


def _t(array, requires_grad=False):
    return None if array is None else torch.tensor(array, requires_grad=requires_grad)


def torch_kd(s, t, y, temperature, alpha):
    """PyTorch's own KD loss, the formula kdnumba.torch replaces."""
    soft = F.kl_div(F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1),
                    log_target=True, reduction="batchmean") * temperature ** 2
    if y is None:
        return soft
    return alpha * F.cross_entropy(s, y) + (1 - alpha) * soft


# --- import hygiene (importing kdnumba without PyTorch: tests/test_smoke.py) ---

def test_module_named_torch_imports_the_real_pytorch():
    assert kdt.torch is sys.modules["torch"]
    assert hasattr(kdt.torch, "autograd")
    assert pathlib.Path(kdt.__file__).name == "torch.py"
    assert pathlib.Path(kdt.torch.__file__).parent.name == "torch"


# --- functional losses --------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["none", "index", "dense"])
def test_kd_loss_equals_the_functional_layer(rng, dtype, kind):
    s, t = rng.standard_normal((2, 6, 5)).astype(dtype) * 3
    y = kd_labels(kind, rng, 6, 5, dtype)
    want_loss, want_grad = functional.kd_loss(s, t, y, temperature=2.5, alpha=0.4)

    st = _t(s, requires_grad=True)
    loss = kdt.kd_loss(st, _t(t), None if y is None else _t(y), temperature=2.5, alpha=0.4)
    loss.backward()

    assert loss.dtype == st.dtype and loss.shape == ()
    assert loss.item() == pytest.approx(want_loss, rel=1e-6 if dtype == np.float32 else 1e-15)
    assert st.grad.dtype == st.dtype
    np.testing.assert_array_equal(st.grad.numpy(), want_grad)


@pytest.mark.parametrize("kind", ["none", "index", "dense"])
def test_kd_loss_passes_gradcheck(rng, kind):
    s, t = rng.standard_normal((2, 4, 5)) * 2
    y = kd_labels(kind, rng, 4, 5, np.float64)
    st = _t(s, requires_grad=True)
    yt = None if y is None else _t(y)
    assert torch.autograd.gradcheck(
        lambda x: kdt.kd_loss(x, _t(t), yt, temperature=3.0, alpha=0.3), (st,))


def test_backward_scales_by_the_incoming_gradient(rng):
    s, t = rng.standard_normal((2, 3, 4))
    _, grad = functional.kd_loss(s, t)
    st = _t(s, requires_grad=True)
    loss = kdt.kd_loss(st, _t(t))
    (3.0 * loss + loss ** 2).backward()
    np.testing.assert_allclose(st.grad.numpy(), (3.0 + 2 * loss.item()) * grad, rtol=1e-13)


def test_teacher_and_labels_are_constants(rng):
    s, t = rng.standard_normal((2, 3, 4))
    st, tt = _t(s, requires_grad=True), _t(t, requires_grad=True)
    y = _t(np.array([0.2, 0.3, 0.5, 0.0] * 3).reshape(3, 4), requires_grad=True)
    kdt.kd_loss(st, tt, y).backward()
    assert st.grad is not None and torch.count_nonzero(st.grad) > 0
    assert tt.grad is None and y.grad is None


def test_cpu_tensors_reach_the_kernel_without_a_copy(rng):
    seen = []

    def probe(x, y):
        seen.append(x)
        return 0.0, np.zeros_like(x)

    st = _t(rng.standard_normal((3, 4)), requires_grad=True)
    kdt.wrap(probe)(st, None)
    assert np.shares_memory(seen[0], st.detach().numpy())


def test_non_contiguous_tensors_and_inputs_left_untouched(rng):
    base_s, base_t = rng.standard_normal((2, 5, 6))
    st = _t(base_s).t().requires_grad_()     # (6, 5), not contiguous
    tt = _t(base_t).t()
    assert not st.is_contiguous()
    before = (st.detach().clone(), tt.clone())
    loss = kdt.kd_loss(st, tt, temperature=2.0)
    loss.backward()
    want_loss, want_grad = functional.kd_loss(base_s.T.copy(), base_t.T.copy(), temperature=2.0)
    assert loss.item() == want_loss
    np.testing.assert_array_equal(st.grad.numpy(), want_grad)
    assert torch.equal(st.detach(), before[0]) and torch.equal(tt, before[1])


def test_errors_name_the_argument(rng):
    s = torch.randn(3, 4)
    with pytest.raises(TypeError, match="student_logits must be a float32 or float64 tensor"):
        kdt.kd_loss(s.half(), s)
    with pytest.raises(TypeError, match="teacher_logits.*bfloat16"):
        kdt.kd_loss(s, s.bfloat16())
    with pytest.raises(TypeError, match="student_logits"):
        kdt.kd_loss(torch.ones(3, 4, dtype=torch.int64), s)
    with pytest.raises(ValueError, match="batch size mismatch"):
        kdt.kd_loss(s, torch.randn(2, 4))
    with pytest.raises(ValueError, match="labels must be class indices"):
        kdt.kd_loss(s, s, torch.tensor([0, 1, 9]))
    with pytest.raises(ValueError, match="temperature"):
        kdt.kd_loss(s, s, temperature=0.0)
    with pytest.raises(TypeError, match="kd_loss\\(\\).*unexpected keyword"):
        kdt.kd_loss(s, s, tempreature=2.0)
    with pytest.raises(TypeError, match="kd_loss\\(\\).*out"):
        kdt.kd_loss(s, s, out=np.empty((3, 4), np.float32))


def test_device_guard(rng):
    s = torch.randn(3, 4)
    with pytest.raises(ValueError, match="device='cuda' but the tensors are on cpu"):
        kdt.kd_loss(s, s, device="cuda")
    with pytest.raises(ValueError, match="device must be one of"):
        kdt.kd_loss(s, s, device="gpu")
    with pytest.raises(ValueError, match="CPU and CUDA tensors, got meta"):
        kdt.kd_loss(torch.empty(3, 4, device="meta"), torch.empty(3, 4, device="meta"))
    with pytest.raises(ValueError, match="one device.*student_logits on cpu.*teacher_logits on meta"):
        kdt.kd_loss(s, torch.empty(3, 4, device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to PyTorch")
def test_cuda_tensors_match_cpu(rng):
    s, t = rng.standard_normal((2, 8, 10)).astype(np.float32)
    y = rng.integers(0, 10, 8)
    want_loss, want_grad = functional.kd_loss(s, t, y)
    st = _t(s).cuda().requires_grad_()
    loss = kdt.kd_loss(st, _t(t).cuda(), _t(y).cuda())
    loss.backward()
    assert loss.device == st.device
    assert loss.item() == pytest.approx(want_loss, rel=1e-5)
    np.testing.assert_allclose(st.grad.cpu().numpy(), want_grad, rtol=1e-5, atol=1e-7)


def test_second_derivatives_raise_instead_of_being_wrong(rng):
    s, t = rng.standard_normal((2, 3, 4))
    st = _t(s, requires_grad=True)
    weight = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(weight * kdt.kd_loss(st, _t(t)), st, create_graph=True)
    np.testing.assert_allclose(g.detach().numpy(), 2.0 * functional.kd_loss(s, t)[1], rtol=1e-15)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        (g * g).sum().backward()


def test_grad_fn_and_signature_are_the_functionals():
    st = torch.randn(2, 3, requires_grad=True)
    assert type(kdt.kd_loss(st, st.detach()).grad_fn).__name__ == "KdLossFunctionBackward"
    assert issubclass(kdt.kd_loss.Function, torch.autograd.Function)
    params = dict(inspect.signature(functional.kd_loss).parameters)
    del params["out"]
    assert list(inspect.signature(kdt.kd_loss).parameters.values()) == list(params.values())


# --- every registered loss ------------------------------------------------------



def test_registered_losses_are_exported():
    present = registered_losses()
    assert "kd_loss" in present and set(present) <= set(REGISTERED)
    assert set(present) <= set(kdt.__all__)
    for name in present:
        assert getattr(kdt, name).__name__ == name


@pytest.mark.parametrize("name", sorted(registered_losses()))
def test_every_registered_loss_matches_and_passes_gradcheck(loss_cases, name):
    args, kwargs = loss_cases[name]   # a KeyError: add the new loss to loss_cases (conftest)
    want_loss, want_grad = getattr(functional, name)(*args, **kwargs)
    tensors = [_t(a) for a in args]
    tensors[0].requires_grad_()
    loss = getattr(kdt, name)(*tensors, **kwargs)
    loss.backward()
    assert loss.item() == pytest.approx(want_loss, rel=1e-14, abs=1e-300)
    np.testing.assert_array_equal(tensors[0].grad.numpy(), want_grad)
    x = _t(args[0], requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: getattr(kdt, name)(v, *tensors[1:], **kwargs), (x,))


# --- wrap() -------------------------------------------------------------------

def test_wrap_any_loss_and_gradient_function(rng):
    f = kdt.wrap(weighted_squares)
    assert str(inspect.signature(f)) == "(x, target=None, *, k=1.0)"
    x = _t(rng.standard_normal((3, 2)), requires_grad=True)
    target = _t(rng.standard_normal((3, 2)))
    assert torch.autograd.gradcheck(lambda v: f(v, target, k=0.5), (x,))
    assert f(x, k=2.0).item() == pytest.approx(2.0 * float((x.detach() ** 2).sum()))


def test_wrap_rejects_what_it_cannot_adapt():
    with pytest.raises(TypeError, match="\\*args"):
        kdt.wrap(lambda *args: (0.0, args[0]))
    with pytest.raises(TypeError, match="no positional"):
        kdt.wrap(lambda *, k: (0.0, k))
    with pytest.raises(TypeError, match="callable"):
        kdt.wrap(3)
    bad = kdt.wrap(lambda x: (0.0, np.zeros(1)), "bad")
    with pytest.raises(RuntimeError, match="bad returned a gradient of shape"):
        bad(torch.zeros(3, 2))


# --- modules ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["none", "index", "dense"])
def test_kd_module_equals_pytorch_kd(rng, kind):
    s, t = rng.standard_normal((2, 5, 7)) * 2
    y = kd_labels(kind, rng, 5, 7, np.float64)
    yt = None if y is None else _t(y)
    ours, theirs = _t(s, requires_grad=True), _t(s, requires_grad=True)
    module = kdt.KDLoss(temperature=3.0, alpha=0.25)
    a = module(ours, _t(t), yt)
    b = torch_kd(theirs, _t(t), yt, 3.0, 0.25)
    a.backward()
    b.backward()
    assert a.item() == pytest.approx(b.item(), rel=1e-12)
    np.testing.assert_allclose(ours.grad.numpy(), theirs.grad.numpy(), rtol=1e-10, atol=1e-15)
    assert "temperature=3.0, alpha=0.25" in repr(module)


def test_strategy_module_wraps_any_output_strategy(rng):
    s, t = rng.standard_normal((2, 4, 3))
    strategy = kdnumba.DistillationLoss(2.0, 0.5)
    st = _t(s, requires_grad=True)
    kdt.StrategyModule(strategy)(st, _t(t), _t(np.array([0, 1, 2, 0]))).backward()
    np.testing.assert_array_equal(st.grad.numpy(),
                                  strategy.compute_gradient(s, t, np.array([0, 1, 2, 0])))
    assert type(kdt.KDLoss()(st, _t(t)).grad_fn).__name__ == "DistillationLossFunctionBackward"
    with pytest.raises(TypeError, match="DistillationStrategy"):
        kdt.StrategyModule(object())


def test_strategy_module_follows_the_strategys_device():
    module = kdt.KDLoss(device="cpu")
    s = torch.randn(2, 3)
    assert module(s, s).item() == pytest.approx(0.0, abs=1e-6)
    module.strategy.device = "cuda"
    with pytest.raises(ValueError, match="device='cuda' but the tensors are on cpu"):
        module(s, s)


class _TwoCallGap:
    """The same loss through the protocol's two separate methods only."""

    def __init__(self, layer, weight):
        self._fused = SquaredGap(layer, weight)

    def compute_intermediate_loss(self, student_acts, teacher_acts):
        return self._fused.compute_intermediate_loss(student_acts, teacher_acts)

    def compute_intermediate_gradient(self, student_acts, teacher_acts):
        return self._fused.compute_intermediate_gradient(student_acts, teacher_acts)


@pytest.mark.parametrize("strategy_type", [SquaredGap, _TwoCallGap])
def test_intermediate_module_over_dicts_of_tensors(rng, strategy_type):
    module = kdt.IntermediateModule(strategy_type("mid", 0.7))
    mid = _t(rng.standard_normal((3, 2, 2)), requires_grad=True)
    other = _t(rng.standard_normal((3, 5)), requires_grad=True)
    teacher = IntermediateActivations(mid=_t(rng.standard_normal((3, 2, 2)), requires_grad=True))
    loss = module({"other": other, "mid": mid}, teacher)
    (2.0 * loss).backward()
    d = (mid - teacher["mid"]).detach().numpy()
    assert loss.item() == pytest.approx(0.7 * np.mean(d * d), rel=1e-14)
    np.testing.assert_allclose(mid.grad.numpy(), 2.0 * 0.7 * 2.0 * d / d.size, rtol=1e-14)
    assert other.grad is None and teacher["mid"].grad is None
    assert torch.autograd.gradcheck(
        lambda a, b: module({"mid": a, "other": b}, {"mid": teacher["mid"].detach()}),
        (mid.detach().requires_grad_(), other.detach().requires_grad_()))


def test_intermediate_module_errors(rng):
    with pytest.raises(TypeError, match="not an intermediate-activation strategy"):
        kdt.IntermediateModule(kdnumba.DistillationLoss())
    module = kdt.IntermediateModule(SquaredGap("mid", 1.0))
    with pytest.raises(TypeError, match="student_acts must be a mapping"):
        module([torch.zeros(2, 2)], {})
    with pytest.raises(TypeError, match="student_acts\\['mid'\\] must be a float32 or float64"):
        module({"mid": torch.zeros(2, 2, dtype=torch.float16)}, {"mid": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="one device"):
        module({"mid": torch.zeros(2, 2)}, {"mid": torch.zeros(2, 2, device="meta")})


@pytest.mark.parametrize("mode", ["supervised", "triplet"])
def test_intermediate_module_forwards_labels(rng, mode):
    """SUPERVISED/TRIPLET need labels: forward(..., labels=) passes them on (a
    tensor or an array), with the strategy's own value and gradient."""
    strategy = kdnumba.ContrastiveDistillationStrategy("emb", 0.6, mode=mode,
                                                       negatives_sample_size=0)
    module = kdt.IntermediateModule(strategy)
    s = rng.standard_normal((6, 4))
    t = rng.standard_normal((6, 4))
    y = np.array([0, 1, 0, 1, 2, 2])
    expected, grads = strategy.intermediate_loss_and_gradient({"emb": s}, {"emb": t}, labels=y)
    for labels in (torch.tensor(y), y):
        emb = _t(s, requires_grad=True)
        loss = module({"emb": emb}, {"emb": _t(t)}, labels=labels)
        loss.backward()
        assert loss.item() == pytest.approx(expected, rel=1e-14)
        np.testing.assert_allclose(emb.grad.numpy(), grads["emb"], rtol=1e-14)
    with pytest.raises(ValueError, match="labels"):
        module({"emb": _t(s)}, {"emb": _t(t)})
    assert torch.autograd.gradcheck(
        lambda a: module({"emb": a}, {"emb": _t(t)}, labels=torch.tensor(y)),
        (_t(s, requires_grad=True),))


# --- training end to end ------------------------------------------------------

def test_training_a_student_matches_pytorch_kd_step_by_step():
    torch.manual_seed(0)
    x = torch.randn(32, 6, dtype=torch.float64)
    teacher_logits = torch.randn(32, 5, dtype=torch.float64) * 2
    y = teacher_logits.argmax(1)

    def student():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                                   torch.nn.Linear(16, 5)).double()

    ours, theirs = student(), student()
    kd = kdt.KDLoss(temperature=2.0, alpha=0.3)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.5)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.5)
    losses = []
    for _ in range(30):
        for model, opt, loss_fn in ((ours, opt_ours, kd),
                                    (theirs, opt_theirs, lambda s, t, y: torch_kd(s, t, y, 2.0, 0.3))):
            opt.zero_grad()
            loss = loss_fn(model(x), teacher_logits, y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    ours_losses, theirs_losses = np.array(losses[0::2]), np.array(losses[1::2])
    np.testing.assert_allclose(ours_losses, theirs_losses, rtol=1e-10)
    assert ours_losses[-1] < 0.75 * ours_losses[0]
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


# --- docs ---------------------------------------------------------------------

def test_docs_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert blocks, "docs/torch.md has no python example"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOCS), "exec"), namespace)
