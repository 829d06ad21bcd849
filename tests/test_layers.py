"""The packages' layers run one way: the contract (``schemas``), then the configuration
(``config``), then the pure rules (``rules``), then the worker (``streams``) and the SDKs
(``producers``), which never import each other, then the tools (``fragrance_ops``: the CLI,
the demo, ``status``, the brokers, the operator client). A package imports only the layers
under it. Read from the source (every import statement, lazy ones and those under
``TYPE_CHECKING`` included), so a violation fails here before it ships."""

from __future__ import annotations

import ast
import tomllib
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> the repository's packages it may import (itself aside); nothing else of ours.
ALLOWED: dict[str, frozenset[str]] = {
    "schemas": frozenset(),
    "config": frozenset({"schemas"}),
    "rules": frozenset({"schemas", "config"}),
    "streams": frozenset({"schemas", "config", "rules"}),
    "producers": frozenset({"schemas", "config", "rules"}),
    "fragrance_ops": frozenset({"schemas", "config", "rules", "streams", "producers"}),
}
PACKAGES = frozenset(ALLOWED)
# package -> third-party modules it must never import: the rules are plain Python, and the
# SDKs run in trainers and services that have no Faust.
FORBIDDEN_THIRD_PARTY: dict[str, tuple[str, ...]] = {
    "rules": ("faust", "mode", "aiokafka", "confluent_kafka"),
    "producers": ("faust", "mode", "aiokafka"),
}


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in ``path`` names (absolute imports; a relative
    one stays inside its own package)."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


def top_level(module: str) -> str:
    return module.partition(".")[0]


def imports_by_file(package: str, root: Path = ROOT) -> dict[Path, set[str]]:
    return {path: imported_modules(path) for path in sorted((root / package).rglob("*.py"))}


def layer_violations(package: str, root: Path = ROOT) -> list[str]:
    """Each import of ``package`` that reaches one of our packages not under it."""
    allowed = ALLOWED[package] | {package}
    return [
        f"{path.relative_to(root)} imports {module}"
        for path, modules in imports_by_file(package, root).items()
        for module in sorted(modules)
        if top_level(module) in PACKAGES and top_level(module) not in allowed
    ]


def third_party_violations(package: str, root: Path = ROOT) -> list[str]:
    forbidden = FORBIDDEN_THIRD_PARTY.get(package, ())
    return [
        f"{path.relative_to(root)} imports {module}"
        for path, modules in imports_by_file(package, root).items()
        for module in sorted(modules)
        if top_level(module) in forbidden
    ]


def package_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """package -> the other packages of ours its source imports, as found (not as allowed)."""
    graph: dict[str, set[str]] = {}
    for package in sorted(PACKAGES):
        imported = {
            top_level(module)
            for modules in imports_by_file(package, root).values()
            for module in modules
        }
        graph[package] = (imported & PACKAGES) - {package}
    return graph


def import_cycle(graph: dict[str, set[str]]) -> list[str]:
    """A cycle of packages importing each other, or [] when the imports run one way."""
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as error:
        return list(error.args[1])
    return []


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_a_package_imports_only_the_layers_under_it(package: str) -> None:
    assert layer_violations(package) == []


@pytest.mark.parametrize("package", sorted(FORBIDDEN_THIRD_PARTY))
def test_the_rules_and_the_sdks_import_no_worker_library(package: str) -> None:
    assert third_party_violations(package) == []


def test_the_packages_import_each_other_without_a_cycle() -> None:
    graph = package_graph()
    assert import_cycle(graph) == []
    # The check reads real imports: the layers above do use those under them.
    assert graph["fragrance_ops"] >= {"config", "producers", "streams"}
    assert "config" in graph["rules"] & graph["streams"] & graph["producers"]


def test_every_package_of_the_project_has_its_layer() -> None:
    # A new top-level package goes into ALLOWED, or its imports would go unchecked.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    included = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {pattern.rstrip("*") for pattern in included} == PACKAGES
    assert set(pyproject["tool"]["mypy"]["packages"]) == PACKAGES
    assert import_cycle({package: set(below) for package, below in ALLOWED.items()}) == []


def test_the_check_sees_a_lazy_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from streams.app import create_app\n", encoding="utf-8")
    assert imported_modules(module) == {"streams.app"}


@pytest.mark.parametrize(
    ("package", "statement"),
    [
        ("schemas", "from config.settings import Settings"),
        ("config", "import rules.training"),
        ("rules", "from fragrance_ops import cli"),
        ("streams", "from producers.trainer import TrainerClient"),
        ("producers", "import streams.app"),
        ("producers", "from fragrance_ops.operator import OperatorClient"),
    ],
)
def test_the_check_fails_on_an_import_against_the_layers(
    tmp_path: Path, package: str, statement: str
) -> None:
    (tmp_path / package).mkdir()
    (tmp_path / package / "bad.py").write_text(f"{statement}\n", encoding="utf-8")
    found = layer_violations(package, tmp_path)
    assert len(found) == 1
    assert found[0].startswith(f"{package}/bad.py imports ")


def test_the_check_fails_on_a_cycle(tmp_path: Path) -> None:
    for package, statement in [
        ("schemas", ""),
        ("config", "import schemas\n"),
        ("rules", "from config import settings\n"),
        ("streams", "import rules\n"),
        ("producers", "import rules\n"),
        ("fragrance_ops", "import streams\n"),
    ]:
        (tmp_path / package).mkdir()
        (tmp_path / package / "m.py").write_text(statement, encoding="utf-8")
    assert import_cycle(package_graph(tmp_path)) == []
    (tmp_path / "config" / "back.py").write_text(
        "from fragrance_ops import cli\n", encoding="utf-8"
    )
    cycle = import_cycle(package_graph(tmp_path))
    assert {"config", "fragrance_ops"} <= set(cycle)


def test_the_check_fails_on_a_worker_library_in_the_rules(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "bad.py").write_text("import faust\n", encoding="utf-8")
    assert third_party_violations("rules", tmp_path) == ["rules/bad.py imports faust"]
