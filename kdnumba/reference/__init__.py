"""Slow, obvious NumPy references: one module per kernel family.

They are written for readability, straight from the formulas in ``docs/``,
with no code shared with the kernels. Tests compare every kernel against
them; ``kdnumba bench`` times them as "what a NumPy user would write". They
compute in the dtype of their inputs.
"""

from kdnumba.reference.attention import attention_map_loss, attention_transfer
from kdnumba.reference.contrastive import (
    info_nce,
    nt_xent,
    supervised_contrastive,
    triplet_loss,
)
from kdnumba.reference.decoupled import dkd_loss
from kdnumba.reference.dist import dist_loss
from kdnumba.reference.crd import crd_loss
from kdnumba.reference.feature import feature_loss
from kdnumba.reference.featuremaps import hcl_loss, nst_loss
from kdnumba.reference.relational import rkd_loss
from kdnumba.reference.response import kd_loss, sparse_kd_loss
from kdnumba.reference.selectivity import selectivity_loss, selectivity_statistics
from kdnumba.reference.similarity import pkt_loss, sp_loss

__all__ = [
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
    "supervised_contrastive",
    "triplet_loss",
]
