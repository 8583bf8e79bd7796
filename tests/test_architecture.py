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

And one rule of ``kdnumba._policy``: a kernel helper built with ``callee``
(no CPython wrapper) is named only inside kernels, never by Python code
(in the package, its tests or benchmarks), where calling it would crash.
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


# --- kernel helpers without Python wrappers --------------------------------------------

KERNELS_CPU = PACKAGE / "kernels" / "cpu"
_KERNELS_CPU_MODULE = "kdnumba.kernels.cpu"
_JIT_DECORATORS = {"jit", "njit", "parallel_jit", "callee", "overload", "intrinsic",
                   "register_jitable"}


def _decorators(node) -> list[str]:
    names = []
    for d in node.decorator_list:
        d = d.func if isinstance(d, ast.Call) else d
        names.append(d.id if isinstance(d, ast.Name) else getattr(d, "attr", ""))
    return names


def _callees() -> dict[str, set[str]]:
    """``kernel module -> names of its helpers built with _policy.callee``."""
    found = {}
    for path in sorted(KERNELS_CPU.glob("*.py")):
        found[path.stem] = {node.name for node in ast.parse(path.read_text()).body
                            if isinstance(node, ast.FunctionDef)
                            and "callee" in _decorators(node)}
    return found


def _python_side_uses(tree, callees, own_module=None):
    """``(line, module.name)`` where Python code (not a kernel's body) names a
    callee: a name imported from its kernel module (or defined there, for
    ``own_module``), an attribute of an imported kernel module, or an
    attribute of ``kernels`` (the functional layer's ``be.kernels(family)``)."""
    names, modules = {}, {"kernels": set().union(*callees.values())}
    if own_module is not None:
        names.update({n: f"{own_module}.{n}" for n in callees[own_module]})
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                local = alias.asname or alias.name
                if node.module == _KERNELS_CPU_MODULE and alias.name in callees:
                    modules[local] = callees[alias.name]
                elif node.module.startswith(_KERNELS_CPU_MODULE + "."):
                    stem = node.module.rsplit(".", 1)[1]
                    if alias.name in callees.get(stem, ()):
                        names[local] = f"{stem}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                stem = alias.name.rsplit(".", 1)[-1]
                if alias.name.startswith(_KERNELS_CPU_MODULE + ".") and alias.asname:
                    modules[alias.asname] = callees.get(stem, set())
    uses = []

    def visit(node, in_kernel):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_kernel = in_kernel or bool(set(_decorators(node)) & _JIT_DECORATORS)
        if not in_kernel and not isinstance(node, (ast.Import, ast.ImportFrom)):
            if isinstance(node, ast.Name) and node.id in names:
                uses.append((node.lineno, names[node.id]))
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.attr in modules.get(node.value.id, ())):
                uses.append((node.lineno, f"{node.value.id}.{node.attr}"))
        for child in ast.iter_child_nodes(node):
            visit(child, in_kernel)

    visit(tree, False)
    return uses


def test_callee_helpers_are_never_called_from_python():
    # A ``callee`` has no CPython wrapper: a call from Python would crash the
    # interpreter rather than raise. So only kernels may name one.
    callees = _callees()
    assert {"lane_sum", "hard_power", "_exp_in_place"} <= set().union(*callees.values())
    root = PACKAGE.parent
    files = sorted(PACKAGE.rglob("*.py")) + sorted((root / "tests").rglob("*.py")) \
        + sorted((root / "bench").rglob("*.py"))
    bad = []
    for path in files:
        own = path.stem if path.parent == KERNELS_CPU else None
        for line, name in _python_side_uses(ast.parse(path.read_text()), callees, own):
            bad.append(f"{path.relative_to(root)}:{line} names {name}")
    assert not bad, "Python code names a wrapper-less kernel helper:\n" + "\n".join(bad)


def test_the_callee_check_sees_python_calls():
    callees = {"reductions": {"lane_sum"}, "softmax_kl": {"hard_power"}}
    seen = _python_side_uses(ast.parse(
        "from kdnumba.kernels.cpu.reductions import lane_sum\n"
        "from kdnumba.kernels.cpu import softmax_kl\n"
        "def f(x):\n    return lane_sum(x) + softmax_kl.hard_power(x)\n"
        "@jit\ndef g(x):\n    return lane_sum(x)\n"
        "def h(kernels):\n    return kernels.hard_power\n"), callees)
    assert seen == [(4, "reductions.lane_sum"), (4, "softmax_kl.hard_power"),
                    (9, "kernels.hard_power")]
    own = _python_side_uses(ast.parse("def driver(x):\n    return hard_power(x)\n"),
                            callees, "softmax_kl")
    assert own == [(2, "softmax_kl.hard_power")]
