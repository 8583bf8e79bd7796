"""Two source patterns that made Numba compile the same code twice (issue 16).

Parses the CPU kernels (nothing is imported or compiled) and checks:

* **No literal bool or int passed to a kernel helper** (``True``, ``3``, or a
  module's integer constant such as ``ST_SOFT``, which Numba freezes as a
  literal too). Numba types such an argument as ``Literal[bool](True)`` /
  ``Literal[int](3)``, not ``bool`` / ``int64``: a helper compiles once per
  literal value and once more for a variable, and the parallel kernel that
  calls it carries every copy through its four LLVM modules (sparse KD:
  0.5-0.7 s of its first call). Pass a variable that holds the value
  (``not has_hard``) or ``np.int64(CONSTANT)``.
* **No ``exp_nonpos`` call directly in a ``prange`` body.** It is an
  ``@overload``, and Numba caches an overload's implementation per caller's
  compiler flags: called from a parallel kernel's body as well as from
  helpers, the exponential compiled twice. Call it from a helper.
"""

from __future__ import annotations

import ast
from pathlib import Path

KERNELS_CPU = Path(__file__).resolve().parents[1] / "kdnumba" / "kernels" / "cpu"
_KERNEL_DECORATORS = {"jit", "parallel_jit", "callee"}
#: Overloads whose implementation is large enough that a second build shows.
_COSTLY_OVERLOADS = {"exp_nonpos"}


def _decorator_names(node) -> set[str]:
    names = set()
    for d in node.decorator_list:
        d = d.func if isinstance(d, ast.Call) else d
        names.add(d.id if isinstance(d, ast.Name) else getattr(d, "attr", ""))
    return names


def _kernel_names() -> set[str]:
    """Every function of ``kernels/cpu`` built with a kernel decorator."""
    return {node.name for path in KERNELS_CPU.glob("*.py")
            for node in ast.parse(path.read_text()).body
            if isinstance(node, ast.FunctionDef) and _decorator_names(node) & _KERNEL_DECORATORS}


def _kernels(tree):
    return [node for node in tree.body if isinstance(node, ast.FunctionDef)
            and _decorator_names(node) & _KERNEL_DECORATORS]


def _is_literal(arg) -> bool:
    """A bool or int constant, or an UPPER_CASE module constant."""
    if isinstance(arg, ast.Constant):
        return isinstance(arg.value, int)  # bool is an int
    return isinstance(arg, ast.Name) and arg.id.isupper()


def literal_arguments(tree, helpers: set[str]) -> list[tuple[int, str]]:
    """``(line, helper)`` where a kernel passes a literal bool or int to a helper."""
    found = []
    for kernel in _kernels(tree):
        for node in ast.walk(kernel):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in helpers):
                continue
            if any(_is_literal(a) for a in [*node.args, *(k.value for k in node.keywords)]):
                found.append((node.lineno, node.func.id))
    return found


def costly_overloads_in_prange(tree) -> list[tuple[int, str]]:
    """``(line, name)`` where a ``parallel_jit`` kernel's ``prange`` body
    calls one of :data:`_COSTLY_OVERLOADS` itself."""
    found = []
    for kernel in _kernels(tree):
        if "parallel_jit" not in _decorator_names(kernel):
            continue
        for loop in ast.walk(kernel):
            if not (isinstance(loop, ast.For) and isinstance(loop.iter, ast.Call)
                    and getattr(loop.iter.func, "id", "") == "prange"):
                continue
            for node in ast.walk(loop):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                        and node.func.id in _COSTLY_OVERLOADS):
                    found.append((node.lineno, node.func.id))
    return found


def _all(check, *args) -> list[str]:
    return [f"{path.name}:{line} {name}" for path in sorted(KERNELS_CPU.glob("*.py"))
            for line, name in check(ast.parse(path.read_text()), *args)]


def test_no_literal_reaches_a_helper():
    helpers = _kernel_names()
    assert {"_gradient_row", "_scale_row", "_finite_sq", "lane_sum"} <= helpers
    bad = _all(literal_arguments, helpers)
    assert not bad, "literal passed to a kernel helper (compiles it again):\n" + "\n".join(bad)


def test_no_costly_overload_in_a_prange_body():
    bad = _all(costly_overloads_in_prange)
    assert not bad, "exp_nonpos called in a prange body (compiled once more):\n" + "\n".join(bad)


_BAD_KERNELS = '''
@callee
def helper(x, flag):
    return x

@parallel_jit
def kernel(x, out):
    y = helper(x, True)
    for i in prange(x.shape[0]):
        out[i] = exp_nonpos(x[i]) + helper(x[i], flag=False) + helper(x[i], ROW)
    return exp_nonpos(y[0]) + helper(x, np.int64(ROW)) + helper(x, 2.0)

def python_side(x):
    return helper(x, True)
'''


def test_the_checks_see_the_patterns():
    tree = ast.parse(_BAD_KERNELS)
    # np.int64(ROW) and float constants are not literals to Numba.
    assert literal_arguments(tree, {"helper"}) == [(8, "helper"), (10, "helper"),
                                                   (10, "helper")]
    # Outside the prange loop, or in Python code, the calls are fine.
    assert costly_overloads_in_prange(tree) == [(10, "exp_nonpos")]
