"""Gram-matrix (B x B similarity) losses as pure functions: :func:`sp_loss`, :func:`pkt_loss`."""

from __future__ import annotations

import math

import numpy as np

from kdnumba import _dispatch
from kdnumba import _validation as v
from kdnumba._constants import NORM_EPS
from kdnumba.registry import BadInput, LossSpec, Variant, Workload, register

#: PKT's default epsilon (RepDistiller ``cosine_similarity_loss``).
PKT_EPS = 1e-7


def sp_loss(student_feats, teacher_feats, *, device="auto", out=None):
    r"""Similarity-preserving KD (Tung & Mori, ICCV 2019), RepDistiller ``Similarity``, one pair.

    Rows are flattened to ``(B, M_s)`` and ``(B, M_t)`` (the widths may differ:
    only the ``B x B`` similarities are compared)::

        G     = f f^T,   N_i = G_i / max(||G_i||, 1e-12)     (F.normalize, per row)
        D     = N_s - N_t
        loss  = 1/B^2 sum_ij D_ij^2

    Gradient (the teacher is a constant), with ``r_i = ||G^s_i||``::

        Q_i   = 2/B^2 (D_i - N^s_i (N^s_i . D_i)) / r_i     (2/B^2 D_i / 1e-12 if r_i < 1e-12)
        dL/df = (Q + Q^T) f_s

    RepDistiller's code is the paper's formula (row-wise L2-normalised Gram
    matrices, squared Frobenius norm over ``B^2``) with ``F.normalize``'s
    ``1e-12`` clamp; the paper sums this over layer pairs with weight
    ``gamma`` (``-b 3000`` in RepDistiller's scripts): that is the strategy's
    job (:class:`kdnumba.SimilarityPreservingStrategy`).

    Cost: three ``B^2 M`` products (SYRK for each Gram, one GEMM for the
    gradient) in the input dtype by BLAS, the row statistics in float64.
    Memory: ``O(B^2)`` up to ``kernels.cpu.similarity.TILE_BYTES``, then
    ``O(B M + R B)`` with tiles of ``R`` rows (on the GPU: ``O(B^2)``).

    Args:
        student_feats: ``(B, ...)`` float array, flattened to ``(B, M_s)``.
        teacher_feats: ``(B, ...)`` float array; cast to the student's dtype.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        out: optional C-contiguous array of the student's shape and dtype to
            receive the gradient.

    Returns:
        ``(loss, grad)``, ``grad`` of the student's shape and dtype.

    Raises:
        TypeError: non-float input.
        ValueError: batch mismatch, empty input, NaN/inf (or overflow of ``G``).
    """
    return _gram_loss("sp", (NORM_EPS,), student_feats, teacher_feats,
                      ("student_feats", "teacher_feats"), device, out)


def pkt_loss(student_emb, teacher_emb, *, eps=PKT_EPS, device="auto", out=None):
    r"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018), RepDistiller ``PKT``.

    Exactly RepDistiller's ``cosine_similarity_loss`` (rows flattened to
    ``(B, D)``; ``D_s`` and ``D_t`` may differ)::

        xh_i  = x_i / (||x_i|| + eps)
        K     = (xh xh^T + 1) / 2,     p_ij = K_ij / sum_k K_ik        (row-normalised)
        loss  = mean_ij p^t_ij log((p^t_ij + eps) / (p^s_ij + eps))     (mean over B^2)

    Gradient (the teacher is a constant), with ``S_i = sum_k K^s_ik``, ``n_i = ||x_i||``::

        g_ij  = -p^t_ij / (p^s_ij + eps) / B^2
        Q_ij  = (g_ij - sum_k g_ik p^s_ik) / (2 S_i)                   (dL/dC_ij)
        H     = (Q + Q^T) xh
        dL/dx_i = H_i / (n_i + eps) - xh_i (xh_i . H_i) / n_i

    Where the code deviates from the paper (we follow the code):

    * the paper's conditional probabilities exclude ``j = i``
      (``p_{i|j} = K_ij / sum_{k != j} K_kj``); the code keeps the diagonal;
    * the paper's divergence is a sum; the code takes the mean over all
      ``B^2`` entries and adds ``eps`` inside the logarithm;
    * cosines use ``norm + eps`` (the paper: exact cosines), and the code
      zeroes NaNs of the normalised rows (a NaN/inf input here raises instead;
      ``eps > 0`` is required, so a zero row gives ``xh = 0`` as in the code).

    Because of the ``eps`` in the logarithm the loss can be slightly negative
    (by at most about ``log(1 + B eps)``), and its gradient at ``student ==
    teacher`` is small but not zero.

    A zero student row (``n_i = 0``) gets the first term of the gradient only
    (PyTorch's autograd gives NaN there: ``sqrt`` at 0).

    Args:
        student_emb: ``(B, ...)`` float array, flattened to ``(B, D_s)``.
        teacher_emb: ``(B, ...)`` float array; cast to the student's dtype.
        eps: ``> 0`` (default 1e-7, RepDistiller's).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        out: optional C-contiguous array of the student's shape and dtype to
            receive the gradient.

    Returns:
        ``(loss, grad)``, ``grad`` of the student's shape and dtype.

    Raises:
        TypeError: non-float input, non-real ``eps``.
        ValueError: batch mismatch, empty input, NaN/inf, ``eps <= 0``.
    """
    eps = v.check_positive(eps, "eps")
    return _gram_loss("pkt", (eps,), student_emb, teacher_emb,
                      ("student_emb", "teacher_emb"), device, out)


def _gram_loss(kernel: str, options, student, teacher, names, device, out):
    """The one body of both losses: validate, run ``kernels.<kernel>``, reduce."""
    be = _dispatch.backend(device, student, teacher)
    s_in = be.float_array(student, names[0])
    t_in = be.float_array(teacher, names[1], dtype=s_in.dtype)
    v.check_same_batch(s_in, t_in, names[0], names[1])
    grad_in = be.gradient_buffer(out, s_in, (student, teacher, t_in))
    s, t, grad = _rows(s_in), _rows(t_in), _rows(grad_in)
    n = s.shape[0]
    row_loss = be.empty(n, np.float64)
    with be.launch(n * (n + s.shape[1] + t.shape[1])):
        getattr(be.kernels("similarity"), kernel)(s, t, *options, None, row_loss, grad)
    loss = be.total(row_loss) / (n * n)
    be.check_finite(loss, [(names[0], s), (names[1], t)])
    return float(loss), be.deliver(grad_in, out)


def _rows(x):
    """A C-contiguous ``(B, ...)`` array viewed as ``(B, M)``."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


# --- registry entries ------------------------------------------------------------------

def _sp_inputs(rng, dtype, *, shape=(6, 3, 2, 2), teacher_shape=None) -> dict:
    """Student features of ``shape`` and a related teacher: the student plus
    noise, or (``teacher_shape`` given) a random projection of its flattened
    rows to that size plus noise."""
    student = rng.standard_normal(shape)
    flat = student.reshape(shape[0], -1)
    if teacher_shape is None:
        teacher = student + 0.5 * rng.standard_normal(shape)
    else:
        width = math.prod(teacher_shape[1:])
        proj = rng.standard_normal((flat.shape[1], width)) / np.sqrt(flat.shape[1])
        teacher = (flat @ proj + 0.5 * rng.standard_normal((shape[0], width))
                   ).reshape(teacher_shape)
    return {"student_feats": student.astype(dtype), "teacher_feats": teacher.astype(dtype)}


def _pkt_inputs(rng, dtype, *, rows=6, student_dim=5, teacher_dim=None) -> dict:
    """Student embeddings ``(rows, student_dim)`` and a related teacher (as ``_sp_inputs``)."""
    args = _sp_inputs(rng, dtype, shape=(rows, student_dim),
                      teacher_shape=None if teacher_dim is None else (rows, teacher_dim))
    return {"student_emb": args["student_feats"], "teacher_emb": args["teacher_feats"]}


def _gram_flops(student: str, teacher: str):
    def flops(inputs) -> int:
        s, t = inputs[student], inputs[teacher]
        n = s.shape[0]
        # SYRK for each Gram (B^2 M), one GEMM for the gradient (2 B^2 M_s).
        return int(n * n * (s.size // n) * 3 + n * n * (t.size // n))
    return flops


def _with(arguments: dict, **changes) -> dict:
    return {**arguments, **changes}


register(LossSpec(
    name="sp_loss",
    function=sp_loss,
    family="similarity",
    make_inputs=_sp_inputs,
    reference="similarity:sp_loss",
    torch="similarity:sp_loss_torch",
    variants=(
        Variant("same shapes"),
        Variant("teacher of another shape", inputs={"teacher_shape": (6, 5, 1, 1)}),
    ),
    medium={"shape": (256, 32, 2, 2)},
    workloads=(
        Workload("B512_256x8x8_vs_512x4x4", {"shape": (512, 256, 8, 8),
                                             "teacher_shape": (512, 512, 4, 4)},
                 quick=True,
                 notes="CIFAR ResNet last stage: student 256x8x8, teacher 512x4x4"),
        Workload("B512_64x8x8_vs_256x8x8", {"shape": (512, 64, 8, 8),
                                            "teacher_shape": (512, 256, 8, 8)},
                 notes="resnet8x4 vs resnet32x4 last block (RepDistiller's SP layer)"),
    ),
    flops=_gram_flops("student_feats", "teacher_feats"),
))


register(LossSpec(
    name="pkt_loss",
    function=pkt_loss,
    family="similarity",
    make_inputs=_pkt_inputs,
    reference="similarity:pkt_loss",
    torch="similarity:pkt_loss_torch",
    variants=(
        Variant("eps 1e-7"),
        Variant("wider teacher, eps 1e-3", {"eps": 1e-3}, {"teacher_dim": 9}),
    ),
    medium={"rows": 256, "student_dim": 128},
    # The eps inside the logarithm moves the minimum off student == teacher
    # (see the docstring): slightly negative values and a nonzero gradient there.
    nonnegative=False,
    zero_when_equal=False,
    bad_inputs=(
        BadInput("zero eps", lambda a: _with(a, eps=0.0), ValueError, "eps"),
        BadInput("string eps", lambda a: _with(a, eps="1e-7"), TypeError, "eps"),
        BadInput("NaN eps", lambda a: _with(a, eps=float("nan")), ValueError, "eps"),
    ),
    workloads=(
        Workload("B512_D128_vs_D256", {"rows": 512, "student_dim": 128, "teacher_dim": 256},
                 quick=True, notes="embedding heads: student 128, teacher 256"),
        Workload("B1024_D64_vs_D128", {"rows": 1024, "student_dim": 64, "teacher_dim": 128},
                 notes="larger batch, narrow embeddings"),
    ),
    flops=_gram_flops("student_emb", "teacher_emb"),
))
