"""Decoupled knowledge distillation as a pure function: :func:`dkd_loss`."""

from __future__ import annotations

import numpy as np

from kdnumba import _dispatch
from kdnumba import _validation as v
from kdnumba.functional.standardize import standardize_backward_into, standardize_into
from kdnumba.registry import BadInput, LossSpec, Variant, Workload, register


def dkd_loss(student_logits, teacher_logits, labels, *, alpha=1.0, beta=8.0,
             temperature=4.0, standardize=False, device="auto", out=None):
    r"""Decoupled KD (Zhao et al., CVPR 2022) exactly as mdistiller's ``dkd_loss``, and its gradient.

    With ``u = z / T`` row-wise, ``p = softmax(u)``, target ``g = labels[i]``,
    ``b = (p_g, sum_{j != g} p_j)`` the binary target/rest split and
    ``p' = softmax(u - 1000 e_g)``::

        TCKD = T^2 / B * sum_i KL(b(t_i) || b(s_i))
        NCKD = T^2 / B * sum_i KL(p'(t_i) || p'(s_i))
        loss = alpha * TCKD + beta * NCKD

    and, with ``delta = b_g(s) - b_g(t)`` and ``q(s)`` the student's softmax
    over the non-target classes (``p_j / p_rest``)::

        d loss / d s_ij = T / B * [ alpha * delta                      (j == g)
                                    - alpha * delta * q_j(s)           (j != g)
                                    + beta * (p'_j(s) - p'_j(t)) ]

    ``standardize=True`` (logit standardisation, Sun et al. CVPR 2024, as in
    sunshangquan/logit-standardization-KD's ``DKD.py``) first maps each row
    of both logits to ``(z - mean) / (std + 1e-7)`` (unbiased std) and
    back-propagates through it exactly (:mod:`kdnumba.functional.standardize`).
    No cross-entropy term and no warm-up: those belong to the strategy
    (:class:`kdnumba.strategies.DecoupledDistillationStrategy`).

    Where the peer's code deviates from the paper (this function follows the code):

    * NCKD is not a KL over the C-1 non-target classes: mdistiller subtracts
      ``1000`` from the *scaled* target logit ``z_g / T`` and keeps all C
      columns, so the target keeps a probability ``~exp(u_g - 1000 - ...)``.
      It is negligible for ordinary logits, but not once ``(z_g - max_j z_j)/T``
      exceeds ~1000 (``|z| ~ 1e4`` at ``T = 4``): there the peer's "non-target"
      distribution is mostly the target, and so is this function's.
    * TCKD's split is built from masks: ``b_g = sum(p * gt_mask)`` and
      ``b_rest = sum(p * other_mask)`` (not ``1 - b_g``), and the peer takes
      ``torch.log`` of them, so it returns ``inf``/``NaN`` (and NaN gradients)
      once one underflows (e.g. logits of +-1e4, or +-100 in float32). Here
      both are computed as logs of sums (``log b_rest = logsumexp_{j != g}(u)
      - logsumexp(u)``), so loss and gradient stay finite and accurate.
    * The paper's DKD loss also has the CE term and a linear warm-up
      ``min(epoch / warmup, 1)`` on the KD part (mdistiller's ``DKD``
      distiller); see the strategy.

    Computed per row in one fused pass (stable log-sum-exp, sums in
    float64), in the student's dtype.

    Args:
        student_logits: ``(B, C)`` float array, ``C >= 2``.
        teacher_logits: ``(B, C)`` float array; cast to the student's dtype.
        labels: integer class indices ``(B,)`` in ``[0, C)`` (required).
        alpha: weight of TCKD, ``>= 0`` (mdistiller's default 1.0).
        beta: weight of NCKD, ``>= 0`` (8.0 is mdistiller's CIFAR-100 setting).
        temperature: ``T > 0``.
        standardize: standardise both logits per row first.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        out: optional C-contiguous ``(B, C)`` array of the student's dtype to
            receive the gradient.

    Returns:
        ``(loss, grad)``: a Python float and a ``(B, C)`` array.

    Raises:
        TypeError: non-float logits, labels that are not integer indices.
        ValueError: shape/batch mismatch, empty batch, ``C < 2``, NaN/inf,
            labels out of range, ``temperature <= 0``, negative ``alpha``/``beta``.
    """
    alpha = v.check_non_negative(alpha, "alpha")
    beta = v.check_non_negative(beta, "beta")
    temperature = v.check_positive(temperature, "temperature")
    if not isinstance(standardize, (bool, np.bool_)):
        raise TypeError(f"standardize must be True or False, got {standardize!r}")
    be = _dispatch.backend(device, student_logits, teacher_logits, labels)
    s = be.float_array(student_logits, "student_logits", ndim=2)
    t = be.float_array(teacher_logits, "teacher_logits", ndim=2, dtype=s.dtype)
    v.check_same_shape(s, t, "student_logits", "teacher_logits")
    n_rows, n_cols = s.shape
    if n_cols < 2:
        raise ValueError(f"student_logits must have at least 2 classes (a target and a "
                         f"non-target), got shape {tuple(s.shape)}")
    dtype = np.dtype(s.dtype)
    if labels is None:
        raise TypeError("labels are required: integer class indices (B,)")
    kind, y = be.labels(labels, "labels", n_rows, n_cols, dtype)
    if kind != "index":
        raise TypeError("labels must be integer class indices (B,), not one-hot/soft "
                        "targets (DKD splits each row at its target class)")
    grad = be.gradient_buffer(out, s, (student_logits, teacher_logits, labels, t, y))
    if standardize:
        s_in, sigma = standardize_into(be, s, "student_logits")
        t_in, _ = standardize_into(be, t, "teacher_logits")
    else:
        s_in, t_in = s, t
    row_loss = be.empty(n_rows, np.float64)
    with be.launch(n_rows * n_cols):
        be.kernels("decoupled").dkd_rows(
            s_in, t_in, y, dtype.type(1.0 / temperature), alpha, beta,
            temperature * temperature / n_rows, temperature / n_rows, grad, row_loss)
    loss = be.total(row_loss)
    if not np.isfinite(loss):
        v.as_labels(be.host_object(labels), "labels", n_rows, n_cols, dtype)
        be.check_finite(loss, [("student_logits", s), ("teacher_logits", t)])
    if standardize:
        standardize_backward_into(be, grad, s_in, sigma, grad)
    return loss, be.deliver(grad, out)


# --- registry entry ------------------------------------------------------------------

def _dkd_inputs(rng, dtype, *, rows=6, classes=5) -> dict:
    """Related student and teacher logits (teacher = student + noise) and labels."""
    student = (2.0 * rng.standard_normal((rows, classes))).astype(dtype)
    teacher = (student + rng.standard_normal((rows, classes))).astype(dtype)
    labels = rng.integers(0, classes, rows, dtype=np.int64)
    return {"student_logits": student, "teacher_logits": teacher, "labels": labels}


def _with(arguments: dict, **changes) -> dict:
    return {**arguments, **changes}


register(LossSpec(
    name="dkd_loss",
    function=dkd_loss,
    family="decoupled",
    make_inputs=_dkd_inputs,
    reference="decoupled:dkd_loss",
    torch="decoupled:dkd_loss_torch",
    variants=(
        Variant("defaults (alpha=1, beta=8, T=4)"),
        Variant("alpha=0.5, beta=2, T=1", {"alpha": 0.5, "beta": 2.0, "temperature": 1.0}),
        Variant("standardize, T=2", {"standardize": True, "temperature": 2.0}),
        Variant("TCKD only", {"beta": 0.0}),
    ),
    medium={"rows": 64, "classes": 1000},
    bad_inputs=(
        BadInput("temperature 0", lambda a: _with(a, temperature=0.0), ValueError,
                 "temperature"),
        BadInput("negative beta", lambda a: _with(a, beta=-1.0), ValueError, "beta"),
        BadInput("negative alpha", lambda a: _with(a, alpha=-1.0), ValueError, "alpha"),
        BadInput("labels missing", lambda a: _with(a, labels=None), TypeError, "labels"),
        BadInput("label out of range",
                 lambda a: _with(a, labels=np.full(a["student_logits"].shape[0], 99)),
                 ValueError, "labels"),
        BadInput("one-hot labels",
                 lambda a: _with(a, labels=np.eye(a["student_logits"].shape[1])[
                     np.zeros(a["student_logits"].shape[0], int)]),
                 TypeError, "labels"),
        BadInput("one class", lambda a: _with(a, student_logits=a["student_logits"][:, :1],
                                              teacher_logits=a["teacher_logits"][:, :1],
                                              labels=np.zeros(a["labels"].shape, int)),
                 ValueError, "at least 2"),
        BadInput("standardize not a bool", lambda a: _with(a, standardize="yes"), TypeError,
                 "standardize"),
    ),
    workloads=(
        Workload("B4096_C1000", {"rows": 4096, "classes": 1000}, quick=True,
                 notes="alpha=1, beta=8, T=4 (mdistiller CIFAR/ImageNet settings)"),
        Workload("B512_C32000", {"rows": 512, "classes": 32_000},
                 notes="large vocabulary"),
    ),
))
