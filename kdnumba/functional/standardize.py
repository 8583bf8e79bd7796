r"""Logit standardisation (Sun et al., "Logit Standardization in Knowledge
Distillation", CVPR 2024), forward and exact backward.

Each row ``z`` of a ``(B, C)`` array (``C >= 2``) becomes::

    y = (z - mean(z)) / (std(z) + eps),   std unbiased: sqrt(sum (z - mean)^2 / (C - 1))

with ``eps = 1e-7`` (:data:`kdnumba._constants.STANDARDIZE_EPS`), exactly the
peer's ``normalize`` (sunshangquan/logit-standardization-KD
``mdistiller/distillers/KD.py``: ``(logit - mean) / (1e-7 + logit.std())``,
``torch.std`` unbiased) and torchdistill's ``LogitStdKDLoss``. Its
vector-Jacobian product, with ``g = d loss / d y``::

    d loss / d z = (g - mean(g)) / (std + eps) - (g . y) y / ((C - 1) std)

(through the mean and through the standard deviation; the second term is
taken as 0 for a constant row, ``std = 0``, where PyTorch gives NaN).

Two ways in:

* **Users**: :func:`standardize_logits` and :func:`standardize_logits_backward`
  (validated arrays in, arrays out, any device).
* **Loss bodies** (``functional/*.py``, e.g. ``kd_loss(standardize=True)`` and
  ``dkd_loss(standardize=True)``): :func:`standardize_into` and
  :func:`standardize_backward_into` work on the kernel-ready arrays of a
  backend ``be`` (``_dispatch.backend(...)``), so one body serves CPU and
  CUDA. The pattern::

      s = be.float_array(student_logits, "student_logits", ndim=2)
      t = be.float_array(teacher_logits, "teacher_logits", ndim=2, dtype=s.dtype)
      if standardize:
          s_std, s_sigma = standardize_into(be, s, "student_logits")
          t_std, _ = standardize_into(be, t, "teacher_logits")
      # ... the loss kernel on (s_std, t_std) writes d loss / d s_std into grad ...
      if standardize:
          standardize_backward_into(be, grad, s_std, s_sigma, grad)   # in place
      # or, to add it to a gradient already in `out` (e.g. a hard CE term on the
      # raw logits): standardize_backward_into(be, g_soft, s_std, s_sigma, out,
      #                                         accumulate=True)

  Non-finite input makes ``sigma`` (and every output of that row) NaN, which
  reaches the loss total: check the *raw* inputs on that path, as every body
  does with ``be.check_finite``.
"""

from __future__ import annotations

import numpy as np

from kdnumba import _dispatch
from kdnumba import _validation as v
from kdnumba._constants import STANDARDIZE_EPS

__all__ = ["standardize_logits", "standardize_logits_backward"]


def standardize_into(be, z, name: str, out=None):
    """``(y, sigma)``: the standardised rows of the kernel-ready ``(B, C)`` array
    ``z`` on backend ``be`` (written into ``out``, a kernel-ready array of ``z``'s
    shape and dtype not aliasing ``z``, or a new array) and the float64
    ``(B,)`` unbiased row standard deviations that
    :func:`standardize_backward_into` needs. ``ValueError`` naming ``name``
    when ``C < 2`` (the unbiased std divides by ``C - 1``)."""
    if len(z.shape) != 2:
        raise ValueError(f"{name} must be 2-D (B, C) to be standardised, got shape "
                         f"{tuple(z.shape)}")
    n_rows, n_cols = z.shape
    if n_cols < 2:
        raise ValueError(
            f"{name} must have at least 2 columns to be standardised (the unbiased "
            f"standard deviation divides by C - 1), got shape {tuple(z.shape)}")
    y = be.empty((n_rows, n_cols), np.dtype(z.dtype)) if out is None else out
    sigma = be.empty(n_rows, np.float64)
    with be.launch(n_rows * n_cols):
        be.kernels("standardize").standardize_rows(z, STANDARDIZE_EPS, y, sigma)
    return y, sigma


def standardize_backward_into(be, grad_y, y, sigma, out, *, accumulate: bool = False):
    """Write (``accumulate=False``) or add (``True``) ``d loss / d z`` into ``out``,
    given ``grad_y = d loss / d y`` and ``(y, sigma)`` from
    :func:`standardize_into`; all kernel-ready arrays of backend ``be`` and
    one dtype. ``out`` may be ``grad_y`` itself unless ``accumulate``."""
    if accumulate and out is grad_y:
        raise ValueError("standardize_backward_into: accumulate=True needs out distinct "
                         "from grad_y")
    n_rows, n_cols = grad_y.shape
    with be.launch(n_rows * n_cols):
        be.kernels("standardize").standardize_backward_rows(
            grad_y, y, sigma, STANDARDIZE_EPS, out, bool(accumulate))
    return out


def standardize_logits(logits, *, device="auto", out=None):
    """Row-standardised logits ``(z - mean(z)) / (std(z) + 1e-7)`` (unbiased std).

    Args:
        logits: ``(B, C)`` float32/float64 array, ``C >= 2``.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        out: optional C-contiguous ``(B, C)`` array of the logits' dtype to
            receive the result.

    Returns:
        A ``(B, C)`` array of the logits' dtype (on the GPU if ``logits`` is).

    Raises:
        TypeError: non-float logits. ValueError: not 2-D, ``C < 2``, empty
        batch, NaN/inf.
    """
    be = _dispatch.backend(device, logits)
    z = be.float_array(logits, "logits", ndim=2)
    buffer = be.gradient_buffer(out, z, (logits,))
    _, sigma = standardize_into(be, z, "logits", buffer)
    be.check_finite(be.total(sigma), [("logits", z)], "the standard deviations")
    return be.deliver(buffer, out)


def standardize_logits_backward(grad_output, logits, *, device="auto", out=None):
    """The gradient with respect to ``logits`` of a loss whose gradient with
    respect to ``standardize_logits(logits)`` is ``grad_output`` (exact, through
    the row mean and the unbiased standard deviation; see the module docstring).

    Args:
        grad_output: ``(B, C)`` float array; cast to the logits' dtype.
        logits: ``(B, C)`` float32/float64 array, ``C >= 2`` (the forward input).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        out: optional C-contiguous ``(B, C)`` array of the logits' dtype.

    Returns:
        A ``(B, C)`` array of the logits' dtype.
    """
    be = _dispatch.backend(device, logits, grad_output)
    z = be.float_array(logits, "logits", ndim=2)
    g = be.float_array(grad_output, "grad_output", ndim=2, dtype=z.dtype)
    v.check_same_shape(z, g, "logits", "grad_output")
    buffer = be.gradient_buffer(out, z, (logits, grad_output, g))
    y, sigma = standardize_into(be, z, "logits")
    standardize_backward_into(be, g, y, sigma, buffer)
    be.check_finite(be.total(sigma), [("logits", z)], "the standard deviations")
    # A NaN/inf in grad_output reaches its row of the result (checked on the host
    # copy; this is a convenience function, not a training-loop kernel).
    be.check_finite(float(np.sum(be.to_host(buffer), dtype=np.float64)),
                    [("grad_output", g)], "the gradient")
    return be.deliver(buffer, out)
