"""The functional layer: pure ``(loss, grad)`` functions, one module per family.

Each function validates its inputs, dispatches on dtype and device, and runs
fused kernels; ``grad`` is the exact derivative of ``loss`` with respect to
the first (student) argument. They never modify their inputs. All losses are
batch means; ``p^T(z) = softmax(z / T)``; ``cos`` clamps norms at 1e-12.

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

Every loss declares itself in :mod:`kdnumba.registry` next to its code;
:func:`specs` lists them and ``docs/api.md`` has the generated table. This
package exports every registered loss and the other public names its
modules list in ``__all__`` (importing each module registers its losses), so
a new module needs no edit here.
"""

from kdnumba import _exports
from kdnumba import registry as _registry


def _modules_api(module) -> list[str]:
    """A module without ``__all__`` exports just the losses it registered."""
    registered = {spec.name for spec in _registry.specs()}
    return [name for name in _exports.defined_here(module) if name in registered]


_API = _exports.collect(__name__, __path__, default=_modules_api)
globals().update(_API)


def specs():
    """Every registered loss (:class:`kdnumba.registry.LossSpec`), in order."""
    return _registry.specs()


__all__ = sorted([*_API, "specs"])
