"""Property-based tests over the loss registry: each loss's invariants, searched for
violations with Hypothesis.

Every loss in :func:`kdnumba.functional.specs` (so a newly registered loss is covered
with nothing to add here), each of its variants, and both float dtypes. Inputs come
from the spec itself: a drawn seed and drawn sizes go to ``spec.make_inputs(rng,
dtype, **variant.inputs, **sizes)``, and the arrays are then transformed (scaled,
laid out differently, made read-only, or broken on purpose).

Sizes. The size keywords of ``make_inputs`` are read from the registry: its
keyword-only parameters whose default is an int or a tuple of ints, plus the keys of
``spec.medium`` and of the workloads' shapes (a ``**shape`` signature shows nothing).
Each size is drawn small (1..6, so B=1 and C=1 come up; 0..6 for a size whose default
is 0, such as a queue); at most one is drawn large: the first (the batch, by the
registry's convention: ``rows`` or axis 0 of ``shape``) up to 256 rows, any other up
to 2048 (a wide row). A keyword the variant fixes is not drawn. When ``make_inputs``
cannot build the drawn sizes (sizes coupled to a variant's fixed ones), the example
falls back to the variant's own sizes.

Properties (``test_*`` below):

* ``valid_inputs``: the loss is a finite Python float, ``>= 0`` where
  ``spec.nonnegative``; every gradient is finite with its input's shape and dtype; no
  input changed (bit for bit); the same inputs as Fortran-ordered, strided (the
  skipped elements are NaN), negatively strided and read-only views give the same
  bits and are left untouched. Values are scaled by 10**e, e in
  [-6, 4], for the arrays the loss accepts at any scale (probed once per variant:
  e.g. not probability inputs). A ``ValueError`` is accepted only when a drawn size
  is 1 (or 0): see ``test_sizes_of_one`` for which losses refuse which.
* ``views_compile_nothing`` (deterministic): those layouts and read-only views
  compile no new signature of any CPU kernel.
* ``float32_agrees_with_float64``: float32 inputs, and the same values in float64;
  the loss within 1e-3 (5x the spec's float32 rtol) of |loss64|, the gradient within
  1e-3 of its largest entry (norm-wise), both widened by what one float32 rounding of
  the inputs does to the float64 result (conditioning) and by absolute floors of 1e-6;
  see ``F32_FACTOR`` and the constants after it.
* ``zero_when_equal`` (``spec.zero_when_equal``): teacher = student gives loss and
  gradient 0, to 64 ulps (``ZERO_ULPS``) of the loss and gradient at the drawn teacher.
* ``bad_inputs``: a valid call broken one way -- a float array of another dtype,
  NaN/inf at random positions, an array with an axis more or less, one batch array a
  row shorter or longer -- raises ``ValueError``/``TypeError``: never another
  exception (a Numba error, ``IndexError``, ``ZeroDivisionError``...), and never a
  returned number.
* ``extreme_values``: values scaled towards the float type's limits (down to
  subnormal, up to a tenth of the largest float) either raise
  ``ValueError``/``TypeError`` or give a finite, non-negative-where-promised loss and
  finite gradients: never a silent NaN/inf.

Profiles (registered in ``tests/conftest.py``): ``ci`` (the default: 8 examples per
case, no deadline, derandomized and no example database, so CI sees the same examples
on every run; about 45 s for 18 losses on 2 busy cores with a warm Numba cache) and ``dev`` (many examples, random, for local
bug hunting)::

    python3 -m pytest tests/test_properties.py                           # ci
    KDNUMBA_HYPOTHESIS_PROFILE=dev python3 -m pytest tests/test_properties.py

The first run compiles each kernel once per dtype (cached on disk), so it is slower.
Cases that find a known bug are marked ``xfail(strict=True)`` in ``KNOWN_BUGS``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import pkgutil
import sys
from dataclasses import dataclass, field

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

from kdnumba._policy import ParallelKernel
from kdnumba import functional, registry

SPECS = functional.specs()
FLOATS = (np.float32, np.float64)
FLOAT_IDS = ("float32", "float64")

#: Largest size drawn for the batch, and for any other size (one per example).
LONG_BATCH = 256
WIDE_ROW = 2048
#: Small sizes.
SMALL = 6
#: Seeds per size-of-one case.
SIZE_ONE_SEEDS = 16
#: Scale exponents (base 10) of the valid-input and float32 properties.
SCALE_EXPONENTS = (-6.0, 4.0)

#: float32 vs float64 on the same (float32) values. With ``rtol = F32_FACTOR *
#: spec.rtol["float32"]`` (2e-4 * 5 = 1e-3 for every loss today: the contract suite's
#: tolerance, widened for rows of up to 2048 terms and scales from 1e-6 to 1e4):
#:
#:   |loss32 - loss64|   <= rtol * |loss64| + F32_CONDITION * dL + F32_LOSS_ATOL
#:   max|g32 - g64|      <= rtol * max(max|g64|, |loss64| / max|x|) + F32_CONDITION * dG
#:                          + F32_GRAD_ATOL
#:
#: ``dL``, ``dG``: how much the float64 loss and gradient move when every input is
#: perturbed by one float32 rounding (relative 2**-24, random signs) -- the error a
#: float32 computation cannot avoid on an ill-conditioned problem (a variance of nearly
#: equal values, a loss that is a small difference of large terms). ``|loss64| /
#: max|x|`` is the gradient's natural scale where its entries cancel to ~0 (e.g. the
#: gradient of a cosine of 1-D vectors is exactly 0 in float64, rounding noise in
#: float32).
F32_FACTOR = 5.0
F32_CONDITION = 10.0
#: Absolute floor of the loss comparison: the contract suite's (a loss far below float32's
#: resolution of its terms, e.g. kd_loss = 2.5e-11 from logits of size 100, is 0 in
#: float32).
F32_LOSS_ATOL = 1e-6
#: Absolute floor of the gradient comparison. Needed by the contrastive losses with a
#: confident positive (tau = 0.02-0.07, loss ~1e-7): gradient entries of ~1e-5 are
#: differences of O(1/tau) terms, and float32 gets them to ~5e-7 absolute (5-9% of
#: the largest entry), as any float32 softmax-minus-one-hot does.
F32_GRAD_ATOL = 1e-6
#: Student == teacher, with ``u = ZERO_ULPS * eps`` (eps of the dtype):
#: ``|loss| <= u * max(|loss at the drawn teacher|, u)`` and
#: ``max|grad| <= u * max(max|grad at the drawn teacher|, 1)``. The two sides go through
#: different code paths (exact 0 is not promised); squared-difference losses then give
#: squares of rounding errors (1e-32 in float64), hence the ``u**2`` floor; gradient
#: entries are differences of O(1) terms (softmax probabilities, normalised rows).
ZERO_ULPS = 64.0

#: Known bugs: (spec name, test name) -> reason; those cases xfail(strict=True).
KNOWN_BUGS: dict[tuple[str, str], str] = {
    ("pkt_loss", "float32_agrees_with_float64[eps 1e-7]"): (
        "BUG? (precision): pkt_loss float32 differs from float64 by 0.14% (loss) and 2.6% "
        "(gradient) when two rows are antiparallel (always for D=1): there K_ij = 0 "
        "exactly in float64 but ~6e-8 in float32, the size of eps=1e-7 in "
        "log((p_t + eps) / (p_s + eps))"),
}

PROPERTY_SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                           HealthCheck.data_too_large],
)


# --- what the registry says about each loss ----------------------------------------------

def _size_like(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    return (isinstance(value, tuple) and len(value) > 0
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                    for v in value))


def size_keywords(spec) -> dict[str, tuple[object, bool]]:
    """``name -> (example value, optional)`` of the size keywords of ``make_inputs``.

    Keyword-only parameters with an int / int-tuple default, plus the keys of
    ``spec.medium`` and of the workloads' shapes with such values; ``optional`` when
    the default is ``None`` (the size of an optional thing, e.g. a wider teacher)."""
    found: dict[str, tuple[object, bool]] = {}
    for p in inspect.signature(spec.make_inputs).parameters.values():
        if p.kind == p.KEYWORD_ONLY and _size_like(p.default):
            found[p.name] = (p.default, False)
    defaults = {p.name: p.default for p in inspect.signature(spec.make_inputs).parameters.values()
                if p.kind == p.KEYWORD_ONLY}
    for shape in [spec.medium or {}] + [w.shape for w in spec.workloads]:
        for name, value in shape.items():
            if name not in found and _size_like(value):
                found[name] = (value, defaults.get(name, 0) is None)
    return found


def lookup(name: str, variant_name: str):
    """``(spec, variant)`` by name (the tests take names: readable Hypothesis reports)."""
    spec = registry.get(name)
    return spec, next(v for v in spec.variants if v.name == variant_name)


def _is_float_array(x) -> bool:
    return isinstance(x, np.ndarray) and x.dtype.kind == "f"


def make(spec, variant, dtype, seed: int, sizes: dict) -> tuple[dict, bool]:
    """``(keyword arguments, sizes used)``: the spec's inputs with the variant's options."""
    rng_args = {**variant.inputs}
    try:
        made = spec.make_inputs(np.random.default_rng(seed), np.dtype(dtype),
                                **{**rng_args, **sizes})
        used = True
    except Exception:  # sizes the variant's fixed ones do not allow
        made = spec.make_inputs(np.random.default_rng(seed), np.dtype(dtype), **rng_args)
        used = False
    return {**made, **variant.options}, used


def run(spec, args: dict):
    result = spec.function(**args)
    return result[0], list(result[1:])


def array_names(spec, args: dict) -> list[str]:
    return [k for k in args if isinstance(args[k], np.ndarray)]


def scalable(spec, variant) -> tuple[str, ...]:
    return _scalable(spec.name, variant.name)


@functools.lru_cache(maxsize=None)
def _scalable(name: str, variant_name: str) -> tuple[str, ...]:
    """The float array arguments the loss accepts at any scale (each alone scaled by
    0.5, 2 and 1000 on the variant's own inputs is accepted): not probabilities,
    soft labels..."""
    spec, variant = lookup(name, variant_name)
    args, _ = make(spec, variant, np.float64, 0, {})
    names = []
    for name in spec.array_params:
        if not _is_float_array(args.get(name)):
            continue
        try:
            for factor in (0.5, 2.0, 1000.0):
                run(spec, {**args, name: args[name] * factor})
        except (ValueError, TypeError):
            continue
        names.append(name)
    return tuple(names)


def batch_names(spec, variant) -> tuple[str, ...]:
    return _batch_names(spec.name, variant.name)


@functools.lru_cache(maxsize=None)
def _batch_names(name: str, variant_name: str) -> tuple[str, ...]:
    """Array arguments with one entry per sample, from the variant's own inputs (whose
    batch differs from its queue sizes): leading axis = the student's."""
    spec, variant = lookup(name, variant_name)
    args, _ = make(spec, variant, np.float64, 0, {})
    n = args[spec.array_params[0]].shape[0]
    return tuple(k for k in spec.array_params
                 if isinstance(args.get(k), np.ndarray) and args[k].ndim >= 1
                 and args[k].shape[0] == n)


def flattened(spec, variant) -> tuple[str, ...]:
    return _flattened(spec.name, variant.name)


@functools.lru_cache(maxsize=None)
def _flattened(name: str, variant_name: str) -> tuple[str, ...]:
    """Array arguments whose trailing axes the loss flattens (documented by e.g.
    rkd_loss, sp_loss, pkt_loss: "rows are flattened to (B, D)"): an extra trailing
    axis of length 1 is accepted with the same loss. An axis more or less is no error
    for those, so the ndim mutation leaves them alone."""
    spec, variant = lookup(name, variant_name)
    args, _ = make(spec, variant, np.float64, 0, {})
    loss, _ = run(spec, args)
    names = []
    for k in spec.array_params:
        a = args.get(k)
        if not isinstance(a, np.ndarray) or a.ndim < 2:
            continue
        try:
            if run(spec, {**args, k: a[..., None]})[0] == loss:
                names.append(k)
        except (ValueError, TypeError):
            pass
    return tuple(names)


def cpu_dispatchers() -> list:
    """Every Numba dispatcher of the CPU kernels (imported ones)."""
    import kdnumba.kernels.cpu as cpu

    found = []
    for info in pkgutil.iter_modules(cpu.__path__):
        module = sys.modules.get(f"{cpu.__name__}.{info.name}")
        if module is None:
            module = importlib.import_module(f"{cpu.__name__}.{info.name}")
        for obj in vars(module).values():
            # A parallel kernel is a ParallelKernel holding a parallel and a serial build.
            builds = obj.builds if isinstance(obj, ParallelKernel) else (obj,)
            found += [b for b in builds if isinstance(b, numba.core.dispatcher.Dispatcher)]
    return found


def snapshot(args: dict) -> dict:
    return {k: (a.dtype, a.shape, a.tobytes()) for k, a in args.items()
            if isinstance(a, np.ndarray)}


def same_bits(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


# --- strategies ------------------------------------------------------------------------------

@dataclass
class Problem:
    """One drawn call: seed, sizes, scale exponent; ``args`` built from them."""

    seed: int
    sizes: dict
    exponent: float
    args: dict = field(default_factory=dict)
    sizes_used: bool = True

    @property
    def degenerate(self) -> bool:
        """A drawn size of 0 or 1 (where a loss may refuse with a ValueError)."""
        values = []
        for v in self.sizes.values():
            values += list(v) if isinstance(v, tuple) else [v]
        return (not self.sizes_used) or any(v is not None and v <= 1 for v in values)


def _slots(spec, variant, optional: bool):
    """``[(keyword, axis or None, example, optional)]`` of the drawn sizes."""
    slots = []
    for name, (example, is_optional) in size_keywords(spec).items():
        if name in variant.inputs or (is_optional and not optional):
            continue
        if isinstance(example, tuple):
            slots += [(name, i, example, is_optional) for i in range(len(example))]
        else:
            slots.append((name, None, example, is_optional))
    return slots


@st.composite
def sizes_for(draw, spec, variant, optional=True):
    slots = _slots(spec, variant, optional)
    # An optional size (default None) is drawn or left out as a whole.
    skipped = {name for name, _, _, is_optional in slots
               if is_optional and not draw(st.booleans())}
    slots = [slot for slot in slots if slot[0] not in skipped]
    big = draw(st.sampled_from([None] + list(range(len(slots))))) if slots else None
    sizes: dict = {}
    for i, (name, axis, example, _) in enumerate(slots):
        low = 0 if (axis is None and example == 0) else 1
        high = SMALL if i != big else (LONG_BATCH if i == 0 else WIDE_ROW)
        value = draw(st.integers(low, high))
        if axis is None:
            sizes[name] = value
        else:
            sizes[name] = sizes.get(name, ()) + (value,)
    return sizes


@st.composite
def problems(draw, spec, variant, dtype, *, exponents=SCALE_EXPONENTS, optional=True):
    seed = draw(st.integers(0, 2**32 - 1))
    sizes = draw(sizes_for(spec, variant, optional))
    names = scalable(spec, variant)
    exponent = 0.0
    if names and exponents is not None:
        exponent = draw(st.one_of(st.just(0.0), st.floats(*exponents)))
    args, used = make(spec, variant, dtype, seed, sizes)
    if exponent:
        factor = 10.0 ** exponent
        for name in names:
            args[name] = (args[name].astype(np.float64) * factor).astype(args[name].dtype)
    note(f"seed={seed} sizes={sizes} (used: {used}) exponent={exponent}")
    return Problem(seed, sizes, exponent, args, used)


LAYOUTS = ("C", "F", "strided", "reversed")


def relayout(a: np.ndarray, layout: str, axis: int, read_only: bool) -> np.ndarray:
    """The same values as ``a`` in another memory layout (a view, not a copy)."""
    if layout == "F":
        out = np.asfortranarray(a)
        if out is a:
            out = a.view()
    elif layout == "strided" and a.ndim:
        axis %= a.ndim
        shape = list(a.shape)
        shape[axis] *= 2
        fill = np.nan if a.dtype.kind == "f" else (np.iinfo(a.dtype).max
                                                   if a.dtype.kind in "iu" else 0)
        buf = np.full(shape, fill, a.dtype)
        index = [slice(None)] * a.ndim
        index[axis] = slice(0, None, 2)
        buf[tuple(index)] = a
        out = buf[tuple(index)]
    elif layout == "reversed" and a.ndim:
        flip = tuple(slice(None, None, -1) for _ in range(a.ndim))
        out = a[flip].copy()[flip]
    else:
        out = a.copy()
    if read_only:
        out.flags.writeable = False
    np.testing.assert_array_equal(out, a)
    return out


@st.composite
def layouts_for(draw, args: dict) -> dict:
    views = dict(args)
    for name in array_names(None, args):
        layout = draw(st.sampled_from(LAYOUTS))
        axis = draw(st.integers(0, 3))
        read_only = draw(st.booleans())
        views[name] = relayout(args[name], layout, axis, read_only)
        note(f"{name}: {layout} axis {axis} read_only={read_only} strides={views[name].strides}")
    return views


# --- parametrisation -----------------------------------------------------------------------

def _marks(spec, test: str):
    reason = KNOWN_BUGS.get((spec.name, test))
    return [pytest.mark.xfail(strict=True, reason=reason)] if reason else []


def cases(test: str, *, dtypes=True, variants=True, where=lambda spec, variant: True):
    """pytest params ``(loss name, variant name, dtype)`` (or without the variant /
    dtype), marked xfail(strict) where KNOWN_BUGS names the case."""
    params = []
    for spec in SPECS:
        if not variants:
            for dtype, dname in zip(FLOATS, FLOAT_IDS):
                marks = _marks(spec, test) + _marks(spec, f"{test}[{dname}]")
                params.append(pytest.param(spec.name, dtype, id=f"{spec.name}-{dname}",
                                           marks=marks))
            continue
        for variant in spec.variants:
            if not where(spec, variant):
                continue
            for dtype, dname in (zip(FLOATS, FLOAT_IDS) if dtypes else [(None, "")]):
                marks = (_marks(spec, test) + _marks(spec, f"{test}[{variant.name}]")
                         + (_marks(spec, f"{test}[{variant.name}][{dname}]") if dtypes else []))
                ident = f"{spec.name}[{variant.name}]" + (f"-{dname}" if dtypes else "")
                values = ((spec.name, variant.name, dtype) if dtypes
                          else (spec.name, variant.name))
                params.append(pytest.param(*values, id=ident, marks=marks))
    return params


# --- properties --------------------------------------------------------------------------------

def _new_signatures(before: dict) -> list[str]:
    new = []
    for d in cpu_dispatchers():
        known = before.get(id(d), ())
        new += [f"{d.py_func.__module__}.{d.__name__}{sig}" for sig in d.signatures
                if sig not in known]
    return new


def _signatures() -> dict:
    return {id(d): tuple(d.signatures) for d in cpu_dispatchers()}


@pytest.mark.parametrize("loss_name, dtype",
                         [p for p in cases("views_compile_nothing", variants=False)])
def test_views_compile_nothing(loss_name, dtype):
    """Layouts and read-only views reach the kernels as the C-contiguous writable arrays
    they already compiled for (validation makes them so): no new compilation.

    Deterministic, and first in this file: a specialisation compiled earlier in the
    process (by another test) would hide a regression; in a full run the only earlier
    users of read-only inputs come after this file."""
    spec = registry.get(loss_name)
    variant = spec.variants[0]
    args, _ = make(spec, variant, dtype, 0, {})
    run(spec, args)  # compiled (or loaded) for the plain layout
    for layout in LAYOUTS:
        for read_only in (False, True):
            for axis in range(2):
                before = _signatures()
                views = {k: (relayout(a, layout, axis, read_only) if isinstance(a, np.ndarray)
                             else a) for k, a in args.items()}
                run(spec, views)
                new = _new_signatures(before)
                assert not new, (f"{layout} read_only={read_only} compiled "
                                 f"{len(new)} kernel signature(s): {new[0]}")


@pytest.mark.parametrize("loss_name, variant_name, dtype", cases("valid_inputs"))
@PROPERTY_SETTINGS
@given(data=st.data())
def test_valid_inputs(loss_name, variant_name, dtype, data):
    spec, variant = lookup(loss_name, variant_name)
    problem = data.draw(problems(spec, variant, dtype))
    args = problem.args
    before = snapshot(args)
    try:
        loss, grads = run(spec, args)
    except ValueError as error:
        # Acceptable for a degenerate size only (recorded by test_sizes_of_one).
        assert problem.degenerate, f"valid inputs refused: {error}"
        note(f"refused: {error}")
        return
    assert type(loss) is float
    assert math.isfinite(loss), loss
    if spec.nonnegative:
        assert loss >= 0.0, loss
    assert len(grads) == len(spec.grad_wrt)
    for name, grad in zip(spec.grad_wrt, grads):
        assert isinstance(grad, np.ndarray) and grad.dtype == np.dtype(dtype), name
        assert grad.shape == args[name].shape, name
        assert np.isfinite(grad).all(), f"{name}: {np.count_nonzero(~np.isfinite(grad))} non-finite"
    assert snapshot(args) == before, "an input was modified"

    # The same values in other layouts: the same bits, and the views left untouched.
    views = data.draw(layouts_for(args))
    view_bits = snapshot({k: np.ascontiguousarray(v) for k, v in views.items()
                          if isinstance(v, np.ndarray)})
    loss2, grads2 = run(spec, views)
    assert same_bits(loss2, loss), (loss2, loss)
    for g2, g in zip(grads2, grads):
        assert g2.tobytes() == g.tobytes() and g2.shape == g.shape
    assert snapshot({k: np.ascontiguousarray(v) for k, v in views.items()
                     if isinstance(v, np.ndarray)}) == view_bits, "a view was modified"


@pytest.mark.parametrize("loss_name, variant_name", cases("float32_agrees_with_float64", dtypes=False))
@PROPERTY_SETTINGS
@given(data=st.data())
def test_float32_agrees_with_float64(loss_name, variant_name, data):
    spec, variant = lookup(loss_name, variant_name)
    problem = data.draw(problems(spec, variant, np.float32))
    args32 = problem.args
    args64 = {k: (a.astype(np.float64) if _is_float_array(a) else a) for k, a in args32.items()}
    try:
        loss64, grads64 = run(spec, args64)
    except ValueError:
        assume(not problem.degenerate)
        raise
    loss32, grads32 = run(spec, args32)
    # What one float32 rounding of the inputs does to the float64 result.
    rng = np.random.default_rng(problem.seed)
    eps32 = float(np.finfo(np.float32).eps) / 2
    perturbed = {k: (a * (1.0 + eps32 * rng.choice([-1.0, 1.0], a.shape))
                     if _is_float_array(a) else a) for k, a in args64.items()}
    loss_p, grads_p = run(spec, perturbed)
    rtol = F32_FACTOR * spec.rtol["float32"]
    d_loss = abs(loss_p - loss64)
    note(f"loss32={loss32!r} loss64={loss64!r} |dloss|={abs(loss32 - loss64):.3g} "
         f"sensitivity={d_loss:.3g}")
    assert abs(loss32 - loss64) <= rtol * abs(loss64) + F32_CONDITION * d_loss + F32_LOSS_ATOL, (
        loss32, loss64)
    for name, g32, g64, gp in zip(spec.grad_wrt, grads32, grads64, grads_p):
        if not g64.size:
            continue
        x_max = float(np.abs(args64[name]).max())
        scale = max(float(np.abs(g64).max()), abs(loss64) / x_max if x_max else 0.0)
        err = float(np.abs(g32.astype(np.float64) - g64).max())
        d_grad = float(np.abs(gp - g64).max())
        note(f"{name}: max|dg|={err:.3g} scale={scale:.3g} sensitivity={d_grad:.3g}")
        assert err <= rtol * scale + F32_CONDITION * d_grad + F32_GRAD_ATOL, (
            name, err, scale, d_grad)


def _same_shaped_teacher(spec, variant) -> bool:
    if not spec.zero_when_equal or len(spec.array_params) < 2:
        return False
    args, _ = make(spec, variant, np.float64, 0, {})
    s, t = (args.get(k) for k in spec.array_params[:2])
    return _is_float_array(s) and _is_float_array(t) and s.shape == t.shape


@pytest.mark.parametrize("loss_name, variant_name, dtype",
                         cases("zero_when_equal", where=_same_shaped_teacher))
@PROPERTY_SETTINGS
@given(data=st.data())
def test_zero_when_equal(loss_name, variant_name, dtype, data):
    spec, variant = lookup(loss_name, variant_name)
    problem = data.draw(problems(spec, variant, dtype, optional=False))
    args = problem.args
    student, teacher = spec.array_params[:2]
    assume(args[student].shape == args[teacher].shape)
    try:
        ref_loss, ref_grads = run(spec, args)
    except ValueError:
        assert problem.degenerate, "valid inputs refused"
        return  # a size of 1 the loss refuses (see test_sizes_of_one)
    args[teacher] = args[student].copy()
    loss, grads = run(spec, args)
    eps = float(np.finfo(dtype).eps)
    u = ZERO_ULPS * eps
    assert abs(loss) <= u * max(abs(ref_loss), u), (loss, ref_loss)
    for name, grad, ref in zip(spec.grad_wrt, grads, ref_grads):
        assert (np.abs(grad).max(initial=0.0)
                <= u * max(float(np.abs(ref).max(initial=0.0)), 1.0)), (name, np.abs(grad).max())


MUTATIONS = ("dtype", "nonfinite", "ndim", "batch")
WRONG_DTYPES = (np.int32, np.int64, np.bool_, np.float16, np.complex64, np.complex128,
                np.object_, np.str_)


def _call_must_refuse(spec, args, what: str):
    try:
        loss, grads = run(spec, args)
    except (ValueError, TypeError) as error:
        note(f"{what}: {type(error).__name__}: {error}")
        return
    except Exception as error:  # noqa: BLE001 -- the point of the test
        raise AssertionError(f"{what}: {type(error).__module__}.{type(error).__name__} "
                             f"instead of ValueError/TypeError: {error}") from error
    finite = math.isfinite(loss) and all(np.isfinite(g).all() for g in grads)
    raise AssertionError(f"{what}: accepted, returned loss={loss!r} "
                         f"({'finite' if finite else 'NON-FINITE'})")


@pytest.mark.parametrize("loss_name, dtype", cases("bad_inputs", variants=False))
@PROPERTY_SETTINGS
@given(data=st.data())
def test_bad_inputs(loss_name, dtype, data):
    spec = registry.get(loss_name)
    variant = data.draw(st.sampled_from(spec.variants), label="variant")
    problem = data.draw(problems(spec, variant, dtype, exponents=None))
    args = dict(problem.args)
    kind = data.draw(st.sampled_from(MUTATIONS))
    floats = [k for k in spec.array_params if _is_float_array(args.get(k))]
    arrays = [k for k in spec.array_params if isinstance(args.get(k), np.ndarray)]
    if kind == "dtype":
        name = data.draw(st.sampled_from(floats))
        wrong = data.draw(st.sampled_from(WRONG_DTYPES))
        args[name] = args[name].astype(wrong)
        what = f"{name} as {np.dtype(wrong)}"
    elif kind == "nonfinite":
        name = data.draw(st.sampled_from(floats))
        assume(args[name].size > 0)
        bad = args[name].copy()
        count = data.draw(st.integers(1, min(3, bad.size)))
        for _ in range(count):
            position = data.draw(st.integers(0, bad.size - 1))
            bad.flat[position] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        args[name] = bad
        what = f"{name} with {count} NaN/inf"
    elif kind == "ndim":
        candidates = [k for k in arrays if k not in flattened(spec, variant)]
        assume(candidates)
        name = data.draw(st.sampled_from(candidates))
        a = args[name]
        if a.ndim >= 2 and data.draw(st.booleans()):
            args[name] = a.reshape(a.shape[:-2] + (a.shape[-2] * a.shape[-1],))
            what = f"{name} {a.shape} -> {args[name].shape} (last axes merged)"
        else:
            axis = data.draw(st.integers(0, a.ndim))
            args[name] = np.expand_dims(a, axis)
            what = f"{name} {a.shape} -> {args[name].shape}"
    else:
        names = [k for k in batch_names(spec, variant) if k in args]
        assume(len(names) >= 2)
        name = data.draw(st.sampled_from(names))
        a = args[name]
        args[name] = a[:-1] if data.draw(st.booleans()) else np.concatenate([a, a[:1]])
        what = f"{name} batch {a.shape[0]} -> {args[name].shape[0]}"
    _call_must_refuse(spec, args, what)


@pytest.mark.parametrize("loss_name, dtype", cases("extreme_values", variants=False))
@PROPERTY_SETTINGS
@given(data=st.data())
def test_extreme_values(loss_name, dtype, data):
    spec = registry.get(loss_name)
    scaled_variants = [v for v in spec.variants if scalable(spec, v)]
    if not scaled_variants:
        return  # every input is constrained (probabilities...): nothing to scale
    variant = data.draw(st.sampled_from(scaled_variants), label="variant")
    names = scalable(spec, variant)
    info = np.finfo(dtype)
    low = math.log10(float(info.smallest_subnormal)) + 1.0
    high = math.log10(float(info.max)) - 1.0
    exponent = data.draw(st.one_of(st.floats(low, SCALE_EXPONENTS[0]),
                                   st.floats(SCALE_EXPONENTS[1], high)))
    problem = data.draw(problems(spec, variant, dtype, exponents=None))
    args = dict(problem.args)
    factor = 10.0 ** exponent
    with np.errstate(over="ignore", under="ignore"):
        for name in data.draw(st.lists(st.sampled_from(names), min_size=1, unique=True)):
            scaled = (args[name].astype(np.float64) * factor).astype(dtype)
            assume(np.isfinite(scaled).all())
            args[name] = scaled
    note(f"factor={factor:.3g}")
    try:
        loss, grads = run(spec, args)
    except (ValueError, TypeError) as error:
        note(f"refused: {error}")
        return
    assert math.isfinite(loss), f"returned loss {loss!r} silently"
    if spec.nonnegative:
        assert loss >= 0.0, loss
    for name, grad in zip(spec.grad_wrt, grads):
        assert np.isfinite(grad).all(), f"{name}: non-finite gradient returned silently"


# --- sizes of one (deterministic: which losses refuse them) ------------------------------------

@pytest.mark.parametrize("loss_name, variant_name, dtype", cases("sizes_of_one"))
def test_sizes_of_one(loss_name, variant_name, dtype):
    """Each size keyword at 1 (0 for one whose default is 0), the others at their
    defaults: a finite loss, or a ValueError (the refusals are printed, and listed
    in docs/reliability.md)."""
    spec, variant = lookup(loss_name, variant_name)
    refused = []
    for name, axis, example, _ in _slots(spec, variant, optional=False):
        if axis is None:
            value = 0 if example == 0 else 1
            sizes = {name: value}
        else:
            default = inspect.signature(spec.make_inputs).parameters.get(name)
            base = default.default if default is not None and _size_like(default.default) else example
            sizes = {name: tuple(1 if j == axis else v for j, v in enumerate(base))}
        for seed in range(SIZE_ONE_SEEDS):
            args, used = make(spec, variant, dtype, seed, sizes)
            if not used:
                break
            try:
                loss, grads = run(spec, args)
            except ValueError as error:
                refused.append(f"{sizes}: {error}")
                break
            assert math.isfinite(loss) and all(np.isfinite(g).all() for g in grads), sizes
            if spec.nonnegative:
                assert loss >= 0.0, (sizes, seed, loss)
    if refused:
        print(f"{spec.name}[{variant.name}] refuses:", *refused, sep="\n  ")
