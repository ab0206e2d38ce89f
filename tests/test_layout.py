"""The package layout stays readable: no import cycles, no private names across modules, a short top level.

The import graph is read from the source with `ast`, not from `sys.modules`, so an import placed inside a
function to dodge a cycle at load time still counts: a cycle held together that way is still a cycle for the
reader. Imports under `if TYPE_CHECKING:` do not count (they never run). Edges:

- `from .x import name` points at `x`, or at the submodule `x.name` when `name` is a module of the package;
- `from ..groups import X` points at the package `groups` (its `__init__.py`), `from ..groups.base import X`
  at `groups.base`;
- `import hf_prune.x.y` points at `hf_prune.x.y`;
- a package `__init__` that calls `import_plugins` (criteria, allocation, groups: every file registers itself)
  points at each of its modules, as it imports them all by name at run time.

A cycle is a strongly connected component of that graph with more than one module (Tarjan, 1972), or a module
that imports itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_prune"
MAX_TOP_LEVEL_MODULES = 15


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted module name → file, for every `.py` under `package_dir` (a package's name is its `__init__.py`)."""
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, *, skip_type_checking: bool):
    """Every `Import`/`ImportFrom` node, at any depth; the bodies of `if TYPE_CHECKING:` left out if asked."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if skip_type_checking and isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _base_module(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` reads from."""
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def import_graph(package_dir: Path, *, skip_type_checking: bool = True) -> dict[str, set[str]]:
    """Module → the package's modules it imports (see the module docstring for how an import resolves)."""
    modules = module_names(package_dir)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _imports(tree, skip_type_checking=skip_type_checking):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _base_module(name, is_package, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            graph[name].update(t for t in targets if t in modules)
        if is_package and _calls_import_plugins(tree):
            graph[name].update(m for m in modules if m.rpartition(".")[0] == name)
    return graph


def _calls_import_plugins(tree: ast.AST) -> bool:
    """Whether the module calls `hf_prune.plugins.import_plugins`, which imports the package's every module."""
    return any(
        isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "import_plugins"
        for node in ast.walk(tree)
    )


def private_imports(package_dir: Path) -> list[str]:
    """`module: from x import _name` for every private (single-underscore, not dunder) name imported from the package.

    Imports under `TYPE_CHECKING` count here too: a private name is private whether or not the import runs.
    """
    modules = module_names(package_dir)
    found = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _imports(tree, skip_type_checking=False):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = _base_module(name, path.name == "__init__.py", node)
            if base not in modules:
                continue
            for alias in node.names:
                dunder = alias.name.startswith("__") and alias.name.endswith("__")
                if alias.name.startswith("_") and not dunder:
                    found.append(f"{name}: from {base} import {alias.name}")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with a cycle in them (Tarjan's algorithm), each sorted, largest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found, key=lambda c: (-len(c), c))


def shortest_cycle_through(graph: dict[str, set[str]], start: str) -> list[str]:
    """The shortest import path from `start` back to itself (breadth first), `[]` when there is none."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if nxt not in parent:
                    parent[nxt] = node
                    following.append(nxt)
        frontier = following
    return []


def describe(graph: dict[str, set[str]], component: list[str]) -> str:
    """The component's modules, and the shortest cycle through each of them (each loop written once)."""
    loops = []
    for member in component:
        loop = shortest_cycle_through(graph, member)
        rotations = {tuple(loop[i:-1] + loop[:i]) for i in range(len(loop) - 1)}
        if not any(tuple(known[:-1]) in rotations for known in loops):
            loops.append(loop)
    lines = ["  " + " -> ".join(loop) for loop in loops]
    return f"{len(component)} modules ({', '.join(component)}):\n" + "\n".join(lines)


# --- the builder, checked on a hand-made package whose graph is known ---


def _write(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_graph_builder_on_a_known_package(tmp_path):
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "from .a import f\n__all__ = ['f']\n",
            # a -> b at module level, b -> a inside a function: one cycle.
            "pkg/a.py": "from .b import g\n\ndef f():\n    return g()\n",
            "pkg/b.py": "def g():\n    from .a import f\n    return f\n",
            # c -> a, b only under TYPE_CHECKING (no edge); c -> sub (its __init__); c -> d by `from . import d`.
            "pkg/c.py": (
                "from typing import TYPE_CHECKING\nimport typing\n"
                "if TYPE_CHECKING:\n    from .a import f\nelse:\n    from . import d\n"
                "if typing.TYPE_CHECKING:\n    from .b import g\n"
                "from .sub import X\nfrom pkg import __version__\n"
            ),
            "pkg/d.py": "import os\nimport pkg.sub.e\n",
            # sub -> sub.e (a private name); sub.e -> c (two levels up, in a method): cycle c -> sub -> sub.e -> c.
            "pkg/sub/__init__.py": "from .e import _hidden as X\n",
            "pkg/sub/e.py": "class K:\n    def m(self):\n        from ..c import X\n\n_hidden = 1\n",
            # A plug-in folder: its __init__ imports every module by name; tools -> plugins.one, not the package.
            "pkg/plugins/__init__.py": (
                "from ..tools import import_plugins\nimport_plugins(__name__, __path__, set())\n"
            ),
            "pkg/plugins/one.py": "from .. import b\n",
            "pkg/plugins/two.py": "",
            "pkg/tools.py": "from .plugins import one\n",
        },
    )
    graph = import_graph(tmp_path / "pkg")
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg.a"},
        "pkg.c": {"pkg.d", "pkg.sub", "pkg"},
        "pkg.d": {"pkg.sub.e"},
        "pkg.sub": {"pkg.sub.e"},
        "pkg.sub.e": {"pkg.c"},
        "pkg.plugins": {"pkg.tools", "pkg.plugins.one", "pkg.plugins.two"},
        "pkg.plugins.one": {"pkg.b"},
        "pkg.plugins.two": set(),
        "pkg.tools": {"pkg.plugins.one"},
    }
    assert cycles(graph) == [["pkg.c", "pkg.d", "pkg.sub", "pkg.sub.e"], ["pkg.a", "pkg.b"]]
    # With the TYPE_CHECKING bodies read, c -> a and c -> b appear (and no new cycle: a, b never reach c).
    assert import_graph(tmp_path / "pkg", skip_type_checking=False)["pkg.c"] == {
        "pkg.a",
        "pkg.b",
        "pkg.d",
        "pkg.sub",
        "pkg",
    }
    # The dunder is fine; the private name is reported once, under TYPE_CHECKING or not.
    assert private_imports(tmp_path / "pkg") == ["pkg.sub: from pkg.sub.e import _hidden"]


def test_cycles_on_a_self_import_and_a_chain():
    assert cycles({"a": {"a"}, "b": {"c"}, "c": set()}) == [["a"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# --- the package itself ---


def test_no_import_cycles():
    graph = import_graph(PACKAGE)
    found = cycles(graph)
    assert not found, "import cycles in hf_prune:\n" + "\n".join(describe(graph, c) for c in found)


def test_no_private_names_across_modules():
    found = private_imports(PACKAGE)
    assert not found, "private names imported across modules (make them public or keep them in one module):\n" + (
        "\n".join(found)
    )


def test_top_level_stays_short():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, f"{len(top)} modules at the top of hf_prune/ (at most 15): {top}"
