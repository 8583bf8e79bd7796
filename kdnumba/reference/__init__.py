"""Slow, obvious NumPy references: one module per kernel family.

They are written for readability, straight from the formulas in ``docs/``,
with no code shared with the kernels. Tests compare every kernel against
them; ``kdnumba bench`` times them as "what a NumPy user would write". They
compute in the dtype of their inputs.

The package exports every public function its modules define (NumPy
references under the loss's name, PyTorch expressions as ``<name>_torch``);
the registry names them as ``"module:function"``.
"""

from kdnumba import _exports

_API = _exports.collect(__name__, __path__)
globals().update(_API)

__all__ = sorted(_API)
