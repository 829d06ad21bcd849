"""Shared helpers for the deploy/ tests: paths, YAML, settings names, metric names, promtool."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from config.settings import CONFIG_FILE_ENV, ENV_PREFIX, Settings
from streams.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "fragrance-ops.json"
K8S = DEPLOY / "k8s"

METRIC_NAME = re.compile(r"fragrance_ops_[a-z_]+")
ECOSYSTEM_ENV = {"KAFKA_BOOTSTRAP_SERVERS": ("kafka", "bootstrap_servers")}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


# Settings: environment variable names -> fields of config.settings.Settings.


def setting_for_env(name: str) -> tuple[str, str]:
    """The (group, field) that ``FRAGRANCE_OPS_<GROUP>__<NAME>`` sets; AssertionError if none."""
    if name in ECOSYSTEM_ENV:
        return ECOSYSTEM_ENV[name]
    assert name.startswith(ENV_PREFIX), f"{name} is not a fragrance-ops setting"
    assert name == name.upper(), f"{name}: settings variables are written in upper case"
    group, sep, field = name[len(ENV_PREFIX) :].lower().partition("__")
    assert sep, f"{name} is not FRAGRANCE_OPS_<GROUP>__<NAME>"
    assert field, f"{name} is not FRAGRANCE_OPS_<GROUP>__<NAME>"
    assert group in Settings.model_fields, f"{name}: no settings group {group!r}"
    model = Settings.model_fields[group].annotation
    assert isinstance(model, type)
    assert issubclass(model, BaseModel)
    assert field in model.model_fields, f"{name}: settings group {group!r} has no {field!r}"
    return group, field


def settings_env(env: Mapping[str, str]) -> dict[str, str]:
    """The variables of ``env`` that configure fragrance-ops (each checked to be a setting)."""
    ours = {
        name: str(value)
        for name, value in env.items()
        if name.startswith(ENV_PREFIX) or name in ECOSYSTEM_ENV
    }
    for name in ours:
        setting_for_env(name)
    return ours


def settings_from_env(monkeypatch: pytest.MonkeyPatch, env: Mapping[str, str]) -> Settings:
    """``Settings()`` as a process with exactly these settings variables would build it."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX) or name in ECOSYSTEM_ENV or name == CONFIG_FILE_ENV:
            monkeypatch.delenv(name)
    for name, value in settings_env(env).items():
        monkeypatch.setenv(name, value)
    return Settings()


# Metric names.


def exported_sample_names() -> set[str]:
    """Every sample name the worker's registry can export.

    A labelled metric has no samples until its first label set is used, so the names are
    derived from each family's type as prometheus_client exports it: counters ``_total`` and
    ``_created``, histograms ``_bucket``, ``_count``, ``_sum`` and ``_created``.
    """
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
    }
    names: set[str] = set()
    for family in WorkerMetrics().registry.collect():
        derived = {family.name + suffix for suffix in suffixes[family.type]}
        assert {sample.name for sample in family.samples} <= derived, family
        names |= derived
    return names


def metric_family_names() -> set[str]:
    return {family.name for family in WorkerMetrics().registry.collect()}


def metric_names_in(expressions: Iterable[str]) -> set[str]:
    return {name for expr in expressions for name in METRIC_NAME.findall(expr)}


# promtool.


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian package 'prometheus'; .ci/run installs it)")
    return path


def run_promtool(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
