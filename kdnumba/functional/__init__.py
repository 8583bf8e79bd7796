"""The functional layer: pure ``(loss, grad)`` functions.

Each function validates its inputs, dispatches on dtype and device, and runs
fused kernels; ``grad`` is the exact derivative of ``loss`` with respect to
the first (student) argument. They never modify their inputs. All losses are
batch means; ``p^T(z) = softmax(z / T)``; ``cos`` clamps norms at 1e-12.

=========================  ===================================================================
function                   loss
=========================  ===================================================================
``kd_loss``                ``alpha*CE(softmax(s), y) + (1-alpha)*T^2*KL(p^T(t) || p^T(s))``
``selectivity_loss``       ``mean_n (sel_n(s) - sel_n(t))^2``, sel = variance / relaxed
                           sparsity / peak-to-average over the batch
``nt_xent``                ``mean_i [-cos(s_i,t_i)/tau + log sum_j exp(cos(s_i,t_j)/tau)]``
``info_nce``               ``mean_i [-cos(t_i,s_i)/tau + log sum_j exp(cos(t_i,s_j)/tau)]``
``supervised_contrastive`` ``mean_i [-mean_{j in P(i)} cos(s_i,t_j)/tau + log sum_j exp(...)]``
``triplet_loss``           batch-hard ``max(0, max_p d(s_i,s_p) - min_n d(s_i,s_n) + margin)``
``feature_loss``           ``mean (s - t)^2`` (FitNets)
``attention_transfer``     ``mean (a(s) - a(t))^2``, ``a(f) = normalize(mean_c f^p)``
``attention_map_loss``     MSE or row-KL between attention maps ``(B, heads, L, L)``
``rkd_loss``               ``25 * smoothL1(distances) + 50 * smoothL1(angles)`` (RKD)
``sp_loss``                ``sum (N_s - N_t)^2 / B^2``, ``N`` = row-normalised Gram ``f f^T`` (SP)
``pkt_loss``               ``mean p_t log((p_t + eps)/(p_s + eps))`` over cosine-kernel rows (PKT)
=========================  ===================================================================
"""

from kdnumba.functional.attention import attention_map_loss, attention_transfer
from kdnumba.functional.contrastive import (
    info_nce,
    nt_xent,
    supervised_contrastive,
    triplet_loss,
)
from kdnumba.functional.decoupled import dkd_loss
from kdnumba.functional.dist import dist_loss
from kdnumba.functional.crd import CRDMemory, crd_loss
from kdnumba.functional.feature import feature_loss
from kdnumba.functional.featuremaps import hcl_loss, nst_loss
from kdnumba.functional.relational import rkd_loss
from kdnumba.functional.response import kd_loss, sparse_kd_loss
from kdnumba.functional.selectivity import (
    SelectivityMetric,
    SelectivityStatistics,
    selectivity_loss,
    selectivity_statistics,
)
from kdnumba.functional.similarity import pkt_loss, sp_loss
from kdnumba.functional.standardize import standardize_logits, standardize_logits_backward

from kdnumba import registry as _registry


def specs():
    """Every registered loss (:class:`kdnumba.registry.LossSpec`), in order."""
    return _registry.specs()


__all__ = [
    "CRDMemory",
    "SelectivityMetric",
    "SelectivityStatistics",
    "attention_map_loss",
    "attention_transfer",
    "dist_loss",
    "dkd_loss",
    "crd_loss",
    "feature_loss",
    "hcl_loss",
    "info_nce",
    "kd_loss",
    "nst_loss",
    "nt_xent",
    "pkt_loss",
    "rkd_loss",
    "selectivity_loss",
    "selectivity_statistics",
    "sp_loss",
    "sparse_kd_loss",
    "specs",
    "standardize_logits",
    "standardize_logits_backward",
    "supervised_contrastive",
    "triplet_loss",
]
