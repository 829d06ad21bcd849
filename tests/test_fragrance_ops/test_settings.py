"""Settings: the guide's defaults, environment and file sources, per-run overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from config.kafka import confluent_config, redacted
from config.settings import (
    KafkaSettings,
    Settings,
    describe_invalid_settings,
    run_overrides,
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("FRAGRANCE_OPS_") or name == "KAFKA_BOOTSTRAP_SERVERS":
            monkeypatch.delenv(name)


def test_defaults_are_the_operations_guide_numbers() -> None:
    settings = Settings()
    assert settings.reward.window_size == 1000
    assert settings.kafka.bootstrap_servers is None  # -> the embedded broker


def test_environment_sets_nested_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRAGRANCE_OPS_REWARD__WINDOW_SIZE", "250")
    monkeypatch.setenv("FRAGRANCE_OPS_KAFKA__TOPIC_PREFIX", "prod.")
    settings = Settings()
    assert settings.reward.window_size == 250
    assert settings.kafka.topic_prefix == "prod."


def test_ecosystem_bootstrap_variable_is_honoured_and_ours_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "a:9092")
    assert Settings().kafka.bootstrap_servers == "a:9092"
    monkeypatch.setenv("FRAGRANCE_OPS_KAFKA__BOOTSTRAP_SERVERS", "b:9092")
    assert Settings().kafka.bootstrap_servers == "b:9092"


def test_config_file_is_read_and_environment_overrides_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "ops.toml"
    config.write_text('[reward]\nwindow_size = 300\n[kafka]\ntopic_prefix = "file."\n')
    monkeypatch.setenv("FRAGRANCE_OPS_CONFIG", str(config))
    monkeypatch.setenv("FRAGRANCE_OPS_KAFKA__TOPIC_PREFIX", "env.")
    settings = Settings()
    assert settings.reward.window_size == 300
    assert settings.kafka.topic_prefix == "env."


def test_an_invalid_value_from_the_config_file_is_described_with_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "ops.toml"
    config.write_text("[anomaly]\nloss_spike_ratio = 0.5\n")
    monkeypatch.setenv("FRAGRANCE_OPS_CONFIG", str(config))
    with pytest.raises(ValidationError) as raised:
        Settings()
    described = describe_invalid_settings(raised.value)
    assert "FRAGRANCE_OPS_ANOMALY__LOSS_SPIKE_RATIO (anomaly.loss_spike_ratio)" in described
    assert f"the environment or {config} (FRAGRANCE_OPS_CONFIG)" in described
    assert "0.5" not in described  # the rule, never the value


def test_invalid_values_fail_with_the_setting_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRAGRANCE_OPS_REWARD__WINDOW_SIZE", "0")
    with pytest.raises(ValidationError, match="window_size"):
        Settings()


def test_run_overrides_apply_per_run_only() -> None:
    base = Settings()
    run = run_overrides(base, {"reward.window_size": 50})
    assert run.reward.window_size == 50
    assert base.reward.window_size == 1000


@pytest.mark.parametrize(
    "overrides",
    [
        {"reward.window_size": -1},
        {"reward.nope": 1},
        {"nope.x": 1},
        {"kafka.topic_prefix": "x"},
        {"breaker.open_s": 1.0},  # the deployment's, not a run's
        {"worker.batch_max_events": 1},
    ],
)
def test_bad_run_overrides_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - pydantic's and ours, both ValueErrors
        run_overrides(Settings(), overrides)


def test_security_settings_pass_through_and_secrets_stay_masked() -> None:
    kafka = KafkaSettings(
        bootstrap_servers="k:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="ops",
        sasl_password=SecretStr("hunter2"),
        ssl_cafile=Path("/etc/ca.pem"),
    )
    config = confluent_config(kafka)
    assert config["sasl.password"] == "hunter2"
    assert config["sasl.mechanism"] == "SCRAM-SHA-512"
    assert config["ssl.ca.location"] == "/etc/ca.pem"
    assert "hunter2" not in repr(kafka)
    assert "hunter2" not in str(Settings(kafka=kafka).model_dump(mode="json"))
    assert redacted(config)["sasl.password"] == "***"
