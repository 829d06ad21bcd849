"""deploy/prometheus: the scrape configuration and the alert rules, checked and unit-tested
by promtool (the Debian package 'prometheus'), and their metric names against the worker's."""

from __future__ import annotations

from typing import Any

from tests.test_deploy.support import (
    PROMETHEUS,
    exported_sample_names,
    load_yaml,
    metric_names_in,
    run_promtool,
)

ALERTS = {
    "RollbackStorm",
    "RunHalted",
    "RunSilent",
    "BreakerOpenTooLong",
    "ConsumerLagGrowing",
    "DeadLetters",
    "CommandsRefusedForSignature",
}


def alert_rules() -> list[dict[str, Any]]:
    groups = load_yaml(PROMETHEUS / "alerts.yml")["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_check_config() -> None:
    result = run_promtool("check", "config", PROMETHEUS / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", PROMETHEUS / "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_promtool_rule_unit_tests_pass() -> None:
    result = run_promtool("test", "rules", PROMETHEUS / "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_severity_a_summary_and_a_description() -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} == ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]


def test_every_alert_is_unit_tested_both_firing_and_quiet() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(PROMETHEUS / "alerts.test.yml")["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == ALERTS
    assert quiet == ALERTS


def test_alerts_use_only_metrics_the_worker_exports() -> None:
    used = metric_names_in(rule["expr"] for rule in alert_rules())
    assert len(used) >= 4
    unknown = used - exported_sample_names()
    assert not unknown, f"not exported by streams.metrics.WorkerMetrics: {sorted(unknown)}"
