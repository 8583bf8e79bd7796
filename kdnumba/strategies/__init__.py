"""Strategies: thin, validated, user-facing classes over :mod:`kdnumba.functional`.

One module per family. The package exports each module's ``__all__``, or the
public classes it defines, so a new strategy module needs no edit here (nor
in ``kdnumba/__init__.py``, which re-exports this list).
"""

from kdnumba import _exports

_API = _exports.collect(__name__, __path__, default=lambda module: [
    name for name in _exports.defined_here(module)
    if isinstance(getattr(module, name), type)])
globals().update(_API)

__all__ = sorted(_API)
