"""Imports flow one way: discovery <- federation <- gateway, dns <- isthmus."""

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
