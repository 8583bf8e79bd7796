"""Numbers and codes shared by several layers: one home each.

A leaf module (it imports nothing from kdnumba), so kernels, validation,
the functional layer and the references can all read it without creating an
import cycle.
"""

#: Norm clamp of every L2 normalisation, as ``torch.nn.functional.normalize``:
#: ``x / max(||x||, NORM_EPS)``; also the distance floor of RKD.
NORM_EPS = 1e-12

#: Tolerance on ``sum(row) == 1`` for rows that must be probability vectors
#: (soft labels, attention maps given as probabilities).
ROW_SUM_TOL = 1e-3

#: Denominator epsilon of the peak-to-average selectivity statistic.
SELECTIVITY_EPS = 1e-8

#: ``labels_kind`` codes understood by the response kernels (CPU and CUDA).
LABELS_NONE = 0
LABELS_INDEX = 1
LABELS_DENSE = 2

#: ``_validation.as_labels`` kind name -> kernel code.
LABEL_CODES = {"none": LABELS_NONE, "index": LABELS_INDEX, "dense": LABELS_DENSE}

#: Denominator epsilon of logit standardisation, ``(z - mean) / (std + eps)``
#: (Sun et al., CVPR 2024; their code and torchdistill's ``LogitStdKDLoss``).
STANDARDIZE_EPS = 1e-7

#: mdistiller's DKD masks the target out of NCKD as ``z / T - DKD_MASK`` (CPU and
#: CUDA decoupled kernels).
DKD_MASK = 1000.0

#: ``divergence`` codes of the response kernels' ``divergence_rows`` (CPU and
#: CUDA); ``kd_rows`` computes the forward KL.
DIV_KL = 0
DIV_REVERSE_KL = 1
DIV_JSD = 2
DIV_TVD = 3

#: ``row_status`` codes of the sparse (top-K teacher) response kernels.
SPARSE_OK = 0
SPARSE_OUT_OF_RANGE = 1
SPARSE_DUPLICATE = 2
