"""The layering stays honest: no import cycles, no reaching into private names.

Parses every module of the ``kdnumba`` package (nothing is imported) and
checks two rules of ``docs/architecture.md``:

* **No import cycle** among kdnumba's modules, counting every import
  statement, also those inside functions (a lazy import is still a
  dependency). ``from kdnumba.x import name`` depends on ``kdnumba.x`` (its
  ``__init__`` for a package); ``from kdnumba import sub`` on ``kdnumba.sub``.
* **No private name of another module**: neither ``from kdnumba.x import
  _name`` nor ``module._name`` on an imported kdnumba module. Underscore
  *modules* (``kdnumba._validation``) are package-internal and may be
  imported; underscore *names* belong to their module. ``kdnumba.reference``
  (test references) is exempt, as are tests.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kdnumba"
EXEMPT_PRIVATE = ("kdnumba.reference",)


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_module(name: str) -> bool:
    return name in MODULES


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module of a ``from ... import`` (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    is_package = MODULES[module].name == "__init__.py"
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str):
    """``(dependencies, private uses)`` of one module."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    deps: set[str] = set()
    private: list[str] = []
    aliases: dict[str, str] = {}  # local name -> kdnumba module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("kdnumba"):
                    target = alias.name
                    deps.add(target)
                    aliases[alias.asname or alias.name.split(".")[0]] = (
                        target if alias.asname else "kdnumba")
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            if not source.startswith("kdnumba"):
                continue
            for alias in node.names:
                full = f"{source}.{alias.name}"
                if _is_module(full):
                    deps.add(full)
                    aliases[alias.asname or alias.name] = full
                else:
                    deps.add(source)
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append(f"from {source} import {alias.name}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            target = aliases[node.value.id]
            if target != module and not _is_module(f"{target}.{node.attr}"):
                private.append(f"{node.value.id}.{node.attr} ({target})")
    deps = {d for d in deps if _is_module(d) and d != module}
    return deps, private


def _collected_submodules(module: str) -> set[str]:
    """A package whose ``__init__`` builds its exports with ``_exports.collect``
    imports every non-underscore submodule at run time: those are edges too."""
    path = MODULES[module]
    if path.name != "__init__.py" or "_exports.collect(" not in path.read_text():
        return set()
    return {m for m in MODULES if m.rpartition(".")[0] == module
            and not m.rpartition(".")[2].startswith("_")}


GRAPH = {m: _imports(m)[0] | _collected_submodules(m) for m in MODULES}


def _find_cycle(graph):
    """One import cycle as a list of modules, or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_walk_sees_the_package():
    assert len(MODULES) > 40
    assert "kdnumba.functional.response" in GRAPH["kdnumba.functional"]  # collected
    assert "kdnumba._exports" in GRAPH["kdnumba.strategies"]
    assert "kdnumba._dispatch" in GRAPH["kdnumba.functional.response"]


def test_no_import_cycles():
    cycle = _find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", [m for m in MODULES if not m.startswith(EXEMPT_PRIVATE)])
def test_no_private_names_of_other_modules(module):
    _, private = _imports(module)
    assert not private, f"{module} uses other modules' private names: {private}"


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_kernels_know_nothing_of_the_layers_above():
    above = ("kdnumba.functional", "kdnumba.strategies", "kdnumba.training",
             "kdnumba._validation", "kdnumba._dispatch", "kdnumba.registry")
    for module, deps in GRAPH.items():
        if module.startswith("kdnumba.kernels"):
            bad = sorted(d for d in deps if d.startswith(above))
            assert not bad, f"{module} imports {bad}"
