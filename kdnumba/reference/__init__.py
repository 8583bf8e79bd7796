"""Slow, obvious NumPy references: one module per kernel family.

They are written for readability, straight from the formulas in
``docs/math.md``, with no code shared with the kernels. Tests compare every
kernel against them; ``kdnumba bench`` times them as "what a NumPy user
would write". They compute in the dtype of their inputs.
"""

from kdnumba.reference.response import kd_loss

__all__ = ["kd_loss"]
