"""Structure rules of ``lightning_attr``, checked on the source with ``ast`` (nothing is imported):

1. no function or method is longer than ``MAX_FUNCTION_LINES`` (``def`` line to end of body, decorators excluded);
2. no module imports a private (``_``-prefixed) name from a module of *another* subpackage (a top-level module such
   as ``lightning_attr/io.py`` is its own subpackage); within one subpackage the torchmetrics ``functional`` /
   ``_update`` pattern is fine;
3. no import cycles among ``lightning_attr`` modules at module level (imports inside functions and under
   ``if TYPE_CHECKING:`` are ignored).

Rules 1 and 2 run once per subpackage so a failure names where it is.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "lightning_attr"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
MAX_FUNCTION_LINES = 60


@dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. "lightning_attr.metrics.functional" ("lightning_attr.metrics" for its __init__)
    path: Path
    is_package: bool
    tree: ast.Module


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def _load_modules() -> dict[str, Module]:
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        name, is_package = _module_name(path)
        modules[name] = Module(name, path, is_package, ast.parse(path.read_text(), filename=str(path)))
    return modules


MODULES = _load_modules()


def subpackage(module: str) -> str:
    """``lightning_attr.metrics.functional`` -> ``lightning_attr.metrics``; ``lightning_attr.io`` -> itself."""
    return ".".join(module.split(".")[:2])


SUBPACKAGES = sorted({subpackage(name) for name in MODULES})


def _where(module: Module, node: ast.AST) -> str:
    return f"{module.path.relative_to(ROOT.parent)}:{node.lineno}"


def _resolve(module: Module, node: ast.ImportFrom) -> str:
    """Absolute name of the module a ``from ... import`` statement reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.name.split(".")
    base = base[: len(base) - node.level + (1 if module.is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


# ----------------------------------------------------------------------------- rule 1: short functions
def long_functions(module: Module) -> list[str]:
    """``path:line qualified.name (N lines)`` for every function or method over the limit."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qualname = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    length = child.end_lineno - child.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        found.append(f"{_where(module, child)} {qualname} ({length} lines)")
                visit(child, qualname + ".")
            else:
                visit(child, prefix)

    visit(module.tree, "")
    return found


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_functions_are_short(package: str) -> None:
    offenders = [hit for m in MODULES.values() if subpackage(m.name) == package for hit in long_functions(m)]
    assert not offenders, (f"{len(offenders)} function(s) in {package} longer than {MAX_FUNCTION_LINES} lines; "
                           "split them:\n  " + "\n  ".join(offenders))


# ----------------------------------------------------------------------------- rule 2: no private cross imports
def _module_aliases(module: Module) -> dict[str, str]:
    """Local names bound to ``lightning_attr`` modules anywhere in ``module`` (``import a.b as c``, ``from a import b``)."""
    aliases = {}
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE) and alias.asname:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            for alias in node.names:
                if f"{source}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
    return aliases


def private_imports(module: Module) -> list[str]:
    """``path:line importer -> source.name`` for each private name taken from another subpackage."""
    own, found = subpackage(module.name), []

    def check(source: str, name: str, node: ast.AST) -> None:
        if source.split(".")[0] != PACKAGE or subpackage(source) == own:
            return
        dotted = f"{source}.{name}" if name else source
        if any(_is_private(part) for part in dotted.split(".")[1:]):
            found.append(f"{_where(module, node)} {module.name} -> {dotted}")

    aliases = _module_aliases(module)
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                check(alias.name, "", node)
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                check(_resolve(module, node), alias.name, node)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            check(aliases[node.value.id], node.attr, node)
    return found


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_no_private_imports_across_subpackages(package: str) -> None:
    offenders = [hit for m in MODULES.values() if subpackage(m.name) == package for hit in private_imports(m)]
    assert not offenders, (f"{package} uses private names of other subpackages; make them public or move the "
                           "code:\n  " + "\n  ".join(offenders))


# ----------------------------------------------------------------------------- rule 3: no import cycles
def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _top_level_imports(body: list[ast.stmt]):
    """Import statements run when the module is imported: not in functions, not under ``if TYPE_CHECKING:``."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _top_level_imports(node.body)
            yield from _top_level_imports(node.orelse)
        else:  # class bodies, try / with blocks run at import time
            for field in ("body", "orelse", "finalbody"):
                yield from _top_level_imports(getattr(node, field, []))
            for handler in getattr(node, "handlers", []):
                yield from _top_level_imports(handler.body)


def import_graph() -> dict[str, set[str]]:
    """``module -> lightning_attr modules it imports at module level``: ``from X import y`` is an edge to ``X.y``
    when that is a module, else to ``X``; parent packages imported implicitly are not edges."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for module in MODULES.values():
        for node in _top_level_imports(module.tree.body):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                source = _resolve(module, node)
                submodules = [f"{source}.{alias.name}" for alias in node.names]
                targets = [t if t in MODULES else source for t in submodules]
            graph[module.name] |= {t for t in targets if t in MODULES and t != module.name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle ``[a, b, ..., a]`` per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_in(graph, set(component)) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected ``component`` (breadth-first)."""
    start = min(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return path[::-1] + [start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def test_no_import_cycles() -> None:
    cycles = import_cycles(import_graph())
    assert not cycles, (f"{len(cycles)} module-level import cycle(s); move an import into the function that needs it "
                        "or move the shared code down a layer:\n  " + "\n  ".join(" -> ".join(c) for c in cycles))


def test_checker_finds_what_it_should() -> None:
    """The checks themselves: a long function, a private cross import and a cycle on made-up modules."""
    long_src = "def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
    fake = Module(f"{PACKAGE}.a.b", ROOT / "a" / "b.py", False, ast.parse(long_src))
    assert [hit.split()[1] for hit in long_functions(fake)] == ["f"]
    src = f"from {PACKAGE}.metrics.functional import _x, y\nfrom {PACKAGE}.a.c import _z\nfrom .c import _w\n"
    fake = Module(f"{PACKAGE}.a.b", ROOT / "a" / "b.py", False, ast.parse(src))
    assert [hit.split()[-1] for hit in private_imports(fake)] == [f"{PACKAGE}.metrics.functional._x"]
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert import_cycles(graph) == [["p.a", "p.b", "p.c", "p.a"]]
