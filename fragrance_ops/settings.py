"""Every setting of fragrance-ops, its default and its environment variable, in one place.

Sources, highest priority first:
  1. keyword arguments to ``Settings(...)``
  2. environment: ``FRAGRANCE_OPS_<GROUP>__<NAME>`` (e.g. ``FRAGRANCE_OPS_REWARD__WINDOW_SIZE``),
     plus the ecosystem's ``KAFKA_BOOTSTRAP_SERVERS`` for ``kafka.bootstrap_servers``
  3. a TOML file named by ``FRAGRANCE_OPS_CONFIG`` (tables ``[kafka]``, ``[reward]``, ...)
  4. the defaults below (the operations guide's numbers)

Per-run overrides travel on ``trainer.runs`` as ``{"reward.window_size": 500, ...}`` and are
validated against the same models (see ``run_overrides``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "FRAGRANCE_OPS_"
CONFIG_FILE_ENV = "FRAGRANCE_OPS_CONFIG"


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaSettings(_Group):
    """How every client and the worker reach Kafka. Env: FRAGRANCE_OPS_KAFKA__<NAME>."""

    bootstrap_servers: str | None = Field(
        default=None,
        description="host:port list; also read from KAFKA_BOOTSTRAP_SERVERS. "
        "None means: start the embedded broker (Tansu).",
    )
    embedded_broker: bool = Field(
        default=False,
        description="the broker is the embedded Tansu: enables its workarounds (set by the CLI)",
    )
    topic_prefix: str = Field(default="", description="prepended to every contract topic name")
    partitions: int = Field(default=8, ge=1, description="partitions per topic at creation")
    replication_factor: int = Field(default=1, ge=1, description="replicas per topic at creation")
    security_protocol: str = Field(
        default="PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"
    )
    sasl_mechanism: str | None = Field(
        default=None, description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"
    )
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_key_password: SecretStr | None = None


class WorkerSettings(_Group):
    """The Faust worker. Env: FRAGRANCE_OPS_WORKER__<NAME>."""

    app_id: str = Field(
        default="fragrance-ops", description="Faust app id: consumer group and table prefix"
    )
    data_dir: Path = Field(
        default=Path(".fragrance-ops"), description="worker-local data (Faust tables' cache)"
    )
    batch_max_events: int = Field(
        default=2000, ge=1, description="events an agent takes per batch (amortizes per-event cost)"
    )
    batch_within_s: float = Field(
        default=0.02, gt=0, description="longest a partial batch waits before it is processed"
    )
    output_linger_ms: float = Field(
        default=5.0, ge=0, description="output producer batching delay (librdkafka linger.ms)"
    )
    output_compression: str = Field(default="lz4", description="output producer compression")
    output_flush_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="longest a batch waits for its outputs to be acknowledged before the "
        "worker gives up on it and crashes (a restart reprocesses the batch)",
    )
    faust_options: dict[str, Any] = Field(
        default_factory=dict,
        description="extra faust.App settings, e.g. {\"broker_max_poll_records\": 5000}; "
        "they override ours (an escape hatch for tuning, JSON in the environment)",
    )
    max_event_bytes: int = Field(
        default=256 * 1024, ge=1024, description="larger payloads are dead-lettered"
    )
    session_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="consumer group session timeout: how soon a dead worker's partitions move",
    )
    heartbeat_interval_s: float = Field(default=1.0, gt=0, description="group heartbeat interval")
    web_port: int | None = Field(
        default=None, ge=1, le=65535, description="Faust's web server port; None: disabled"
    )
    embedded_producer_max_batch_size: int = Field(
        default=1,
        ge=1,
        description="embedded broker only: Tansu's ListOffsets(LATEST) returns the last batch's "
        "first offset + 1, so table recovery needs one record per batch",
    )


class RewardSettings(_Group):
    """Reward normalization (guide section 1). Env: FRAGRANCE_OPS_REWARD__<NAME>."""

    window_size: int = Field(
        default=1000, ge=1, le=1_000_000, description="rewards in the sliding window, per run"
    )


class SdkSettings(_Group):
    """Client SDK behaviour. Env: FRAGRANCE_OPS_SDK__<NAME>."""

    queue_max_messages: int = Field(
        default=100_000,
        ge=1,
        description="events buffered while Kafka is unreachable; beyond this they are dropped "
        "and counted, never blocking the caller",
    )
    linger_ms: float = Field(default=5.0, ge=0, description="producer batching delay")
    compression: str = Field(default="lz4", description="producer compression codec")
    close_timeout_s: float = Field(
        default=10.0, ge=0, description="how long close() waits to flush"
    )


class Settings(BaseSettings):
    """All settings. ``Settings()`` reads the environment and the optional config file."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="ignore",
        frozen=True,
    )

    kafka: KafkaSettings = KafkaSettings()
    worker: WorkerSettings = WorkerSettings()
    reward: RewardSettings = RewardSettings()
    sdk: SdkSettings = SdkSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_FILE_ENV)
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)

    def model_post_init(self, __context: Any) -> None:
        # KAFKA_BOOTSTRAP_SERVERS is the ecosystem's name; ours wins when both are set.
        ecosystem = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if ecosystem and self.kafka.bootstrap_servers is None:
            object.__setattr__(
                self, "kafka", self.kafka.model_copy(update={"bootstrap_servers": ecosystem})
            )


def run_overrides(base: Settings, overrides: dict[str, Any]) -> Settings:
    """Apply a run's dotted overrides (``{"reward.window_size": 500}``) to the defaults.

    Raises pydantic.ValidationError (a ValueError) for unknown keys or invalid values.
    """
    nested: dict[str, dict[str, Any]] = {}
    for dotted, value in overrides.items():
        group, _, name = dotted.partition(".")
        if not name or group not in Settings.model_fields or group == "kafka":
            raise ValueError(f"unknown per-run setting {dotted!r}")
        nested.setdefault(group, {})[name] = value
    updates = {
        group: type(getattr(base, group)).model_validate(
            getattr(base, group).model_dump() | values
        )
        for group, values in nested.items()
    }
    return base.model_copy(update=updates)
