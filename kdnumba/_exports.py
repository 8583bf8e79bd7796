"""Package export lists derived from the modules, never kept by hand.

A package's ``__init__`` calls :func:`collect` to import each of its
(non-underscore) submodules and gather their public API, so adding a module
-- a new loss, a new strategy -- needs no edit of the package's ``__init__``.
A submodule's public API is its ``__all__`` when it defines one, else what
``default`` picks from the classes and functions it defines itself.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable


def defined_here(module) -> list[str]:
    """Public classes and functions defined in ``module`` (not imported into it)."""
    return [name for name, obj in vars(module).items()
            if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
            and obj.__module__ == module.__name__]


def collect(package_name: str, package_path, default: Callable = defined_here) -> dict:
    """``{name: object}`` exported by the submodules of a package, in module order.

    Raises ``ImportError`` if two submodules export different objects under one
    name (an export list built this way must stay unambiguous).
    """
    exported: dict[str, object] = {}
    for info in sorted(pkgutil.iter_modules(package_path), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package_name}.{info.name}")
        names = getattr(module, "__all__", None)
        for name in (default(module) if names is None else names):
            obj = getattr(module, name)
            if exported.get(name, obj) is not obj:
                raise ImportError(f"{package_name}: two submodules export {name!r}")
            exported[name] = obj
    return exported
