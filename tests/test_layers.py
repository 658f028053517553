"""The packages' layers: the shared kernel imports no service, the services import no other service, and
nothing in production imports test support."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = (
    "events",
    "servicekit",
    "command_api",
    "projector",
    "realtime_fanout",
    "devstack",
    "tests",
    "benchmarks",
)
MAY_IMPORT = {
    "events": set(),
    "servicekit": {"events"},
    "command_api": {"events", "servicekit"},
    "projector": {"events", "servicekit"},
    "realtime_fanout": {"events", "servicekit"},
    "devstack": {"servicekit", "command_api", "projector", "realtime_fanout"},
}


def imported_packages(path: Path) -> set[str]:
    """The project packages `path` imports (absolute imports only; the project uses no relative ones)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(PROJECT)


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_a_package_imports_only_the_layers_below_it(package: str) -> None:
    wrong = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) - MAY_IMPORT[package] - {package})
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert {path: names for path, names in wrong.items() if names} == {}
