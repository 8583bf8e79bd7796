"""Helpers shared by the test files (imported as ``testkit``; pytest puts ``tests/``
on ``sys.path``, and ``tests/conftest.py`` registers this module for assertion
rewriting so a failed ``assert`` here reports its values).

Tolerances stay with each test file: every check takes them as arguments.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest

from kdnumba.strategies import IntermediateActivations, IntermediateStrategyMixin

# --- numerical checks ------------------------------------------------------------------


def central_difference(f, x, h=1e-6):
    """``df/dx`` of a scalar function, every coordinate: ``(f(x + h e_i) - f(x - h e_i)) / 2h``.

    ``x`` is perturbed in place, one coordinate at a time, and restored exactly
    after each; pass a copy if ``f`` also sees ``x`` some other way.
    """
    grad = np.empty_like(x)
    for i in np.ndindex(x.shape):
        keep = x[i]
        x[i] = keep + h
        up = f(x)
        x[i] = keep - h
        down = f(x)
        x[i] = keep
        grad[i] = (up - down) / (2 * h)
    return grad


def assert_loss_grad_close(loss, grad, ref_loss, ref_grad, rtol, *, loss_atol=1e-300,
                           grad_floor=1e-300):
    """``loss`` within ``max(rtol * |ref_loss|, loss_atol)`` of ``ref_loss``, and
    ``|grad - ref_grad| <= rtol * |ref_grad| + rtol * max(max|ref_grad|, grad_floor)``
    (the absolute part scales with the largest gradient entry)."""
    assert loss == pytest.approx(ref_loss, rel=rtol, abs=loss_atol)
    np.testing.assert_allclose(grad, ref_grad, rtol=rtol,
                               atol=rtol * max(np.abs(ref_grad).max(), grad_floor))


def one_and_two_threads(call):
    """``(call() with 1 Numba thread, call() with 2)``, the caller's count restored.

    Uses as many threads as there are when Numba has fewer than 2.
    """
    previous = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = call()
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = call()
    finally:
        numba.set_num_threads(previous)
    return one, two


def assert_same_loss_and_grad(a, b):
    """Two ``(loss, grad)`` results are bit-identical."""
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])


def assert_inputs_untouched(call, *arrays):
    """``call()`` leaves every one of ``arrays`` exactly as it found it."""
    before = [a.copy() for a in arrays]
    call()
    for a, a0 in zip(arrays, before):
        np.testing.assert_array_equal(a, a0)


# --- inputs and stand-ins --------------------------------------------------------------


def softmax(x):
    """Softmax over the last axis (attention maps that are distributions)."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def kd_labels(kind, rng, n_rows, n_classes, dtype):
    """Labels for ``kd_loss``: ``"none"``, ``"index"`` (class indices) or ``"dense"``
    (soft targets of ``dtype``, every row summing to 1)."""
    if kind == "none":
        return None
    if kind == "index":
        return rng.integers(0, n_classes, n_rows)
    soft = rng.random((n_rows, n_classes)).astype(dtype) + 0.1
    return soft / soft.sum(axis=1, keepdims=True)


def weighted_squares(x, target=None, *, k=1.0):
    """A (loss, gradient) function to wrap: ``k * sum((x - target)^2)``, ``2k (x - target)``."""
    d = x - (0.0 if target is None else target)
    return k * float((d * d).sum()), 2.0 * k * d


class SquaredGap(IntermediateStrategyMixin):
    """``weight * mean((s[layer] - t[layer])^2)`` on one layer: a NumPy stand-in
    for an intermediate strategy, to test the framework bridges' plumbing."""

    def __init__(self, layer, weight):
        self.layer, self.weight = layer, weight

    def intermediate_loss_and_gradient(self, student_acts, teacher_acts):
        d = np.asarray(student_acts[self.layer]) - np.asarray(teacher_acts[self.layer])
        grads = IntermediateActivations({self.layer: self.weight * 2.0 * d / d.size})
        return self.weight * float(np.mean(d * d)), grads
