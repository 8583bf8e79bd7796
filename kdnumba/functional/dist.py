"""DIST (knowledge distillation from a stronger teacher) as a pure function:
:func:`dist_loss`."""

from __future__ import annotations

import numpy as np

from kdnumba import _dispatch
from kdnumba import _validation as v
from kdnumba.registry import BadInput, LossSpec, Variant, Workload, register

#: Added to the product of the norms in DIST's Pearson correlation (hunto's
#: ``dist_kd.py``: ``cosine_similarity(..., eps=1e-8)``).
DIST_EPS = 1e-8


def dist_loss(student_logits, teacher_logits, *, beta=1.0, gamma=1.0, temperature=1.0,
              device="auto", out=None):
    r"""DIST (Huang et al., NeurIPS 2022) exactly as hunto's ``dist_kd.py``, and its gradient.

    With ``y = softmax(z / T)`` row-wise (student ``y_s``, teacher ``y_t``, both
    ``(B, C)``) and ``pearson(a, b) = <a - mean a, b - mean b> / (|a - mean a|
    |b - mean b| + 1e-8)``::

        inter = 1 - 1/B sum_i pearson(y_s[i, :], y_t[i, :])     (rows: inter-class)
        intra = 1 - 1/C sum_j pearson(y_s[:, j], y_t[:, j])     (columns: intra-class)
        loss  = T^2 (beta * inter + gamma * intra)

    The intra-class term couples the whole batch: every row's gradient depends
    on every other row through the column statistics. Gradient: with
    ``rho = <a, b> / D``, ``D = |a||b| + eps``, ``d rho / d y_s = Pc(b / D - k a)``,
    ``k = <a, b> |b| / (|a| D^2)`` (``Pc`` re-centres the vector), summed over
    the row and column terms into ``G = d loss / d y_s``, then through the
    softmax::

        d loss / d s_i = y_s,i * (G_i - <G_i, y_s,i>) / T

    (``k`` is taken as 0 for a vector with ``|a| = 0``, e.g. a uniform row.)

    Where the peers differ: hunto's code (followed here) adds ``eps = 1e-8`` to
    the *product* of the norms; torchdistill's ``DISTLoss`` instead clamps each
    norm (``F.cosine_similarity``-style ``max(|a|, eps)``), which differs for
    (near-)constant vectors. The paper writes the Pearson coefficient without
    an epsilon. Also note that with batch size 1 the column term is
    ``1 - 0/eps = 1`` (a constant with zero gradient), as in the peer.

    Args:
        student_logits: ``(B, C)`` float array.
        teacher_logits: ``(B, C)`` float array; cast to the student's dtype.
        beta: weight of the inter-class (row) term, ``>= 0``.
        gamma: weight of the intra-class (column) term, ``>= 0``.
        temperature: ``T > 0``.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        out: optional C-contiguous ``(B, C)`` array of the student's dtype to
            receive the gradient.

    Returns:
        ``(loss, grad)``: a Python float and a ``(B, C)`` array.

    Raises:
        TypeError: non-float logits. ValueError: shape/batch mismatch, empty
        batch, NaN/inf, ``temperature <= 0``, negative ``beta``/``gamma``.
    """
    beta = v.check_non_negative(beta, "beta")
    gamma = v.check_non_negative(gamma, "gamma")
    temperature = v.check_positive(temperature, "temperature")
    be = _dispatch.backend(device, student_logits, teacher_logits)
    s = be.float_array(student_logits, "student_logits", ndim=2)
    t = be.float_array(teacher_logits, "teacher_logits", ndim=2, dtype=s.dtype)
    v.check_same_shape(s, t, "student_logits", "teacher_logits")
    n_rows, n_cols = s.shape
    dtype = np.dtype(s.dtype)
    grad = be.gradient_buffer(out, s, (student_logits, teacher_logits, t))
    kernels = be.kernels("dist")
    t2 = temperature * temperature
    inv_t = dtype.type(1.0 / temperature)
    ys = be.empty((n_rows, n_cols), dtype)
    yt = be.empty((n_rows, n_cols), dtype)
    row_rho = be.empty(n_rows, np.float64)
    row_coef = be.empty((n_rows, 3), np.float64)
    col_rho = be.empty(n_cols, np.float64)
    col_coef = be.empty((3, n_cols), dtype)
    # One launch context for the three kernels (the same work, so the same
    # builds): a context costs a small call ~0.7 us (issue #16).
    w_row, w_col = t2 * beta / n_rows, t2 * gamma / n_cols
    with be.launch(n_rows * n_cols):
        kernels.dist_rows(s, t, inv_t, DIST_EPS, w_row, ys, yt, row_rho, row_coef)
        kernels.dist_columns(ys, yt, DIST_EPS, w_col, col_rho, col_coef)
        kernels.dist_gradient(ys, yt, row_coef, col_coef, inv_t, grad)
    loss = (t2 * beta * (1.0 - be.total(row_rho) / n_rows)
            + t2 * gamma * (1.0 - be.total(col_rho) / n_cols))
    be.check_finite(loss, (("student_logits", s), ("teacher_logits", t)))
    return loss, be.deliver(grad, out)


# --- registry entry ------------------------------------------------------------------

def _dist_inputs(rng, dtype, *, rows=6, classes=5) -> dict:
    student = (2.0 * rng.standard_normal((rows, classes))).astype(dtype)
    teacher = (student + rng.standard_normal((rows, classes))).astype(dtype)
    return {"student_logits": student, "teacher_logits": teacher}


def _with(arguments: dict, **changes) -> dict:
    return {**arguments, **changes}


register(LossSpec(
    name="dist_loss",
    function=dist_loss,
    family="dist",
    make_inputs=_dist_inputs,
    reference="dist:dist_loss",
    torch="dist:dist_loss_torch",
    variants=(
        Variant("defaults (beta=gamma=T=1)"),
        Variant("T=4, beta=2, gamma=0.5", {"temperature": 4.0, "beta": 2.0, "gamma": 0.5}),
        Variant("inter only", {"gamma": 0.0}),
        Variant("intra only", {"beta": 0.0}),
    ),
    medium={"rows": 64, "classes": 1000},
    # (1 - rho) >= 0 always; zero at the teacher only up to eps/(|a||b|) ~ 1e-8
    # relative, so the exact-zero check does not apply.
    zero_when_equal=False,
    bad_inputs=(
        BadInput("temperature 0", lambda a: _with(a, temperature=0.0), ValueError,
                 "temperature"),
        BadInput("negative beta", lambda a: _with(a, beta=-1.0), ValueError, "beta"),
        BadInput("negative gamma", lambda a: _with(a, gamma=-0.5), ValueError, "gamma"),
        BadInput("1-D logits", lambda a: _with(a, student_logits=a["student_logits"][0],
                                               teacher_logits=a["teacher_logits"][0]),
                 ValueError, "student_logits"),
    ),
    workloads=(
        Workload("B4096_C1000", {"rows": 4096, "classes": 1000}, quick=True,
                 notes="beta=gamma=1, T=1 (DIST's ImageNet setting)"),
        Workload("B512_C32000", {"rows": 512, "classes": 32_000},
                 notes="large vocabulary"),
    ),
))
