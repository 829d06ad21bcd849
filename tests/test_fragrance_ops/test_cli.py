"""The command line: the demo (the README's main job), topic creation, settings."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson
import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from fragrance_ops.admin import create_contract_topics
from fragrance_ops.settings import KafkaSettings
from schemas import TOPIC_SPECS, LlmControl, SetEntropyCoef, StepMetric, encode, topic_name
from tests.helpers.kafka import produce_records


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fragrance_ops", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("FRAGRANCE_OPS_") and name != "KAFKA_BOOTSTRAP_SERVERS"
    }
    return env | extra


@pytest.mark.integration
def test_demo_on_the_embedded_broker_normalizes_every_step() -> None:
    result = run_cli("demo", "--steps", "400", "--runs", "2", env=clean_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "embedded broker (Tansu)" in result.stderr
    assert "800 of 800 metrics normalized by the worker" in result.stdout
    assert "step    250" in result.stdout


@pytest.mark.integration
def test_demo_against_a_given_broker(kafka_bootstrap: str, topic_prefix: str) -> None:
    env = clean_env(FRAGRANCE_OPS_KAFKA__TOPIC_PREFIX=topic_prefix)
    result = run_cli("demo", "--steps", "300", "--broker", kafka_bootstrap, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "600 of 600 metrics normalized" in result.stdout


@pytest.mark.integration
def test_topics_create_is_idempotent_and_compacts_where_marked(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    env = clean_env(
        KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
        FRAGRANCE_OPS_KAFKA__TOPIC_PREFIX=topic_prefix,
        FRAGRANCE_OPS_KAFKA__PARTITIONS="3",
    )
    first = run_cli("topics", "create", env=env)
    second = run_cli("topics", "create", env=env)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.count(": created") == len(TOPIC_SPECS)
    assert second.stdout.count(": exists") == len(TOPIC_SPECS)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    metadata = admin.list_topics(timeout=10)
    for spec in TOPIC_SPECS.values():
        name = topic_name(spec.topic, topic_prefix)
        assert len(metadata.topics[name].partitions) == 3
        resource = ConfigResource(ConfigResource.Type.TOPIC, name)
        config = admin.describe_configs([resource])[resource].result()
        assert (config["cleanup.policy"].value == "compact") == spec.compacted, name


def test_settings_command_masks_secrets() -> None:
    env = clean_env(
        FRAGRANCE_OPS_KAFKA__SASL_PASSWORD="hunter2", FRAGRANCE_OPS_REWARD__WINDOW_SIZE="77"
    )
    result = run_cli("settings", env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout
    printed = orjson.loads(result.stdout)
    assert printed["reward"]["window_size"] == 77
    assert printed["kafka"]["sasl_password"] == "**********"


@pytest.mark.integration
def test_status_reports_breakers_and_runs_from_the_topics(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    create_contract_topics(
        KafkaSettings(bootstrap_servers=kafka_bootstrap, topic_prefix=topic_prefix)
    )
    until = 4_102_444_800.0  # 2100: still held when the command runs
    controls = [
        LlmControl(
            model="qwen",
            state="open",
            mode="balanced",
            cache_ttl_s=300.0,
            until=until,
            reason="3 consecutive failures in creative: downshift to balanced",
            ts=1.0,
            epoch=1,
        ),
    ]
    metrics = [
        StepMetric(run_id="run-s", step=step, loss=0.5, reward=1.0, ts=1.0, entropy_coef=0.009)
        for step in range(5)
    ]
    commands = [
        SetEntropyCoef(command_id="c", run_id="run-s", issued_at=1.0, entropy_coef=0.009, step=4)
    ]
    for events in (controls, metrics, commands):
        produce_records(
            kafka_bootstrap,
            topic_name(events[0].TOPIC, topic_prefix),
            [(event.key().encode(), encode(event)) for event in events],
        )
    env = clean_env(
        KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, FRAGRANCE_OPS_KAFKA__TOPIC_PREFIX=topic_prefix
    )
    result = run_cli("status", "--json", env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    status = orjson.loads(result.stdout)
    qwen = status["models"]["qwen"]
    assert (qwen["state"], qwen["mode"], qwen["cache_ttl_s"]) == ("open", "balanced", 300.0)
    assert qwen["recovers_in_s"] > 0
    run = status["runs"]["run-s"]
    assert (run["step"], run["entropy_coef"]) == (4, 0.009)
    assert run["last_command"]["type"] == "set_entropy_coef"
    text = run_cli("status", env=env, timeout=60).stdout
    assert "qwen: open, mode balanced, cache TTL 300s" in text
    assert "run-s: step 4 (attempt 0), entropy_coef 0.009, last command set_entropy_coef" in text
