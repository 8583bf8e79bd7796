"""The contract every registered loss honours, checked from its registry entry alone.

scikit-learn's estimator checks for kdnumba: a loss declared with
``kdnumba.registry.register(LossSpec(...))`` gets every test below for free,
for each of its variants and both float dtypes:

* it agrees with its NumPy reference (``spec.reference``) and with central
  finite differences in float64; float32 agrees with float64;
* it is bit-identical with 1 and 2 Numba threads, returns a Python float and
  gradients of the differentiated inputs' shapes and dtype, and never
  modifies its inputs; a teacher of the other float dtype is cast;
* bad input raises ``ValueError``/``TypeError`` naming the argument: NaN/inf
  in any float input, integer/bool/float16/complex/masked arrays, a batch
  mismatch, an empty batch, an unknown device, a bad ``out=``, and the
  loss's own ``spec.bad_inputs``;
* a loss that is never negative in the math is never negative, and one that
  vanishes when the student equals the teacher does (loss and gradient).

Family test files keep only what is specific to their family.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from testkit import (
    assert_loss_grad_close,
    assert_same_loss_and_grad,
    central_difference,
    one_and_two_threads,
)

from kdnumba import _policy, functional, registry

SPECS = functional.specs()
FLOATS = (np.float32, np.float64)
OTHER_FLOAT = {np.dtype(np.float32): np.float64, np.dtype(np.float64): np.float32}

CASES = [pytest.param(spec, variant, id=f"{spec.name}[{variant.name}]")
         for spec in SPECS for variant in spec.variants]
LOSSES = [pytest.param(spec, id=spec.name) for spec in SPECS]


def arguments(spec, variant=None, dtype=np.float64, seed=0, **shape) -> dict:
    """Valid keyword arguments: the spec's inputs for this variant, and its options."""
    variant = variant or spec.variants[0]
    rng = np.random.default_rng(seed)
    args = spec.make_inputs(rng, np.dtype(dtype), **{**variant.inputs, **shape})
    return {**args, **variant.options}


def run(spec, args: dict, **extra):
    """``(loss, [grads])`` of one call."""
    result = spec.function(**args, **extra)
    return result[0], list(result[1:])


def float_arrays(spec, args: dict) -> list[str]:
    """Names of the float array arguments (student first)."""
    return [k for k in spec.array_params
            if isinstance(args.get(k), np.ndarray) and args[k].dtype.kind == "f"]


def batch_arrays(spec, args: dict) -> list[str]:
    """Names of the array arguments that carry one entry per sample."""
    n = args[spec.array_params[0]].shape[0]
    return [k for k in spec.array_params
            if isinstance(args.get(k), np.ndarray) and args[k].ndim >= 1
            and args[k].shape[0] == n]


def tolerance(spec, dtype) -> float:
    return spec.rtol[np.dtype(dtype).name]


# --- agreement ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOATS, ids=["float32", "float64"])
@pytest.mark.parametrize("spec, variant", CASES)
def test_matches_reference(spec, variant, dtype):
    args = arguments(spec, variant, dtype)
    loss, grads = run(spec, args)
    # The reference runs in float64 on the same (rounded) values.
    ref_args = {k: (a.astype(np.float64) if isinstance(a, np.ndarray) and a.dtype.kind == "f"
                    else a) for k, a in args.items()}
    result = spec.reference_function()(**ref_args)
    ref_loss, ref_grads = result[0], result[1:]
    assert len(grads) == len(ref_grads) == len(spec.grad_wrt)
    for grad, ref_grad in zip(grads, ref_grads):
        assert_loss_grad_close(loss, grad.astype(np.float64), ref_loss, ref_grad,
                               tolerance(spec, dtype), loss_atol=1e-12)


@pytest.mark.parametrize("spec, variant", CASES)
def test_gradient_matches_finite_differences(spec, variant):
    args = arguments(spec, variant, np.float64, seed=1)
    _, grads = run(spec, args)
    for name, grad in zip(spec.grad_wrt, grads):
        x = args[name].copy()

        def loss_of(values, name=name):
            return spec.function(**{**args, name: values})[0]

        numeric = central_difference(loss_of, x)
        scale = max(np.abs(numeric).max(), 1e-8)
        np.testing.assert_allclose(grad, numeric, rtol=spec.fd_rtol * 10,
                                   atol=spec.fd_rtol * scale, err_msg=name)


@pytest.mark.parametrize("spec, variant", CASES)
def test_float32_agrees_with_float64(spec, variant):
    args64 = arguments(spec, variant, np.float64, seed=2)
    args32 = {k: (a.astype(np.float32) if isinstance(a, np.ndarray) and a.dtype.kind == "f"
                  else a) for k, a in args64.items()}
    loss64, grads64 = run(spec, args64)
    loss32, grads32 = run(spec, args32)
    for g32, g64 in zip(grads32, grads64):
        assert g32.dtype == np.float32
        assert_loss_grad_close(loss32, g32.astype(np.float64), loss64, g64,
                               tolerance(spec, np.float32), loss_atol=1e-6)


# --- determinism, types, inputs ------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOATS, ids=["float32", "float64"])
@pytest.mark.parametrize("spec", LOSSES)
def test_one_and_two_threads_bit_identical(spec, dtype, monkeypatch):
    args = arguments(spec, None, dtype, seed=3, **(spec.medium or {}))
    monkeypatch.setattr(_policy, "SERIAL_BELOW", 0)  # every launch through the parallel build

    def call():
        loss, grads = run(spec, args)
        return loss, np.concatenate([g.ravel() for g in grads])

    one, two = one_and_two_threads(call)
    assert_same_loss_and_grad(one, two)
    assert_same_loss_and_grad(call(), one)  # and run to run


@pytest.mark.parametrize("dtype", FLOATS, ids=["float32", "float64"])
@pytest.mark.parametrize("spec", LOSSES)
def test_serial_and_parallel_builds_bit_identical(spec, dtype, monkeypatch):
    """Small calls run each kernel's serial build (``_policy.ParallelKernel``);
    both builds must give the same bits, so that the size threshold is never
    visible in a result."""
    args = arguments(spec, None, dtype, seed=5, **(spec.medium or {}))

    def call():
        loss, grads = run(spec, args)
        return loss, np.concatenate([g.ravel() for g in grads])

    monkeypatch.setattr(_policy, "SERIAL_BELOW", 0)  # every launch parallel
    parallel = call()
    monkeypatch.setattr(_policy, "SERIAL_BELOW", 1 << 62)  # every launch serial
    assert_same_loss_and_grad(call(), parallel)


@pytest.mark.parametrize("dtype", FLOATS, ids=["float32", "float64"])
@pytest.mark.parametrize("spec", LOSSES)
def test_returns_float_and_gradients_like_the_inputs(spec, dtype):
    args = arguments(spec, None, dtype)
    loss, grads = run(spec, args)
    assert type(loss) is float and np.isfinite(loss)
    for name, grad in zip(spec.grad_wrt, grads):
        assert isinstance(grad, np.ndarray)
        assert grad.shape == args[name].shape and grad.dtype == np.dtype(dtype)
        assert np.isfinite(grad).all()


@pytest.mark.parametrize("spec, variant", CASES)
def test_inputs_untouched(spec, variant):
    args = arguments(spec, variant, np.float32)
    before = {k: a.copy() for k, a in args.items() if isinstance(a, np.ndarray)}
    run(spec, args)
    for k, a in before.items():
        np.testing.assert_array_equal(args[k], a, err_msg=k)


@pytest.mark.parametrize("spec", LOSSES)
def test_other_float_inputs_are_cast_to_the_students_dtype(spec):
    for dtype in FLOATS:
        args = arguments(spec, None, dtype)
        for name in float_arrays(spec, args)[1:]:
            given = args[name].astype(OTHER_FLOAT[np.dtype(dtype)])
            expected = run(spec, {**args, name: given.astype(dtype)})
            got = run(spec, {**args, name: given})
            assert got[0] == expected[0], name
            for g, e in zip(got[1], expected[1]):
                np.testing.assert_array_equal(g, e, err_msg=name)


@pytest.mark.parametrize("spec", LOSSES)
def test_never_negative_and_zero_at_the_teacher(spec):
    for variant in spec.variants:
        for seed in range(3):
            args = arguments(spec, variant, np.float64, seed=seed)
            loss, _ = run(spec, args)
            if spec.nonnegative:
                assert loss >= 0.0, (variant.name, loss)
    if not spec.zero_when_equal:
        return
    args = arguments(spec, None, np.float64)
    student, teacher = spec.array_params[:2]
    args[teacher] = args[student].copy()
    loss, grads = run(spec, args)
    assert loss == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(grads[0], 0.0, atol=1e-12)


# --- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("spec", LOSSES)
def test_non_finite_input_names_the_argument(spec, bad):
    for dtype in FLOATS:
        args = arguments(spec, None, dtype)
        for name in float_arrays(spec, args):
            poisoned = args[name].copy()
            poisoned.flat[poisoned.size // 2] = bad
            with pytest.raises(ValueError, match=re.escape(name)):
                run(spec, {**args, name: poisoned})


@pytest.mark.parametrize("wrong", [np.int32, np.int64, np.bool_, np.float16, np.complex128],
                         ids=["int32", "int64", "bool", "float16", "complex128"])
@pytest.mark.parametrize("spec", LOSSES)
def test_non_float_arrays_raise_type_error(spec, wrong):
    args = arguments(spec)
    for name in float_arrays(spec, args):
        with pytest.raises(TypeError, match=re.escape(name)):
            run(spec, {**args, name: args[name].astype(wrong)})


@pytest.mark.parametrize("spec", LOSSES)
def test_masked_arrays_are_refused(spec):
    args = arguments(spec)
    for name in float_arrays(spec, args):
        masked = np.ma.masked_array(args[name], mask=np.zeros(args[name].shape, bool))
        with pytest.raises(TypeError, match=rf"{re.escape(name)}.*filled"):
            run(spec, {**args, name: masked})


@pytest.mark.parametrize("spec", LOSSES)
def test_batch_mismatch_and_empty_batch(spec):
    args = arguments(spec)
    names = batch_arrays(spec, args)
    for name in names[1:]:
        with pytest.raises(ValueError):
            run(spec, {**args, name: args[name][:-1]})
    with pytest.raises(ValueError, match="empty|zero-length|at least"):
        run(spec, {**args, **{k: args[k][:0] for k in names}})


@pytest.mark.parametrize("spec", LOSSES)
def test_unknown_device(spec):
    with pytest.raises(ValueError, match="device"):
        run(spec, arguments(spec), device="tpu")


@pytest.mark.parametrize("spec", [p for p in LOSSES if p.values[0].has_out])
def test_out_receives_the_gradient_and_is_checked(spec):
    args = arguments(spec, None, np.float32)
    student = args[spec.array_params[0]]
    loss, grads = run(spec, args)
    out = np.full_like(student, np.nan)
    loss_out, grads_out = run(spec, args, out=out)
    assert grads_out[0] is out
    assert loss_out == loss
    np.testing.assert_array_equal(out, grads[0])
    bad_outs = {
        "wrong shape": np.empty(student.shape + (1,), student.dtype),
        "wrong dtype": np.empty(student.shape, np.float64),
        "non-contiguous": np.empty(student.shape[::-1], student.dtype).T,
        "read-only": np.empty_like(student),
        "the student itself": student,
    }
    bad_outs["read-only"].flags.writeable = False
    for what, bad in bad_outs.items():
        if what == "non-contiguous" and student.ndim < 2:
            continue
        with pytest.raises(ValueError, match="out"):
            run(spec, args, out=bad)
        assert not np.isnan(student).any(), what


@pytest.mark.parametrize("spec", [p for p in LOSSES if p.values[0].bad_inputs])
def test_loss_specific_bad_inputs(spec):
    for bad in spec.bad_inputs:
        args = bad.change(arguments(spec))
        with pytest.raises(bad.error, match=bad.match):
            spec.function(**args)


# --- the registry itself ---------------------------------------------------------------------

#: Public names of kdnumba.functional that are not (loss, grad) functions.
NOT_LOSSES = {"SelectivityMetric", "SelectivityStatistics", "selectivity_statistics", "specs",
              "CRDMemory", "ContrastSampler", "standardize_logits", "standardize_logits_backward"}


def test_every_public_loss_is_registered():
    public = {n for n in functional.__all__ if n not in NOT_LOSSES}
    assert public == {spec.name for spec in SPECS}


def test_registered_functions_are_the_public_ones():
    for spec in SPECS:
        assert getattr(functional, spec.name) is spec.function
        assert registry.get(spec.name) is spec
        assert spec.signature.parameters["device"].default == "auto", spec.name


def test_api_table_in_docs_matches_the_registry():
    text = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    block = re.search(r"<!-- registry-table:start -->\n(.*?)\n<!-- registry-table:end -->",
                      text, re.S)
    assert block, "docs/api.md lacks the generated registry table markers"
    assert block.group(1) == registry.api_table(), (
        "docs/api.md's loss table is stale: paste the output of "
        "`python -c 'import kdnumba.functional as f, kdnumba.registry as r; "
        "print(r.api_table())'` between the markers")
