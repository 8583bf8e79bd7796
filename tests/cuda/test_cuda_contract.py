"""Every registered loss that declares ``"cuda"``: the CUDA path agrees with the CPU
path, from the registry entry alone (simulator or GPU).

For each variant the GPU implements (``Variant.devices``), in float32, and
for the first one also in float64: host inputs on ``device="cuda"`` give a
NumPy gradient; for the first variant, Numba device arrays and bare
``__cuda_array_interface__`` objects (``device="auto"``) give a gradient on
the device; all agree with the CPU kernels. A variant the GPU lacks raises
``NotImplementedError`` there. NaN input names the argument as on the CPU. Shapes are the
spec's small contract inputs (the simulator runs every GPU thread as a
Python thread).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from cuda_support import device, foreign, to_host

from kdnumba import functional

SPECS = [s for s in functional.specs() if "cuda" in s.devices]
CUDA_VARIANTS = {s.name: [v for v in s.variants if "cuda" in v.devices] for s in SPECS}
#: Every variant in float32; float64 and the device-array paths on the first one
#: (the simulator runs each GPU thread as a Python thread: keep CI time bounded).
CASES = [pytest.param(spec, variant, np.float32, id=f"{spec.name}[{variant.name}]-float32")
         for spec in SPECS for variant in CUDA_VARIANTS[spec.name]]
CASES += [pytest.param(spec, CUDA_VARIANTS[spec.name][0], np.float64,
                       id=f"{spec.name}[{CUDA_VARIANTS[spec.name][0].name}]-float64")
          for spec in SPECS]
FIRST = [pytest.param(spec, CUDA_VARIANTS[spec.name][0], id=spec.name) for spec in SPECS]
TOL = {np.float32: dict(rtol=2e-5, atol=2e-7), np.float64: dict(rtol=1e-11, atol=1e-14)}


def _arguments(spec, variant, dtype):
    rng = np.random.default_rng(5)
    args = spec.make_inputs(rng, np.dtype(dtype), **variant.inputs)
    return {**args, **variant.options}


def _assert_close(got, ref, dtype, n_grads):
    tol = TOL[dtype]
    assert isinstance(got[0], float)
    assert got[0] == pytest.approx(ref[0], rel=tol["rtol"], abs=tol["atol"])
    for g, r in zip(got[1:1 + n_grads], ref[1:1 + n_grads]):
        g = to_host(g)
        assert g.dtype == np.dtype(dtype) and g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=tol["rtol"],
                                   atol=tol["rtol"] * max(np.abs(r).max(), 1e-30))


@pytest.mark.parametrize("spec, variant, dtype", CASES)
def test_host_inputs_on_cuda_match_cpu(spec, variant, dtype):
    args = _arguments(spec, variant, dtype)
    ref = spec.function(**args, device="cpu")
    got = spec.function(**args, device="cuda")
    for g in got[1:]:
        assert isinstance(g, np.ndarray)
    _assert_close(got, ref, dtype, len(spec.grad_wrt))


@pytest.mark.parametrize("spec, variant", FIRST)
def test_device_arrays_stay_on_the_device(spec, variant):
    args = _arguments(spec, variant, np.float32)
    ref = spec.function(**args, device="cpu")
    arrays = [k for k in spec.array_params if isinstance(args.get(k), np.ndarray)]
    for wrap in (device, foreign):
        on_gpu = {**args, **{k: wrap(args[k]) for k in arrays}}
        got = spec.function(**on_gpu)  # "auto" sees the GPU arrays
        assert not isinstance(got[1], np.ndarray)
        _assert_close(got, ref, np.float32, len(spec.grad_wrt))


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.name) for s in SPECS])
def test_nan_on_the_device_names_the_argument(spec):
    args = _arguments(spec, spec.variants[0], np.float64)
    student = spec.array_params[0]
    poisoned = args[student].copy()
    poisoned.flat[0] = np.nan
    with pytest.raises(ValueError, match=re.escape(student)):
        spec.function(**{**args, student: device(poisoned)})


@pytest.mark.parametrize("spec, variant", [
    pytest.param(s, v, id=f"{s.name}[{v.name}]") for s in SPECS for v in s.variants
    if "cuda" not in v.devices])
def test_variants_the_gpu_lacks_say_so(spec, variant):
    with pytest.raises(NotImplementedError, match="CUDA"):
        spec.function(**_arguments(spec, variant, np.float32), device="cuda")
