"""deploy/docker/Dockerfile, parsed with BuildKit's parser (the `dockerfile` package).
Validated only: there is no Docker engine here to build it."""

from __future__ import annotations

import tomllib

import dockerfile
import pytest

from tests.test_deploy.support import DOCKERFILE, ROOT

BASE = "python:3.11-slim"
METRICS_PORT = "9300"


@pytest.fixture(scope="module")
def instructions() -> tuple[dockerfile.Command, ...]:
    return dockerfile.parse_file(str(DOCKERFILE))


def final_stage(instructions: tuple[dockerfile.Command, ...]) -> list[dockerfile.Command]:
    starts = [i for i, command in enumerate(instructions) if command.cmd == "FROM"]
    return list(instructions[starts[-1] :])


def test_every_stage_is_python_3_11_slim(instructions: tuple[dockerfile.Command, ...]) -> None:
    stages = [command.value[0] for command in instructions if command.cmd == "FROM"]
    assert stages
    assert set(stages) == {BASE}


def test_the_worker_runs_as_a_numeric_non_root_user(
    instructions: tuple[dockerfile.Command, ...],
) -> None:
    users = [command.value[0] for command in final_stage(instructions) if command.cmd == "USER"]
    assert users, "no USER in the final stage: the worker would run as root"
    user, _, group = users[-1].partition(":")
    # Numeric, so Kubernetes' runAsNonRoot can verify it (deploy/k8s runs as 10001).
    assert user.isdigit(), user
    assert int(user) != 0
    assert group.isdigit(), group
    assert int(group) != 0


def test_it_exposes_the_metrics_port_and_serves_on_every_interface(
    instructions: tuple[dockerfile.Command, ...],
) -> None:
    stage = final_stage(instructions)
    exposed = [port for command in stage if command.cmd == "EXPOSE" for port in command.value]
    assert exposed == [METRICS_PORT]
    env: dict[str, str] = {}
    for command in stage:
        if command.cmd == "ENV":
            env.update(zip(command.value[::2], command.value[1::2], strict=True))
    assert env["FRAGRANCE_OPS_METRICS__BIND"] == "0.0.0.0"
    assert env["FRAGRANCE_OPS_METRICS__PORT"] == METRICS_PORT
    (healthcheck,) = [command for command in stage if command.cmd == "HEALTHCHECK"]
    assert healthcheck.json
    assert healthcheck.value[0] == "CMD"
    assert "FRAGRANCE_OPS_METRICS__PORT" in healthcheck.value[-1]


def test_the_command_is_the_worker(instructions: tuple[dockerfile.Command, ...]) -> None:
    (cmd,) = [command for command in final_stage(instructions) if command.cmd == "CMD"]
    assert cmd.json, "exec form, so the worker is PID 1 and gets SIGTERM"
    assert cmd.value == ("fragrance-ops", "worker")


def test_the_build_copies_every_package_and_installs_the_worker_extra(
    instructions: tuple[dockerfile.Command, ...],
) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {
        pattern.rstrip("*")
        for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    copied = {
        source.rstrip("/")
        for command in instructions
        if command.cmd == "COPY" and not command.flags
        for source in command.value[:-1]
    }
    assert packages | {"pyproject.toml", pyproject["project"]["readme"]} <= copied
    runs = " ".join(" ".join(command.value) for command in instructions if command.cmd == "RUN")
    assert 'pip install ".[worker]"' in runs


def test_the_build_context_leaves_out_local_state() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", "deploy/kafka/target", ".git", "**/__pycache__"} <= ignored
    assert {".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis"} <= ignored
