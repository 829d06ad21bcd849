"""The packages' layers run one way: the contract (``schemas``) and the configuration
(``config``) under the pure rules (``rules``), the rules under the worker (``streams``) and
the SDKs (``producers``), which never import each other nor the tools (``fragrance_ops``).
Read from the source (every import statement, lazy ones included), so a violation fails
here before it ships."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> top-level modules (or dotted prefixes) it must never import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "schemas": ("config", "rules", "streams", "producers", "fragrance_ops"),
    "config": ("rules", "streams", "producers", "fragrance_ops"),
    "rules": (
        "streams",
        "producers",
        "fragrance_ops",
        "faust",
        "mode",
        "aiokafka",
        "confluent_kafka",
    ),
    "streams": ("producers", "fragrance_ops"),
    "producers": ("streams", "fragrance_ops", "faust", "mode", "aiokafka"),
}


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in ``path`` names (absolute imports)."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


def violations(package: str, forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for module in sorted(imported_modules(path)):
            if any(module == name or module.startswith(f"{name}.") for name in forbidden):
                found.append(f"{path.relative_to(ROOT)} imports {module}")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_nothing_above_or_beside_it(package: str) -> None:
    assert violations(package, FORBIDDEN[package]) == []


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from streams.app import create_app\n", encoding="utf-8")
    assert imported_modules(module) == {"streams.app"}
