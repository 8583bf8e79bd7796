"""Benchmark cases made from the loss registry: one per declared workload.

For a :class:`kdnumba.registry.Workload` of a loss the case times, on the
same seeded inputs (``spec.make_inputs(rng, dtype, **workload.shape)``):

* kdnumba: the loss with the workload's options (gradient allocated), and the
  ``out=`` variant writing into a preallocated buffer when the loss has one;
* NumPy: ``spec.reference``;
* PyTorch CPU: ``spec.torch``, forward and ``backward()`` with the
  differentiated inputs as leaf tensors whose ``.grad`` is reset each run.

``bytes_moved`` is ``spec.default_bytes`` (the arrays read plus the
gradients written, unless the spec says otherwise); ``flops`` the spec's.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kdnumba import functional

from kdnumba.benchmarking.case import BenchCase, torch_backward
from kdnumba.registry import LossSpec, Workload


def cases_of(spec: LossSpec) -> list[BenchCase]:
    """One :class:`BenchCase` per workload of ``spec``."""
    return [case_of(spec, workload) for workload in spec.workloads]


def case_of(spec: LossSpec, workload: Workload) -> BenchCase:
    dtype = np.dtype(workload.dtype)
    options = dict(workload.options)
    student = spec.array_params[0]

    def make_inputs(rng) -> dict:
        args = spec.make_inputs(rng, dtype, **workload.shape)
        inputs = {"args": args}
        if spec.has_out:
            inputs["out"] = np.empty_like(args[student])
        return inputs

    def kdnumba(d):
        return spec.function(**d["args"], **options)

    def kdnumba_out(d):
        return spec.function(**d["args"], **options, out=d["out"])

    def numpy(d):
        return spec.reference_function()(**d["args"], **options)

    def torch(d):
        return torch_closure(spec, d["args"], options)

    return BenchCase(
        name=f"{spec.name}/{workload.label}/{dtype.name}",
        family=spec.family,
        make_inputs=make_inputs,
        kdnumba=kdnumba,
        numpy=numpy,
        torch=torch if spec.torch else None,
        bytes_moved=lambda d: spec.default_bytes(d["args"]),
        flops=(lambda d: spec.flops(d["args"])) if spec.flops else None,
        quick=workload.quick,
        notes=workload.notes,
        variants=(("out=", kdnumba_out),) if spec.has_out else (),
        compile_group=f"{spec.name}/{dtype.name}",
        dtype=dtype.name,
    )


def torch_closure(spec: LossSpec, args: dict, options: dict):
    """The zero-argument PyTorch run of ``spec`` on ``args``: tensors made once
    (the student a leaf that requires grad), then forward + ``backward()``."""
    import torch

    tensors = {}
    for name, value in args.items():
        if isinstance(value, np.ndarray):
            tensor = torch.from_numpy(value.copy())
            if name in spec.grad_wrt:
                tensor.requires_grad_(True)
            tensors[name] = tensor
        else:
            tensors[name] = value
    loss_fn = spec.torch_function()
    return torch_backward(tensors[spec.array_params[0]], lambda: loss_fn(**tensors, **options))


#: The dtypes of :func:`first_call_cases`.
FIRST_CALL_DTYPES = ("float32", "float64")

#: Prefix of a first-call case's name (``first-call/<loss>/<dtype>``).
FIRST_CALL_PREFIX = "first-call"


def first_call_cases(families=None, dtypes=FIRST_CALL_DTYPES) -> list[BenchCase]:
    """One case per registered loss of ``families`` (all by default) and dtype:
    the loss's first (headline) workload re-typed to that dtype, named
    ``first-call/<loss>/<dtype>``. They measure time to first result
    (:mod:`kdnumba.benchmarking.compile_table`)."""
    cases = []
    for spec in functional.specs():
        if (families is not None and spec.family not in families) or not spec.workloads:
            continue
        for dtype in dtypes:
            case = case_of(spec, dataclasses.replace(spec.workloads[0], dtype=dtype))
            cases.append(dataclasses.replace(
                case, name=f"{FIRST_CALL_PREFIX}/{spec.name}/{dtype}", compile_group=None))
    return cases
