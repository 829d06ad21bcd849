"""deploy/grafana: the provisioned datasource and dashboard. The dashboard's PromQL is parsed
by promtool and its metric names are checked against the worker's registry."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_deploy.support import (
    COMPOSE_FILE,
    DASHBOARD,
    GRAFANA,
    exported_sample_names,
    load_yaml,
    metric_family_names,
    metric_names_in,
    run_promtool,
)

ROWS = [
    "Training health per run",
    "Run health",
    "LLM breaker per model",
    "Feedback windows",
    "Operations",
]
# Grafana's variables, replaced by values PromQL accepts before promtool parses a query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$run_id": ".*", "$model": ".*"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


@pytest.fixture(scope="module")
def datasource() -> dict[str, Any]:
    provisioned = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    (only,) = provisioned["datasources"]
    assert isinstance(only, dict)
    return only


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield f"panel {panel['id']} ({panel['title']}) {target['refId']}", target["expr"]


def variable_queries(dashboard: dict[str, Any]) -> list[str]:
    return [variable["definition"] for variable in dashboard["templating"]["list"]]


def test_the_datasource_is_the_compose_prometheus(datasource: dict[str, Any]) -> None:
    assert datasource["type"] == "prometheus"
    assert datasource["uid"]
    assert datasource["url"] == "http://prometheus:9090"
    assert "prometheus" in load_yaml(COMPOSE_FILE)["services"]


def test_the_dashboard_provider_reads_the_directory_compose_mounts() -> None:
    (provider,) = load_yaml(GRAFANA / "provisioning" / "dashboards" / "dashboards.yml")["providers"]
    grafana = load_yaml(COMPOSE_FILE)["services"]["grafana"]
    mounts = {Path(volume.split(":")[1]): volume.split(":")[0] for volume in grafana["volumes"]}
    assert mounts[Path(provider["options"]["path"])] == "./deploy/grafana/dashboards"
    assert mounts[Path("/etc/grafana/provisioning")] == "./deploy/grafana/provisioning"


def test_the_dashboard_is_a_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "fragrance-ops"
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert [p["title"] for p in dashboard["panels"] if p["type"] == "row"] == ROWS
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_every_panel_has_a_place_on_the_grid_and_none_overlap(dashboard: dict[str, Any]) -> None:
    taken: dict[tuple[int, int], int] = {}
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert {"x", "y", "w", "h"} <= grid.keys(), panel["title"]
        assert grid["w"] > 0, panel["title"]
        assert grid["h"] > 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps panel {taken[x, y]}"
                taken[x, y] = panel["id"]


def test_every_query_uses_the_provisioned_datasource(
    dashboard: dict[str, Any], datasource: dict[str, Any]
) -> None:
    expected = {"type": "prometheus", "uid": datasource["uid"]}
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == expected, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == expected, panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"] == expected, variable["name"]


def test_every_query_is_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    # promtool parses the expressions of recording rules: one rule per panel query.
    rules = []
    for number, (where, expr) in enumerate(queries(dashboard)):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{where}: a Grafana variable this test does not know"
        rules.append({"record": f"dashboard:query_{number}", "expr": expr})
    rules_file = tmp_path / "dashboard-queries.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", rules_file)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_the_dashboard_uses_only_metrics_the_worker_exports(dashboard: dict[str, Any]) -> None:
    used = metric_names_in([expr for _, expr in queries(dashboard)] + variable_queries(dashboard))
    unknown = used - exported_sample_names()
    assert not unknown, f"not exported by streams.metrics.WorkerMetrics: {sorted(unknown)}"


def test_the_dashboard_shows_every_metric_the_worker_exports(dashboard: dict[str, Any]) -> None:
    used = metric_names_in(expr for _, expr in queries(dashboard))
    families = {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in used}
    missing = metric_family_names() - families
    assert not missing, f"add a panel to {DASHBOARD.name} for: {sorted(missing)}"
