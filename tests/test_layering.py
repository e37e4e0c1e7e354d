"""Imports flow one way: discovery <- federation <- gateway, dns <- isthmus; and no module
imports itself back through others (no import cycles, whatever the layer)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {
    "discovery": set(),
    "federation": {"discovery"},
    "gateway": {"discovery", "federation"},
    "dns": {"discovery", "federation"},
    "isthmus": {"discovery", "federation", "gateway", "dns"},
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Every first-party module and the first-party modules it imports (anywhere in the file:
    inside functions and `if TYPE_CHECKING:` too). `from a.b import c` is an import of
    `a.b.c` when that is a module, else of `a.b`. Importing a submodule is not counted as an
    import of its parent package (Python runs the parent's `__init__` first, but a package
    that merely contains a module does not depend on it)."""
    paths = [p for pkg in ALLOWED for p in sorted((root / pkg).rglob("*.py"))]
    modules = {module_name(p, root): p for p in paths}

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]  # fmt: skip
            for target in targets:
                found = known(target)
                if found is not None and found != name:
                    edges.add(found)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    found = cycles(module_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_cycle_check_catches_a_cycle(tmp_path: Path) -> None:
    for pkg in ALLOWED:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "gateway" / "a.py").write_text("from gateway.b import x\n")
    (tmp_path / "gateway" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from gateway import a\n"
    )
    (tmp_path / "gateway" / "c.py").write_text("from gateway.a import y\n")
    assert cycles(module_graph(tmp_path)) == [["gateway.a", "gateway.b"]]


def imported_packages(path: Path) -> set[tuple[str, int]]:
    tree = ast.parse(path.read_text(), str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update((a.name.split(".")[0], node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add((node.module.split(".")[0], node.lineno))
    return out


def test_lower_layers_never_import_higher_ones() -> None:
    violations = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for imported, line in imported_packages(path):
                if imported in ALLOWED and imported != package and imported not in allowed:
                    violations.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    assert not violations, "layering violated:\n" + "\n".join(violations)


def test_the_check_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom isthmus.config import Config\n")
    assert ("isthmus", 2) in imported_packages(bad)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_every_layer_is_a_package(package: str) -> None:
    assert (ROOT / package / "__init__.py").is_file()
