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
import socket
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
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


SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
Codec = Literal["none", "gzip", "snappy", "lz4", "zstd"]
OutputTopic = Literal["trainer.commands", "llm.control", "trainer.reward-stats", "ops.dead-letter"]
# Output topics read by clients in any language: kafkajs, the most used Node.js client,
# reads gzip and uncompressed batches only (snappy, lz4 and zstd need codec plugins). None
# for all three: at a trainer's rate a batch holds one record, which gzip does not shrink,
# and compressing it cost the worker 17 us of CPU per metric (131 against 148 us, in
# benchmarks/worker_cpu.py); gzip stays a setting for a topic read over a thin link.
CLIENT_READABLE_COMPRESSION: dict[OutputTopic, Codec] = {
    "trainer.commands": "none",
    "llm.control": "none",
    "trainer.reward-stats": "none",
}
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class KafkaSettings(_Group):
    """How every client and the worker reach Kafka. Env: FRAGRANCE_OPS_KAFKA__<NAME>."""

    # Security settings reach every client through config/kafka.py (confluent_config,
    # faust_credentials). Validation errors never echo an input: a bad value next to a
    # password must not print it.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

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
    security_protocol: SecurityProtocol = Field(
        default="PLAINTEXT",
        description="PLAINTEXT, SSL (TLS), SASL_PLAINTEXT or SASL_SSL (SASL over TLS)",
    )
    sasl_mechanism: SaslMechanism | None = Field(
        default=None,
        description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512; None with a SASL protocol: PLAIN",
    )
    sasl_username: str | None = Field(
        default=None, description="SASL user (required with a SASL protocol)"
    )
    sasl_password: SecretStr | None = Field(
        default=None, description="SASL password (required with a SASL protocol; never printed)"
    )
    ssl_cafile: Path | None = Field(
        default=None, description="CA certificates (PEM) to verify the brokers; None: the system's"
    )
    ssl_certfile: Path | None = Field(
        default=None, description="client certificate (PEM), for TLS client authentication"
    )
    ssl_keyfile: Path | None = Field(
        default=None, description="the client certificate's private key (PEM)"
    )
    ssl_key_password: SecretStr | None = Field(
        default=None, description="password of ssl_keyfile, if encrypted (never printed)"
    )

    @field_validator("security_protocol", "sasl_mechanism", mode="before")
    @classmethod
    def _upper_case(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _security_consistent(self) -> Self:
        if self.security_protocol.startswith("SASL_") and (
            not self.sasl_username or self.sasl_password is None
        ):
            raise ValueError(
                f"kafka security_protocol {self.security_protocol} needs sasl_username and "
                "sasl_password"
            )
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError("kafka ssl_keyfile needs ssl_certfile")
        return self


class WorkerSettings(_Group):
    """The Faust worker. Env: FRAGRANCE_OPS_WORKER__<NAME>."""

    app_id: str = Field(
        default="fragrance-ops", description="Faust app id: consumer group and table prefix"
    )
    data_dir: Path = Field(
        default=Path(".fragrance-ops"), description="worker-local data (Faust tables' cache)"
    )
    batch_max_events: int = Field(
        default=5000,
        ge=1,
        description="most records one fetch hands the agents (Faust's "
        "broker_max_poll_records): the batch that amortizes per-batch costs under load",
    )
    batch_within_s: float = Field(
        default=0.1,
        gt=0,
        description="longest the broker holds a fetch for batch_min_bytes to arrive (aiokafka's "
        "fetch_max_wait_ms) while events flow: the most an event waits to be batched with "
        "others (every fetch costs the worker about 1 ms of CPU, whatever it brings). Above a "
        "few hundred events/s batch_min_bytes fills first. Measured trade-off in "
        "docs/benchmarks.md",
    )
    quiet_fetch_wait_s: float = Field(
        default=0.5,
        gt=0,
        description="after a fetch that brought nothing, how long the broker holds the next one, "
        "which it answers at the first record: the first event after a quiet spell is read at "
        "once, and a quiet worker fetches about twice a second instead of once per "
        "batch_within_s (brokers without fetch sessions, FetchRequest v7, keep batch_within_s)",
    )
    batch_min_bytes: int = Field(
        default=4096,
        ge=1,
        description="bytes a fetch waits for (aiokafka's fetch_min_bytes), at most batch_within_s: "
        "about 20 events as the SDKs send them, a batch in about 20 ms at 1,000 events/s",
    )
    output_linger_ms: float = Field(
        default=1.0, ge=0, description="output producer batching delay (librdkafka linger.ms)"
    )
    output_compression: Codec = Field(
        default="lz4",
        description="output compression of the topics output_topic_compression does not "
        "name (dead letters, re-keyed ratings) and of the tables' changelogs",
    )
    output_topic_compression: dict[OutputTopic, Codec] = Field(
        default_factory=lambda: dict(CLIENT_READABLE_COMPRESSION),
        description="compression per output topic (contract names, without the prefix); "
        "entries given are merged over these defaults. The topics other clients read "
        "(commands, llm.control, reward-stats) default to none, which every Kafka client "
        "reads (kafkajs reads only none and gzip without a plugin)",
    )
    output_flush_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="longest a batch waits for its outputs to be acknowledged before the "
        "worker gives up on it and crashes (a restart reprocesses the batch)",
    )
    stall_timeout_s: float | None = Field(
        default=60.0,
        gt=0,
        description="an input partition that fetches no further, or commits no further past "
        "records it fetched, or an agent batch that does not finish, for this long crashes "
        "the worker for its supervisor to restart (known Faust hangs and dropped records); "
        "keep it well above Faust's commit interval (2.8 s); None: no watchdog (needed when "
        "input topics are written with transactions: a final marker looks like a stall)",
    )
    faust_options: dict[str, Any] = Field(
        default_factory=dict,
        description='extra faust.App settings, e.g. {"broker_max_poll_records": 5000}; '
        "they override ours (an escape hatch for tuning, JSON in the environment)",
    )
    changelog_topic_configs: dict[str, str] = Field(
        default_factory=lambda: {
            "segment.bytes": str(8 * 1024 * 1024),
            "min.cleanable.dirty.ratio": "0.1",
        },
        description="topic configs of the tables' changelogs, applied when Faust creates "
        "them: the tables live in memory, so a worker taking a partition reads its "
        "changelog from the start, and compaction (only of closed segments) keeps that read "
        "near one record per key instead of the whole history (joining took 35 s after 10 "
        "minutes of the long rebalance profile with 1 GiB segments)",
    )
    max_event_bytes: int = Field(
        default=256 * 1024, ge=1024, description="larger payloads are dead-lettered"
    )
    finished_run_retention_s: float = Field(
        default=3600.0,
        gt=0,
        description="how long a finished run (TrainerClient.finish()) stays after its last "
        "input (metric, checkpoint, ack, request, rating, announcement), on the worker's "
        "clock; then its state is dropped (tombstones in the tables' changelogs: settings, "
        "reward window, operations, rating window) and so are its per-run metric series. "
        "Late events of the run push the drop back; an event after it starts the run "
        "afresh. Keep it well above Faust's commit interval (2.8 s): the drop waits that "
        "long after the run's last input so that no replay can meet the dropped state",
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
        description="embedded broker only: records per batch of table changelog writes; "
        "Tansu's ListOffsets(LATEST) returns the last batch's first offset + 1, so table "
        "recovery needs one record per batch",
    )

    @field_validator("output_topic_compression", mode="before")
    @classmethod
    def _over_client_readable_defaults(cls, value: object) -> object:
        return {**CLIENT_READABLE_COMPRESSION, **value} if isinstance(value, dict) else value


class RewardSettings(_Group):
    """Reward normalization (guide section 1). Env: FRAGRANCE_OPS_REWARD__<NAME>."""

    window_size: int = Field(
        default=1000, ge=1, le=1_000_000, description="rewards in the sliding window, per run"
    )


LlmModeName = Literal["creative", "balanced", "fast"]


class LlmModeSettings(_Group):
    """What one generation mode sends to an OpenAI-compatible server (producers/llm_openai.py)."""

    model: str | None = Field(
        default=None, min_length=1, description="model id; None: the LlmClient's model"
    )
    temperature: float | None = Field(
        default=None, ge=0, le=2, allow_inf_nan=False, description="None: the server's"
    )
    max_tokens: int | None = Field(default=None, ge=1, description="None: the server's")

    def sampling(self) -> dict[str, Any]:
        """``temperature`` and ``max_tokens`` to send, those set (the rest: the server's)."""
        return self.model_dump(include={"temperature", "max_tokens"}, exclude_none=True)


_DEFAULT_LLM_MODES: dict[str, dict[str, Any]] = {
    "creative": {"temperature": 0.9, "max_tokens": 1024},
    "balanced": {"temperature": 0.7, "max_tokens": 768},
    "fast": {"temperature": 0.3, "max_tokens": 256},
}


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
    control_wait_s: float = Field(
        default=3.0,
        ge=0,
        description="how long a new LLM client waits to read its model's state from "
        "llm.control before serving on its local breaker alone",
    )
    control_grace_s: float = Field(
        default=30.0,
        gt=0,
        description="an LLM client follows a downshift at most this long past its end "
        "without a newer llm.control event, then its local breaker decides (the worker or "
        "Kafka is down); covers clock skew between replica and worker",
    )
    cache_max_entries: int = Field(
        default=10_000, ge=1, description="the LLM client's in-process response cache size"
    )
    llm_modes: dict[LlmModeName, LlmModeSettings] = Field(
        default_factory=lambda: {mode: dict(v) for mode, v in _DEFAULT_LLM_MODES.items()},
        validate_default=True,
        description="the OpenAI-compatible and LiteLLM wrappers: per generation mode, the "
        "model (None: the LlmClient's model; LiteLLM: the model group, None: <model>-<mode>), "
        "temperature and "
        "max_tokens sent; what is left out keeps its default (JSON in the environment, e.g. "
        '{"fast": {"model": "qwen2.5-1.5b-instruct"}})',
    )
    llm_deadline_s: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="an LLM call (or stream) still running this long after it started "
        "counts as the model failing then: async calls are cancelled (DeadlineExceeded), sync "
        "calls are recorded at the deadline and return whenever they return; overridden per "
        "function by wrap(deadline_s=) and per call by LlmClient.deadline(); None: no deadline",
    )

    @field_validator("llm_modes", mode="before")
    @classmethod
    def _every_mode(cls, value: Any) -> Any:
        """A mode left out, or a field of a mode left out, keeps its default."""
        if not isinstance(value, dict):
            return value  # refused by the type
        merged: dict[Any, Any] = {mode: dict(v) for mode, v in _DEFAULT_LLM_MODES.items()}
        for mode, given in value.items():
            default = merged.get(mode)
            merged[mode] = default | given if default and isinstance(given, dict) else given
        return merged


class EntropySettings(_Group):
    """Entropy coefficient schedule (guide section 1). Env: FRAGRANCE_OPS_ENTROPY__<NAME>."""

    start: float = Field(
        default=0.01, ge=0, allow_inf_nan=False, description="coefficient at step 0 (exploration)"
    )
    end: float = Field(
        default=0.001,
        ge=0,
        allow_inf_nan=False,
        description="coefficient from step `steps` on (exploitation); the value holds there",
    )
    steps: int = Field(default=10_000, ge=1, description="steps the decay from start to end takes")
    kind: Literal["cosine", "linear"] = Field(default="cosine", description="decay curve")
    emit_tolerance_rel: float = Field(
        default=0.05,
        ge=0,
        allow_inf_nan=False,
        description="a set_entropy_coef command is sent when the value moved by more than this "
        "fraction of the last value sent (and always at a run's first metric, on a new attempt "
        "and after a retune)",
    )
    min_coef: float = Field(
        default=0.0,
        ge=0,
        allow_inf_nan=False,
        description="lowest coefficient ever sent (bounds a retuned schedule)",
    )
    max_coef: float = Field(
        default=0.1,
        ge=0,
        allow_inf_nan=False,
        description="highest coefficient ever sent (bounds a retuned schedule)",
    )

    @model_validator(mode="after")
    def _schedule_within_bounds(self) -> Self:
        if self.min_coef > self.max_coef:
            raise ValueError("entropy min_coef must not exceed max_coef")
        for name in ("start", "end"):
            if not self.min_coef <= getattr(self, name) <= self.max_coef:
                raise ValueError(f"entropy {name} must lie within [min_coef, max_coef]")
        return self


class AnomalySettings(_Group):
    """Anomaly detection (guide section 2). Env: FRAGRANCE_OPS_ANOMALY__<NAME>."""

    loss_spike_ratio: float = Field(
        default=2.0,
        gt=1,
        allow_inf_nan=False,
        description="a loss at or above this multiple of the baseline loss is an anomaly",
    )
    reward_drop_ratio: float = Field(
        default=0.5,
        ge=0,
        lt=1,
        description="a reward at or below this fraction of the baseline reward is an anomaly",
    )
    baseline: Literal["previous", "ema", "median"] = Field(
        default="previous",
        description="what a step is compared with: the previous normal value (the guide's), "
        "an exponential moving average, or the median of the last normal values",
    )
    ema_alpha: float = Field(
        default=0.1, gt=0, le=1, description="weight of the newest value in the EMA baseline"
    )
    median_window: int = Field(
        default=20, ge=1, le=10_000, description="normal values the median baseline spans"
    )
    spread_factor: float = Field(
        default=10.0,
        ge=0,
        allow_inf_nan=False,
        description="a loss spike must also rise, and a reward drop fall, by at least this many "
        "times the metric's recent spread (its exponentially weighted mean absolute "
        "difference between consecutive normal values): values near zero or of changing sign "
        "(PPO's total loss) are judged by their own noise, not by a ratio of a baseline near "
        "zero; 0: the ratio rules alone",
    )
    spread_alpha: float = Field(
        default=0.05,
        gt=0,
        le=1,
        description="weight of the newest normal value in the recent spread (about "
        "2 / alpha - 1 values)",
    )
    warmup_steps: int = Field(
        default=10,
        ge=0,
        description="steps after a run's first metric (or a rollback) without verdicts on finite "
        "values; the baseline forms meanwhile",
    )
    patience: int = Field(
        default=1, ge=1, description="consecutive anomalous metrics before acting (rolling back)"
    )
    cooldown_steps: int = Field(
        default=100, ge=0, description="steps after a restored checkpoint without acting"
    )


class CheckpointSettings(_Group):
    """Checkpoints, retention and rollback (guide section 2).

    Env: FRAGRANCE_OPS_CHECKPOINTS__<NAME>.
    """

    interval_steps: int = Field(
        default=500, ge=1, description="a checkpoint is saved every N steps"
    )
    keep: int = Field(
        default=5,
        ge=1,
        description="checkpoints kept; older ones are deleted, except the newest healthy one",
    )
    auto_rollback: bool = Field(
        default=True, description="on an anomaly, send a rollback command to the trainer"
    )
    health_lookback_steps: int = Field(
        default=50,
        ge=1,
        description="a checkpoint at step s is healthy when the metrics of (s - N, s] were seen "
        "and none was anomalous",
    )
    max_rollbacks: int = Field(
        default=3,
        ge=0,
        description="rollbacks allowed within rollback_within_steps; one more halts the run",
    )
    rollback_within_steps: int = Field(
        default=2000,
        ge=1,
        description="the span, in steps around an anomaly, in which max_rollbacks counts",
    )
    silent_decision_after_s: float = Field(
        default=60.0,
        gt=0,
        description="an anomaly waiting for the checkpoint its metrics named is decided "
        "without it once the run has sent nothing for this long (a trainer that died after "
        "the anomaly never sends it)",
    )


class BreakerSettings(_Group):
    """LLM circuit breaker, one per model (guide section 3; rules/breaker.py).

    Env: FRAGRANCE_OPS_BREAKER__<NAME>.
    """

    failure_threshold: int = Field(
        default=3,
        ge=1,
        description="trip_on=consecutive: this many consecutive failures in the current mode "
        "open the breaker and step the mode down one (creative -> balanced -> fast)",
    )
    trip_on: Literal["consecutive", "rate"] = Field(
        default="consecutive",
        description="what trips: consecutive failures (the guide's), or the failure rate over "
        "the last rate_window calls",
    )
    rate_window: int = Field(
        default=20, ge=1, le=100_000, description="trip_on=rate: calls the failure rate spans"
    )
    failure_rate: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="trip_on=rate: a failed fraction at or above this trips",
    )
    rate_min_calls: int = Field(
        default=10,
        ge=1,
        description="trip_on=rate: calls in the window before the rate is judged",
    )
    slow_call_ms: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="a successful call slower than this counts as a failure (a streamed "
        "call: slower to its first chunk); None: never",
    )
    open_s: float = Field(
        default=300.0,
        gt=0,
        allow_inf_nan=False,
        description="how long a downshift holds before probing the mode one step up; also "
        "how long a probe round may stay undecided before it is renewed",
    )
    recovery: Literal["probe", "time"] = Field(
        default="probe",
        description="how a downshift ends once open_s has passed: probe (half-open: probe "
        "calls one mode up decide, step by step), or time (the operations guide's: back to "
        "creative with ttl_closed_s at once, with no traffic at all; failures in creative "
        "downshift again)",
    )
    probe_calls: int = Field(
        default=3,
        ge=1,
        description="half-open: probe calls each replica may send in the mode one step up",
    )
    probe_failures_to_reopen: int = Field(
        default=2,
        ge=1,
        description="half-open: probe failures that re-open the breaker and step down one "
        "more; probe_calls - probe_failures_to_reopen + 1 probe successes step up",
    )
    ttl_closed_s: float = Field(
        default=3600.0,
        ge=0,
        allow_inf_nan=False,
        description="response-cache TTL while closed (mode creative)",
    )
    ttl_degraded_s: float = Field(
        default=300.0,
        ge=0,
        allow_inf_nan=False,
        description="response-cache TTL while downshifted (open or half-open)",
    )
    tick_interval_s: float = Field(
        default=0.5,
        gt=0,
        le=60,
        description="how often the worker checks held and probing breakers against its clock "
        "(recovery happens within this much of its due time, with or without traffic)",
    )
    dedupe_window: int = Field(
        default=1024,
        ge=0,
        le=100_000,
        description="recent call ids remembered per model; a repeated outcome is ignored; "
        "0: no deduplication",
    )

    record_exceptions: list[str] = Field(
        default_factory=list,
        description="LLM SDK: exceptions (dotted names, e.g. openai.APIConnectionError) that "
        "count as the model failing; when set, any other exception counts as a success "
        "(resilience4j's recordExceptions). Empty: every exception not ignored counts, and "
        "HTTP 4xx other than 408 and 429 are ignored (producers/llm_failures.py)",
    )
    ignore_exceptions: list[str] = Field(
        default_factory=lambda: ["builtins.ValueError", "builtins.TypeError"],
        description="LLM SDK: exceptions that are the caller's own (neither a failure nor a "
        "success; no outcome is published)",
    )
    models: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per-model values of the settings above, by model name, for the worker's "
        'breaker and the SDK alike, e.g. {"qwen-fragrance": {"open_s": 60, '
        '"failure_threshold": 5}} (JSON in the environment); a model not named, and a '
        "setting not given, takes the values above; tick_interval_s is the worker's, not a "
        "model's",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.probe_failures_to_reopen > self.probe_calls:
            raise ValueError("breaker probe_failures_to_reopen must not exceed probe_calls")
        if self.rate_min_calls > self.rate_window:
            raise ValueError("breaker rate_min_calls must not exceed rate_window")
        for model, values in self.models.items():
            unknown = set(values) - _PER_MODEL_BREAKER
            if unknown:
                raise ValueError(
                    f"breaker models.{model}: {', '.join(sorted(unknown))} cannot be set per model"
                )
            try:
                self.for_model(model)
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(part) for part in e['loc']) or 'settings'}: "
                    + e["msg"].removeprefix("Value error, ")
                    for e in exc.errors()
                )
                raise ValueError(f"breaker models.{model}: {problems}") from None
        return self

    def for_model(self, model: str) -> BreakerSettings:
        """These settings with ``models[model]``'s values, if any."""
        values = self.models.get(model)
        if not values:
            return self
        return BreakerSettings.model_validate(self.model_dump(exclude={"models"}) | values)


_PER_MODEL_BREAKER = frozenset(BreakerSettings.model_fields) - {"models", "tick_interval_s"}


class RetuneSettings(_Group):
    """Feedback retuning from user ratings (guide section 4; rules/retune.py).

    Env: FRAGRANCE_OPS_RETUNE__<NAME>.
    """

    min_window: int = Field(
        default=100,
        ge=2,
        description="counted ratings before a window may close on evidence (the guide's 100)",
    )
    max_window: int = Field(
        default=300,
        ge=2,
        description="a window closes at this many counted ratings, decided or not (the "
        "guide's 300)",
    )
    window_timeout_s: float = Field(
        default=3600.0,
        gt=0,
        allow_inf_nan=False,
        description="wall-clock seconds (the worker's clock) after a window's first rating at "
        "which it closes whatever its size",
    )
    timeout_min_ratings: int = Field(
        default=30,
        ge=2,
        description="a window closed by the timeout with fewer counted ratings proposes "
        "nothing (every rule undecided): the normal-theory intervals mean little below this",
    )
    default_target: str = Field(
        default="default",
        min_length=1,
        max_length=256,
        description="run id that ratings without a run_id are windowed and retuned under",
    )
    confidence: float = Field(
        default=0.99,
        gt=0.5,
        lt=1,
        description="two-sided confidence of the intervals a rule must clear: a rule fires "
        "only when its statistic's interval lies wholly beyond the threshold (0.99 because "
        "a window is checked after every rating from min_window on: at 0.95 a mean exactly "
        "on a threshold fired in about 11% of simulated windows, at 0.99 in 2.5%)",
    )
    confidence_gate: bool = Field(
        default=True,
        description="judge a window by its confidence intervals (a rule fires on evidence); "
        "false: the guide's literal rule, the window's point mean and sample variance "
        "against the thresholds, so every window is decided at min_window counted ratings "
        "(one closed by its timeout with fewer than timeout_min_ratings still proposes "
        "nothing) and a statistic on its threshold's side by chance fires (about half the "
        "windows whose true mean is exactly 3.0 raise entropy_coef)",
    )
    per_user_cap: int = Field(
        default=5,
        ge=1,
        description="ratings of one user counted per window; more are ignored and counted",
    )
    low_mean_threshold: float = Field(
        default=3.0,
        allow_inf_nan=False,
        description="rule 1: mean rating below this raises entropy_coef (more exploration)",
    )
    high_variance_threshold: float = Field(
        default=1.5,
        ge=0,
        allow_inf_nan=False,
        description="rule 2: rating variance (sample, n-1) above this lowers learning_rate "
        "(stability)",
    )
    high_mean_threshold: float = Field(
        default=4.0,
        allow_inf_nan=False,
        description="rule 3: mean rating at or above this lowers clip_epsilon (exploitation)",
    )
    entropy_coef_raise_factor: float = Field(
        default=2.0,
        gt=1,
        allow_inf_nan=False,
        description="rule 1 multiplies the run's entropy_coef by this",
    )
    entropy_coef_max: float = Field(
        default=0.1,
        ge=0,
        allow_inf_nan=False,
        description="rule 1 never proposes an entropy_coef above this",
    )
    learning_rate_lower_factor: float = Field(
        default=0.5,
        gt=0,
        lt=1,
        description="rule 2 multiplies the run's learning_rate by this",
    )
    learning_rate_min: float = Field(
        default=1e-6,
        ge=0,
        allow_inf_nan=False,
        description="rule 2 never proposes a learning_rate below this",
    )
    clip_epsilon_lower_factor: float = Field(
        default=0.8,
        gt=0,
        lt=1,
        description="rule 3 multiplies the run's clip_epsilon by this",
    )
    clip_epsilon_min: float = Field(
        default=0.05,
        ge=0,
        allow_inf_nan=False,
        description="rule 3 never proposes a clip_epsilon below this",
    )
    default_entropy_coef: float = Field(
        default=0.01,
        ge=0,
        allow_inf_nan=False,
        description="the run's entropy_coef when its metrics never reported one",
    )
    default_learning_rate: float = Field(
        default=2e-4,
        ge=0,
        allow_inf_nan=False,
        description="the run's learning_rate when its metrics never reported one",
    )
    default_clip_epsilon: float = Field(
        default=0.2,
        ge=0,
        allow_inf_nan=False,
        description="the run's clip_epsilon when its metrics never reported one",
    )
    tick_interval_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="how often the worker checks open windows against their timeout",
    )
    seen_ratings_max: int = Field(
        default=3000,
        ge=1,
        le=1_000_000,
        description="rating fingerprints remembered per target (across windows) to drop "
        "duplicates; at least max_window",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.min_window > self.max_window:
            raise ValueError("retune min_window must not exceed max_window")
        if self.timeout_min_ratings > self.min_window:
            raise ValueError("retune timeout_min_ratings must not exceed min_window")
        if self.low_mean_threshold > self.high_mean_threshold:
            raise ValueError("retune low_mean_threshold must not exceed high_mean_threshold")
        if self.seen_ratings_max < self.max_window:
            raise ValueError("retune seen_ratings_max must be at least max_window")
        return self


class MetricsSettings(_Group):
    """The worker's HTTP server: Prometheus' /metrics and state on request (/runs, /models).
    Env: FRAGRANCE_OPS_METRICS__<NAME>."""

    port: int | None = Field(
        default=9300,
        ge=0,
        le=65535,
        description="HTTP port of /metrics, /runs and /models (0: any free port, logged at "
        "start; None: off)",
    )
    bind: str = Field(
        default="127.0.0.1",
        description="address the HTTP server listens on (0.0.0.0 in containers, for the "
        "scraper and the other workers)",
    )
    url: str | None = Field(
        default=None,
        description="the URL other workers reach this worker's HTTP server at: they route "
        "state requests for the runs and models it owns there (the pod's address in "
        "Kubernetes). None: http://<bind>:<port>, the host name for a bind of 0.0.0.0 or ::; "
        "with port 0 and no url, requests for its keys cannot be routed to it",
    )
    status_urls: list[str] = Field(
        default_factory=list,
        description="workers `fragrance-ops status` asks first (each answers for its runs and "
        "models and names the others); empty: the local worker, http://127.0.0.1:<port>. "
        "When none answers, status reads the topics",
    )
    max_run_labels: int = Field(
        default=50,
        ge=0,
        description="runs that get their own run_id label on per-run gauges; later runs "
        "share the label value 'other', so the series count stays bounded",
    )
    stale_run_after_s: float = Field(
        default=300.0,
        gt=0,
        description="a run with no metric for longer is reported stale by status, unless it "
        "finished (the RunSilent alert in deploy/prometheus/alerts.yml uses the same 300 s)",
    )
    lag_interval_s: float = Field(
        default=5.0, gt=0, description="how often consumer lag is measured"
    )

    def advertised_url(self) -> str | None:
        """This worker's HTTP server as the other workers reach it (``url``); None when its
        port is not known before it binds (0) or it has none."""
        if self.url is not None:
            return self.url.rstrip("/")
        if not self.port:
            return None
        host = socket.gethostname() if self.bind in ("0.0.0.0", "::", "") else self.bind
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def worker_urls(self) -> list[str]:
        """The workers ``status`` asks first (``status_urls``, else the local worker)."""
        if self.status_urls:
            return [url.rstrip("/") for url in self.status_urls]
        return [f"http://127.0.0.1:{self.port}"] if self.port else []


class SecuritySettings(_Group):
    """Command signing (HMAC-SHA256; schemas/signing.py). Env: FRAGRANCE_OPS_SECURITY__<NAME>.

    The worker and the trainers share the key, nobody else has it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    command_signing_key: SecretStr | None = Field(
        default=None,
        min_length=16,
        description="shared secret (at least 16 characters; 32 random bytes in hex are "
        "right: `python -c 'import secrets; print(secrets.token_hex(32))'`). The worker signs "
        "every command it emits when set; the trainer SDK verifies with it. Never printed",
    )
    require_signed_commands: bool = Field(
        default=False,
        description="trainer SDK: apply only commands signed with command_signing_key; "
        "unsigned or tampered ones are acknowledged rejected with the reason",
    )

    require_signed_requests: bool = Field(
        default=False,
        description="worker: act only on operator requests (ops.requests) signed with "
        "command_signing_key; others are refused with the reason. Whoever can sign a request "
        "can make the worker halt or roll back a run",
    )

    @model_validator(mode="after")
    def _key_when_required(self) -> Self:
        for required in ("require_signed_commands", "require_signed_requests"):
            if getattr(self, required) and self.command_signing_key is None:
                raise ValueError(f"security {required} needs command_signing_key")
        return self


class Settings(BaseSettings):
    """All settings. ``Settings()`` reads the environment and the optional config file."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="ignore",
        frozen=True,
        # Errors name the setting and the rule, never the value: it may sit next to a secret.
        hide_input_in_errors=True,
    )

    kafka: KafkaSettings = KafkaSettings()
    worker: WorkerSettings = WorkerSettings()
    reward: RewardSettings = RewardSettings()
    sdk: SdkSettings = SdkSettings()
    entropy: EntropySettings = EntropySettings()
    anomaly: AnomalySettings = AnomalySettings()
    checkpoints: CheckpointSettings = CheckpointSettings()
    breaker: BreakerSettings = BreakerSettings()
    retune: RetuneSettings = RetuneSettings()
    metrics: MetricsSettings = MetricsSettings()
    security: SecuritySettings = SecuritySettings()

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


# What a trainer's announcement may change: its own run's rules. Connections, signing,
# the worker, the breaker and retuning are the deployment's, not a run's.
PER_RUN_GROUPS = frozenset({"reward", "entropy", "anomaly", "checkpoints"})


def run_overrides(base: Settings, overrides: dict[str, Any]) -> Settings:
    """Apply a run's dotted overrides (``{"reward.window_size": 500}``) to the defaults.

    Raises pydantic.ValidationError (a ValueError) for unknown keys or invalid values.
    """
    nested: dict[str, dict[str, Any]] = {}
    for dotted, value in overrides.items():
        group, _, name = dotted.partition(".")
        if not name or group not in PER_RUN_GROUPS:
            raise ValueError(f"unknown per-run setting {dotted!r}")
        nested.setdefault(group, {})[name] = value
    updates = {
        group: type(getattr(base, group)).model_validate(getattr(base, group).model_dump() | values)
        for group, values in nested.items()
    }
    return base.model_copy(update=updates)


def describe_invalid_settings(error: ValidationError) -> str:
    """What a person reads when the settings do not validate: each setting by its
    environment variable and dotted name, with the rule it broke (never its value)."""
    lines = ["invalid settings:"]
    for problem in error.errors():
        names = [str(part) for part in problem["loc"]]
        rule = problem["msg"].removeprefix("Value error, ")
        if len(names) >= 2:  # one setting: group and name (then an item of a list or dict)
            variable = ENV_PREFIX + "__".join(name.upper() for name in names[:2])
            lines.append(f"  {variable} ({'.'.join(names)}): {rule}")
        else:  # a rule across a group's settings
            lines.append(f"  {'.'.join(names) or 'settings'}: {rule}")
    config_file = os.environ.get(CONFIG_FILE_ENV)
    where = f"the environment or {config_file} ({CONFIG_FILE_ENV})" if config_file else None
    lines.append(
        f"Fix or unset them in {where or 'the environment'}; docs/configuration.md gives "
        "each one's meaning and range."
    )
    return "\n".join(lines)
