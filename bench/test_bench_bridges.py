"""End-to-end PyTorch CPU: a KD training step with ``kdnumba.torch`` vs PyTorch's own loss.

The kernel benchmarks (``bench/test_bench_response.py``) time the loss alone;
here the loss sits inside a real step -- student forward, loss, backward through
the student, SGD update -- so the gain users see is the loss's share of the
step. Run::

    pytest bench/test_bench_bridges.py --benchmark-enable --benchmark-group-by=group

Workload: a 2-layer MLP student (256 -> 512 -> 1000) on a batch of 1024
feature vectors, distilled from cached teacher logits over 1000 classes with
labels (T = 4, alpha = 0.3), float32. ``loss_only`` times the loss's forward
and backward on fixed logits.
"""

from __future__ import annotations

import functools

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: pip install 'kdnumba[torch]'")

import kdnumba.torch as kdt  # noqa: E402
from kdnumba.reference.response import kd_loss_torch  # noqa: E402

BATCH, FEATURES, HIDDEN, CLASSES = 1024, 256, 512, 1000
TEMPERATURE, ALPHA = 4.0, 0.3

LOSSES = {"kdnumba": kdt.KDLoss(TEMPERATURE, ALPHA), "pytorch": functools.partial(kd_loss_torch, temperature=TEMPERATURE, alpha=ALPHA)}


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, FEATURES, generator=gen)
    teacher_logits = 3 * torch.randn(BATCH, CLASSES, generator=gen)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    return x, teacher_logits, labels


def _student():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, HIDDEN), torch.nn.ReLU(),
                               torch.nn.Linear(HIDDEN, CLASSES))


def _training_step(loss_fn, batch):
    x, teacher_logits, labels = batch
    student = _student()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(student(x), teacher_logits, labels)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def test_both_losses_take_the_same_step(batch):
    first = {name: _training_step(fn, batch)() for name, fn in LOSSES.items()}
    assert first["kdnumba"] == pytest.approx(first["pytorch"], rel=1e-5)


@pytest.mark.parametrize("impl", sorted(LOSSES))
def test_kd_training_step(benchmark, batch, impl):
    benchmark.group = f"KD training step, MLP {FEATURES}-{HIDDEN}-{CLASSES}, B={BATCH}, float32"
    loss = benchmark(_training_step(LOSSES[impl], batch))
    assert loss == loss  # finite, not NaN


@pytest.mark.parametrize("impl", sorted(LOSSES))
def test_kd_loss_forward_backward(benchmark, batch, impl):
    benchmark.group = f"KD loss forward+backward, B={BATCH}, C={CLASSES}, float32"
    _, teacher_logits, labels = batch
    logits = torch.randn(BATCH, CLASSES, requires_grad=True)
    loss_fn = LOSSES[impl]

    def loss_only():
        logits.grad = None
        loss_fn(logits, teacher_logits, labels).backward()
        return logits.grad

    grad = benchmark(loss_only)
    assert grad.shape == (BATCH, CLASSES)
