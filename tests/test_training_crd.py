"""The Distiller drives CRD end to end: per-batch negative sampling (``on_batch``),
the embed heads (student's and teacher's) and the memory update after each step
(``after_step``), and checkpoints that carry the strategy's state."""

from __future__ import annotations

import numpy as np
import pytest

from kdnumba import CRDStrategy
from kdnumba.training import MLP, Distiller
from kdnumba.training.loop import end_step, start_batch


def _data(n=48, classes=3, features=6, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    centres = rng.standard_normal((classes, features)) * 2.0
    x = (centres[y] + rng.standard_normal((n, features))).astype(np.float32)
    return x, y.astype(np.int64)


def _student(seed=1):
    return MLP([6, 8, 3], layer_names=["embeddings", "logits"], learning_rate=1e-2, seed=seed)


def _teacher(x=None, y=None):
    """A wider teacher (embedding width 12, the student's 8), trained on the labels."""
    model = MLP([6, 16, 12, 3], layer_names=["h", "embeddings", "logits"], learning_rate=1e-2,
                seed=7)
    if x is not None:
        Distiller(model, batch_size=8, seed=0, progress=False).fit(x, y, epochs=15)
    return model


def _strategy(y, **kw):
    kw = {"n_negatives": 10, "embed_dim": 4, "crd_weight": 0.5, "seed": 3,
          "head_learning_rate": 1e-2, **kw}
    return CRDStrategy(len(y), labels=y, **kw)


def test_fit_trains_student_heads_and_memory_not_the_teacher():
    x, y = _data()
    teacher = _teacher()
    teacher_before = teacher.state_dict()
    strategy = _strategy(y)
    student = _student()
    trainer = Distiller(student, teacher, strategy, batch_size=8, seed=0, progress=False)
    calls = []
    hooks = (strategy.on_batch, strategy.after_step)

    def on_batch(indices, labels):
        calls.append(("batch", indices.copy()))
        np.testing.assert_array_equal(labels, y[indices])
        return hooks[0](indices, labels)

    def after_step():
        calls.append(("step",))
        hooks[1]()

    trainer._on_batch, trainer._after_step = [on_batch], [after_step]
    # one epoch first, to catch the heads and the banks as they start
    hist = trainer.fit(x, y, epochs=1)
    bank = strategy.memory_bank
    ms0, mt0 = bank.memory_student.copy(), bank.memory_teacher.copy()
    hs0, ht0 = strategy.student_head.weight.copy(), strategy.teacher_head.weight.copy()
    assert strategy.teacher_head.weight.shape == (12, 4)  # teacher width 12, student 8
    hist = trainer.fit(x, y, epochs=6)
    assert [c[0] for c in calls[:4]] == ["batch", "step", "batch", "step"]
    seen = np.sort(np.concatenate([c[1] for c in calls[:12:2]]))
    np.testing.assert_array_equal(seen, np.arange(len(x)))  # one epoch: every row once
    assert hist["train_loss"][-1] < hist["train_loss"][0]
    assert hist["train_intermediate_loss"][-1] < hist["train_intermediate_loss"][0]
    assert not np.allclose(bank.memory_student, ms0)
    assert not np.allclose(bank.memory_teacher, mt0)
    assert not np.allclose(strategy.student_head.weight, hs0)
    assert not np.allclose(strategy.teacher_head.weight, ht0)
    for k, p in teacher.state_dict().items():
        np.testing.assert_array_equal(p, teacher_before[k], err_msg=k)
    assert strategy.contrast_indices is None  # every batch closed by after_step


def test_crd_helps_accuracy_over_epochs():
    x, y = _data(seed=4)
    teacher = _teacher(x, y)
    assert np.mean(np.argmax(teacher.predict(x), 1) == y) > 0.9
    trainer = Distiller(_student(seed=2), teacher, _strategy(y, crd_weight=0.3),
                        batch_size=8, seed=1, progress=False)
    hist = trainer.fit(x, y, epochs=8)
    assert hist["train_accuracy"][-1] > hist["train_accuracy"][0]
    assert hist["train_accuracy"][-1] > 0.8


def test_checkpoint_resume_carries_the_strategy_state(tmp_path):
    x, y = _data()

    def run(epochs, **kw):
        strategy = _strategy(y)
        student = _student()
        hist = Distiller(student, _teacher(), strategy, batch_size=8, seed=0,
                         progress=False).fit(x, y, epochs=epochs, **kw)
        return hist, student, strategy

    whole, student_w, strategy_w = run(4)
    ckpt = tmp_path / "crd.npz"
    run(2, checkpoint=ckpt)
    hist, student, strategy = run(4, checkpoint=ckpt, resume=True)
    assert hist["train_loss"] == whole["train_loss"]
    for k, p in student_w.parameters.items():
        np.testing.assert_array_equal(student.parameters[k], p, err_msg=k)
    np.testing.assert_array_equal(strategy.memory_bank.memory_student,
                                  strategy_w.memory_bank.memory_student)
    np.testing.assert_array_equal(strategy.teacher_head.weight, strategy_w.teacher_head.weight)
    assert strategy.memory_bank.log_constants == strategy_w.memory_bank.log_constants


def test_hooks_reach_hybrid_members():
    from kdnumba import DistillationLoss, HybridDistillationStrategy
    x, y = _data(n=12)
    crd = _strategy(y)
    hybrid = HybridDistillationStrategy([(DistillationLoss(), 0.5), (crd, 0.5)])
    start_batch(hybrid, np.arange(4), y[:4])
    assert crd.contrast_indices.shape == (4, 11)
    end_step(hybrid)  # no loss call: nothing to update, the batch is closed
    assert crd.contrast_indices is None
    hist = Distiller(_student(), _teacher(), hybrid, batch_size=4, seed=0,
                     progress=False).fit(x, y, epochs=2)
    assert len(hist) == 2 and crd.memory_bank is not None


def test_misaligned_labels_are_refused():
    x, y = _data(n=12)
    strategy = _strategy(y[::-1].copy())
    with pytest.raises(ValueError, match="labels"):
        Distiller(_student(), _teacher(), strategy, batch_size=4, seed=0,
                  progress=False).fit(x, y, epochs=1)
