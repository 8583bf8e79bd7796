"""Branch-free ``exp`` (arguments <= 0) and ``log`` (float64, > 0) in plain arithmetic.

Why: the pip build of llvmlite has no SVML, so ``np.exp``/``math.exp`` inside a
Numba loop is a scalar libm call and blocks vectorisation. Range reduction, a
polynomial and building ``2**n`` from its bits are all plain arithmetic that
LLVM turns into AVX2/AVX-512 code.

Method (Cody-Waite): ``x = n*ln2 + r`` with ``n = round(x/ln2)`` (by the
``1.5 * 2**k`` shifter, whose low mantissa bits then hold ``n``),
``|r| <= ln2/2``; ``exp(r)`` by a polynomial (Taylor's by Horner's rule for
float64, a minimax fit by Estrin's scheme for float32); ``2**n`` by writing ``n + bias`` into
the exponent field.

Accuracy (measured in tests against ``np.exp``): float64 < 2 ulp, float32 < 2 ulp
on ``[-700, 0]`` / ``[-87.68, 0]`` (in subnormal ulps where the result is
subnormal). Arguments at or below :data:`ZERO_BELOW` return exactly 0;
arguments must be ``<= 0`` (every caller subtracts a row maximum first), NaN
is not expected (inputs are validated).

:func:`log_pos_f64` is the same idea for ``log`` (exponent from the bits, a
series for the mantissa); see its docstring.
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import intrinsic, overload

from kdnumba._policy import FASTMATH_FLAGS, callee, jit


def _bitcast(name: str, source, target):
    """An intrinsic reinterpreting a ``source`` scalar's bits as ``target``
    (LLVM ``bitcast``: free, and it vectorises)."""

    def typer(typingctx, value):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(target))

        return target(source), codegen

    typer.__name__ = name
    return intrinsic(typer)


_bits_to_f64 = _bitcast("_bits_to_f64", types.int64, types.float64)
_f64_to_bits = _bitcast("_f64_to_bits", types.float64, types.int64)
_bits_to_f32 = _bitcast("_bits_to_f32", types.int32, types.float32)
_f32_to_bits = _bitcast("_f32_to_bits", types.float32, types.int32)


_LOG2E = 1.4426950408889634
_LN2_HI = 0.6931471803691238  # ln2 split so n*_LN2_HI is exact for |n| < 2**20
_LN2_LO = 1.9082149292705877e-10
_SHIFTER_F64 = 6755399441055744.0  # 1.5 * 2**52
_SHIFTER_F32 = 12582912.0  # 1.5 * 2**23


@jit
def exp_nonpos_f64(x):
    """``exp(x)`` for float64 ``x <= 0``; exactly 0.0 at and below
    ``-1022.5 ln2 = -708.74`` (see :data:`ZERO_BELOW`)."""
    # Clamping at -709 makes n = -1023, whose 2**n bits are those of +0.0: the
    # underflow needs no compare-and-select of its own.
    xc = max(x, -709.0)
    # n = round(x / ln2) by the 1.5 * 2**52 shifter: the sum's low mantissa bits
    # hold n in two's complement, so 2**n needs no float -> int64 conversion
    # (AVX2 has none for vectors: with np.floor and np.int64 every float64 exp
    # of a loop ran scalar; LLVM turns floor + bit tricks back into that
    # conversion, so the rounding itself must be the shifter's).
    shifted = xc * _LOG2E + _SHIFTER_F64
    n = shifted - _SHIFTER_F64
    r = (xc - n * _LN2_HI) - n * _LN2_LO
    # Taylor series of exp(r) to degree 13 on |r| <= 0.347: error < 5e-18.
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    # n is integral in [-1021, 0]: converting through int32 gives the same bits
    # as int64 directly, but AVX2 converts four doubles to int32 in one
    # instruction and has none for int64 (that made every float64 exp scalar).
    scale = _bits_to_f64((_f64_to_bits(shifted) + np.int64(1023)) << np.int64(52))
    return p * scale


@jit
def exp_nonpos_f32(x):
    """``exp(x)`` for float32 ``x <= 0``; exactly 0.0 at and below
    ``-126.5 ln2 = -87.68`` (see :data:`ZERO_BELOW`).

    Written for throughput and latency, since a loop of independent
    exponentials was measured to be bound by this chain (the KD kernel's
    pass 2 on AVX2 is bound by its floating-point operations):

    * ``n`` comes from the 1.5 * 2**23 shifter (one fused multiply-add; the
      low bits of the sum are ``n``, so ``2**n`` needs no conversion);
    * the polynomial is a degree-6 minimax fit of ``exp`` on ``|r| <= ln2/2``
      (relative error 3.8e-9 with its float32 coefficients, a 16th of an ulp)
      by Estrin's scheme: 8 operations at depth 3 instead of the degree-7
      Taylor polynomial's 9 (11 % faster pass 2 together with the next point,
      measured on Zen 3);
    * underflow needs no compare-and-select: clamping at -88 makes ``n =
      -127``, whose ``2**n`` bits are those of +0.0. Between -87.68 and
      -87.34 (``n = -126``, ``r < 0``) the result is subnormal, within 2
      ulp like everywhere else.
    """
    xc = max(x, np.float32(-88.0))
    shifted = xc * np.float32(_LOG2E) + np.float32(_SHIFTER_F32)
    n = shifted - np.float32(_SHIFTER_F32)
    r = (xc - n * np.float32(0.693359375)) - n * np.float32(-2.12194440e-4)
    r2 = r * r
    p01 = np.float32(1.0) + r
    p23 = np.float32(0.49999988) + r * np.float32(0.16666518)
    p45 = np.float32(0.04166951) + r * np.float32(0.008368918)
    p = (p01 + r2 * p23) + (r2 * r2) * (p45 + r2 * np.float32(0.0013752716))
    # (n + 127) << 23 from the shifter's bits: shifting by 23 keeps only the
    # low 9 bits, which hold n + 0x400000's low bits, i.e. n mod 2**9.
    scale = _bits_to_f32((_f32_to_bits(shifted) << np.int32(23)) + np.int32(127 << 23))
    return p * scale


#: ``exp_nonpos`` is exactly 0.0 for arguments at or below these (``n`` rounds
#: to the exponent whose ``2**n`` bits are zero: ``-126.5 ln2`` and
#: ``-1022.5 ln2``, rounded towards zero here so that every argument at or
#: below them is covered whatever the last bit of the rounding).
ZERO_BELOW = {"float32": -87.69, "float64": -708.75}


_SQRT2 = 1.4142135623730951
_TINY = 2.2250738585072014e-308  # smallest normal float64


@callee
def log_pos_f64(x):
    """``log(x)`` for float64 ``x > 0``, branch-free so that loops vectorise.

    Why: the pip llvmlite has no SVML, so ``math.log`` in a loop is a scalar
    libm call (the attention KL loop was 6x slower with it, measured).
    ``x = m 2^e`` with ``m`` in ``[sqrt(1/2), sqrt(2))``; ``log m = 2 atanh(s)``,
    ``s = (m - 1)/(m + 1)``, ``|s| <= 0.1716``, by its series to ``s^21``
    (truncation < 3e-17). Error < 2 ulp (checked in the tests against
    ``np.log``). Subnormal ``x`` is raised to the smallest normal number; 0
    gives ``log(2^-1022)`` instead of ``-inf`` (every caller multiplies the
    result by a probability that is then 0 or tiny).
    """
    bits = _f64_to_bits(max(x, _TINY))
    e = (bits >> np.int64(52)) - np.int64(1023)
    m = _bits_to_f64((bits & np.int64(0x000FFFFFFFFFFFFF)) | np.int64(0x3FF0000000000000))
    big = m > _SQRT2
    m = 0.5 * m if big else m
    n = np.float64(e + np.int64(1)) if big else np.float64(e)
    f = m - 1.0
    s = f / (2.0 + f)
    z = s * s
    p = 1.0 / 21.0
    p = p * z + 1.0 / 19.0
    p = p * z + 1.0 / 17.0
    p = p * z + 1.0 / 15.0
    p = p * z + 1.0 / 13.0
    p = p * z + 1.0 / 11.0
    p = p * z + 1.0 / 9.0
    p = p * z + 1.0 / 7.0
    p = p * z + 1.0 / 5.0
    p = p * z + 1.0 / 3.0
    return n * _LN2_HI + (n * _LN2_LO + (f - s * (f - 2.0 * z * p)))


def exp_nonpos(x):
    """``exp(x)`` for ``x <= 0`` in the precision of ``x`` (float32 or float64).

    Callable from kernels only; resolves at compile time to
    :func:`exp_nonpos_f32` or :func:`exp_nonpos_f64`.
    """
    raise NotImplementedError("exp_nonpos is only callable from Numba kernels")


@overload(exp_nonpos, jit_options=dict(fastmath=set(FASTMATH_FLAGS), error_model="numpy"))
def _exp_nonpos_overload(x):
    # The implementation itself, compiled with the kernels' float options, not
    # a lambda calling the dispatcher: one compilation instead of two (a
    # kernel's cold compile compiles every callee as its own library).
    if x == types.float32:
        return exp_nonpos_f32.py_func
    if x == types.float64:
        return exp_nonpos_f64.py_func
    return None
