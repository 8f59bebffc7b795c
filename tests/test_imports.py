"""No import cycle among the modules of src/dtm, counting imports inside functions.

Run by hand: `python tests/test_imports.py` prints the module graph's cycles (none, we hope).
Imports under `if TYPE_CHECKING:` are not counted: they never run.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The dtm modules that `path` imports anywhere (top level or inside functions)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.add(alias.name)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    target = f"{base}.{child.module}" if child.module else base
                else:
                    target = child.module or ""
                found.add(target)
                for alias in child.names:  # `from dtm.training import sft` imports a module
                    found.add(f"{target}.{alias.name}")
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    out = set()
    for name in found:
        # importing a.b.c runs a/__init__ and a.b/__init__ too
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in modules and prefix != me:
                out.add(prefix)
    return out


def import_graph() -> dict[str, set[str]]:
    paths = sorted((SRC / "dtm").rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(10000)

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return out


def _ignore_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's __init__ re-exporting its modules, which import siblings through the package
    (`dtm.training.sft` -> `dtm.training` -> `dtm.training.sft`), is how Python packages work, not a
    cycle between two pieces of code: edges *into* a package's own __init__ from its submodules
    are dropped, every other edge is kept."""
    return {m: {t for t in deps if not (m.startswith(t + ".") and t in graph)} for m, deps in graph.items()}


def test_the_checker_finds_a_cycle(tmp_path, monkeypatch):
    pkg = tmp_path / "dtm"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from dtm.b import g\n")
    (pkg / "b.py").write_text("from dtm import a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dtm import a\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    graph = import_graph()
    assert cycles(_ignore_package_inits(graph)) == [["dtm.a", "dtm.b"]]
    assert graph["dtm.c"] == set()


def test_no_import_cycles():
    found = cycles(_ignore_package_inits(import_graph()))
    assert found == [], "import cycles among dtm modules (imports inside functions count):\n" + "\n".join(" <-> ".join(c) for c in found)


if __name__ == "__main__":
    found = cycles(_ignore_package_inits(import_graph()))
    print("\n".join(" <-> ".join(c) for c in found) or "no import cycles")
    sys.exit(1 if found else 0)
