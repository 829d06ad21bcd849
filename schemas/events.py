"""Event contract v1: one pydantic model per event type.

Wire format: a JSON object encoded with orjson. Decoding is strict (no type coercion,
ranges checked, required fields required) and tolerant of unknown extra fields, so a
producer may add fields before consumers know them.

Numbers that must be finite are finite. Training metric values (loss, reward, ...) may
legitimately be non-finite on a diverging run, and JSON has no literal for that, so they
travel as a number or one of the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal

import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    Tag,
    WithJsonSchema,
    model_validator,
)

from schemas.topics import Topic

NON_FINITE_MARKERS: dict[str, float] = {
    "NaN": math.nan,
    "Infinity": math.inf,
    "-Infinity": -math.inf,
}


def _marker_to_float(value: object) -> object:
    if isinstance(value, str) and value in NON_FINITE_MARKERS:
        return NON_FINITE_MARKERS[value]
    return value


def float_to_wire(value: float) -> float | str:
    """A float as it travels in JSON: itself, or its non-finite string marker."""
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


MetricValue = Annotated[
    float,
    Field(allow_inf_nan=True),
    BeforeValidator(_marker_to_float),
    PlainSerializer(float_to_wire),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number"},
                {"enum": list(NON_FINITE_MARKERS)},
            ],
            "description": "a number, or a string marker for a non-finite value",
        }
    ),
]
"""A training metric: finite number, or NaN/Infinity/-Infinity as a string marker."""

Identifier = Annotated[str, Field(min_length=1, max_length=256)]
Algorithm = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
DEFAULT_ALGORITHM = "ppo"
"""What a run announced without an algorithm trains with (the platform's trainers are PPO)."""
Timestamp = Annotated[
    float,
    Field(
        ge=0,
        le=1e11,  # year 5138: a timestamp in milliseconds (a common producer bug) is refused
        description="seconds since the Unix epoch, UTC",
    ),
]
STEP_MAX = 2**63 - 1
"""Steps and attempts are signed 64-bit integers (Kafka's and Java's long; the worker's
state packs them so): a larger number is refused at decoding, never fails a batch later."""
Step = Annotated[int, Field(ge=0, le=STEP_MAX)]
NonNegative = Annotated[float, Field(ge=0)]
LlmMode = Literal["creative", "balanced", "fast"]
BreakerState = Literal["closed", "open", "half_open"]
SettingValue = bool | int | float | str


class Event(BaseModel):
    """Base of every contract event: strict, finite by default, extras ignored."""

    model_config = ConfigDict(
        strict=True,
        extra="ignore",
        allow_inf_nan=False,
        frozen=True,
    )
    TOPIC: ClassVar[Topic]

    def key(self) -> str:
        """The partitioning key the contract assigns to this event."""
        raise NotImplementedError


class RunAnnounced(Event):
    """A run starts or resumes; its settings override defaults for this run only."""

    TOPIC: ClassVar[Topic] = Topic.RUNS
    run_id: Identifier
    ts: Timestamp
    settings: dict[str, SettingValue] = Field(
        description="per-run overrides, keys as dotted setting paths (e.g. reward.window_size)"
    )
    algorithm: Algorithm = Field(
        default=DEFAULT_ALGORITHM,
        description="the RL algorithm training the run (lower case, e.g. ppo, a2c, grpo): "
        "the algorithm label of the run's metrics",
    )

    def key(self) -> str:
        return self.run_id


class RunFinished(Event):
    """The trainer ended the run (``TrainerClient.finish()``). The worker keeps the run's
    state for ``worker.finished_run_retention_s`` after the run's last input, then drops
    it; announcing the run again before that resumes it."""

    TOPIC: ClassVar[Topic] = Topic.RUNS
    type: Literal["finished"] = Field(
        description="required: what tells a finish from an announcement on trainer.runs "
        "(an announcement has no type)"
    )
    run_id: Identifier
    ts: Timestamp
    attempt: Step = Field(
        default=0, description="the attempt of the run's last metric (as in trainer.metrics)"
    )
    step: Step | None = Field(
        default=None,
        description="the step of the run's last metric, null if it sent none: the worker "
        "reads the run's metrics up to it (another topic, maybe read behind the finish) "
        "before the retention starts",
    )

    def key(self) -> str:
        return self.run_id


def _run_event_kind(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    if kind is None:
        return "announced"
    return kind if kind == "finished" else None


RunEvent = Annotated[
    Annotated[RunAnnounced, Tag("announced")] | Annotated[RunFinished, Tag("finished")],
    Discriminator(_run_event_kind),
]
"""What ``trainer.runs`` carries: an announcement (no ``type``) or a finish (``type`` finished)."""


class StepMetric(Event):
    """One training step's metrics, as the trainer measured them."""

    TOPIC: ClassVar[Topic] = Topic.METRICS
    run_id: Identifier
    step: Step
    loss: MetricValue
    reward: MetricValue
    ts: Timestamp
    attempt: Step = Field(
        default=0,
        description="how many times the run was rolled back or resumed; orders replays of a step",
    )
    policy_loss: MetricValue | None = None
    value_loss: MetricValue | None = None
    entropy: MetricValue | None = None
    checkpoint_step: Step | None = Field(
        default=None,
        description="the newest checkpoint the trainer saved so far: the stream waits for "
        "its announcement (another topic) before choosing a rollback target",
    )
    learning_rate: NonNegative | None = None
    clip_epsilon: NonNegative | None = None
    entropy_coef: NonNegative | None = None

    def key(self) -> str:
        return self.run_id


class CheckpointSaved(Event):
    """A checkpoint the trainer saved; ``(attempt, step)`` orders announcements, not ``ts``."""

    TOPIC: ClassVar[Topic] = Topic.CHECKPOINTS
    run_id: Identifier
    step: Step
    uri: Annotated[str, Field(min_length=1, max_length=4096)]
    ts: Timestamp
    attempt: Step = Field(
        default=0,
        description="the attempt that saved it (as in trainer.metrics): a checkpoint of an "
        "older attempt past a rollback's or resume's branch point is never a target",
    )

    def key(self) -> str:
        return self.run_id


class RewardStats(Event):
    """The window statistics after one metric's reward entered the run's window."""

    TOPIC: ClassVar[Topic] = Topic.REWARD_STATS
    run_id: Identifier
    step: Step
    reward: float
    normalized_reward: float
    mean: float
    std: NonNegative
    count: Annotated[int, Field(ge=1)]
    ts: Timestamp

    def key(self) -> str:
        return self.run_id

    @staticmethod
    def encode_unchecked(
        *,
        run_id: str,
        step: int,
        reward: float,
        normalized_reward: float,
        mean: float,
        std: float,
        count: int,
        ts: float,
    ) -> bytes:
        """``encode(RewardStats(...))`` without validating: the worker's own statistics, valid
        by construction, one per metric (the model costs ten times as much per record)."""
        return orjson.dumps(
            {
                "run_id": run_id,
                "step": step,
                "reward": reward,
                "normalized_reward": normalized_reward,
                "mean": mean,
                "std": std,
                "count": count,
                "ts": ts,
            }
        )


class CommandBase(Event):
    """Fields every command carries; ``type`` names the command."""

    TOPIC: ClassVar[Topic] = Topic.COMMANDS
    command_id: Identifier
    run_id: Identifier
    issued_at: Timestamp

    def key(self) -> str:
        return self.run_id


class SetEntropyCoef(CommandBase):
    type: Literal["set_entropy_coef"] = "set_entropy_coef"
    entropy_coef: NonNegative
    step: Step


class Rollback(CommandBase):
    type: Literal["rollback"] = "rollback"
    checkpoint_step: Step
    checkpoint_uri: Annotated[str, Field(min_length=1, max_length=4096)]
    anomaly_step: Step
    reason: str
    values: dict[str, MetricValue] = Field(default_factory=dict)


RetunableName = Literal["entropy_coef", "learning_rate", "clip_epsilon"]
CommandType = Literal["set_entropy_coef", "rollback", "retune", "halt", "prune_checkpoints"]
"""The command types' names (``typing.get_args``): the ``type`` of each of ``COMMAND_TYPES``."""


class Retune(CommandBase):
    type: Literal["retune"] = "retune"
    changes: dict[RetunableName, Annotated[float, Field(gt=0)]] = Field(
        description="new values of the run's hyperparameters (positive, finite)"
    )
    rationale: str
    window: dict[str, Any]


class Halt(CommandBase):
    type: Literal["halt"] = "halt"
    reason: str
    history: list[dict[str, Any]] = Field(default_factory=list)


class PruneCheckpoints(CommandBase):
    """Delete these checkpoints; the stream keeps the newest ones and the newest healthy one."""

    type: Literal["prune_checkpoints"] = "prune_checkpoints"
    steps: list[Step]
    uris: list[str]
    protected_step: Step | None = Field(
        default=None, description="the newest healthy checkpoint, never pruned"
    )


Command = Annotated[
    SetEntropyCoef | Rollback | Retune | Halt | PruneCheckpoints,
    Field(discriminator="type"),
]
COMMAND_TYPES: tuple[type[CommandBase], ...] = (
    SetEntropyCoef,
    Rollback,
    Retune,
    Halt,
    PruneCheckpoints,
)


class CommandAck(Event):
    TOPIC: ClassVar[Topic] = Topic.ACKS
    command_id: Identifier
    run_id: Identifier
    status: Literal["applied", "rejected"]
    detail: str
    ts: Timestamp
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    command_type: CommandType | None = Field(
        default=None,
        description="the acknowledged command's type; the stream composes an applied "
        "retune's entropy_coef with the schedule",
    )

    def key(self) -> str:
        return self.run_id


class LlmOutcome(Event):
    TOPIC: ClassVar[Topic] = Topic.LLM_OUTCOMES
    model: Identifier
    ok: bool
    mode: LlmMode
    latency_ms: NonNegative
    # Defaults to None: the encoder omits nulls, so a successful call's error travels absent.
    error: str | None = Field(
        default=None, description="why the call failed; null or absent exactly when ok"
    )
    ts: Timestamp
    call_id: Identifier | None = Field(
        default=None, description="set by the SDK, lets the stream drop duplicates"
    )
    first_token_ms: NonNegative | None = Field(
        default=None,
        description="a streamed call: time to its first chunk (latency_ms is then the whole "
        "stream's); null or absent for a call that is not streamed or failed before a chunk",
    )

    def response_ms(self) -> float:
        """The latency the breaker judges (``slow_call_ms``): a stream's time to first
        chunk, since its total depends on the answer's length and its reader; else the call's.
        """
        return self.latency_ms if self.first_token_ms is None else self.first_token_ms

    @model_validator(mode="after")
    def _error_iff_failed(self) -> LlmOutcome:
        if self.ok and self.error is not None:
            raise ValueError("error must be null when ok is true")
        if not self.ok and not self.error:
            raise ValueError("error must be a non-empty string when ok is false")
        return self

    def key(self) -> str:
        return self.model


class LlmControl(Event):
    TOPIC: ClassVar[Topic] = Topic.LLM_CONTROL
    model: Identifier
    state: BreakerState
    mode: LlmMode
    cache_ttl_s: NonNegative
    # Defaults to None: the encoder omits nulls, so a closed breaker's until travels absent.
    until: Timestamp | None = Field(
        default=None,
        description="open: when probing starts; half_open: when an undecided probe round is "
        "renewed; null or absent when closed",
    )
    reason: str
    ts: Timestamp
    probe_mode: LlmMode | None = Field(
        default=None, description="half_open only: the mode probe calls are sent in"
    )
    probe_calls: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="half_open only: probe calls each replica may send"
    )
    epoch: Annotated[int, Field(ge=0)] = Field(
        default=0,
        description="increments with each state change of the model; lets replicas ignore "
        "stale control events",
    )

    def key(self) -> str:
        return self.model


class Rating(Event):
    TOPIC: ClassVar[Topic] = Topic.RATINGS
    rating: Annotated[float, Field(ge=1, le=5)]
    user_id: Identifier
    formula_id: Identifier
    ts: Timestamp
    run_id: Identifier | None = None
    rating_id: Identifier | None = Field(
        default=None,
        description="set by the rating SDK, unique per rating: lets the stream drop duplicates",
    )

    def key(self) -> str:
        return self.run_id if self.run_id is not None else self.formula_id


class DeadLetter(Event):
    """A rejected input, with its original bytes (base64) so nothing is lost."""

    TOPIC: ClassVar[Topic] = Topic.DEAD_LETTER
    source_topic: str
    partition: Annotated[int, Field(ge=0)]
    offset: Annotated[int, Field(ge=0)]
    error: str
    field: str | None = None
    payload: str = Field(description="the original value bytes, base64 (RFC 4648)")
    payload_encoding: Literal["base64"] = "base64"
    original_key: str | None = Field(
        default=None, description="the original key bytes, base64, or null"
    )
    ts: Timestamp

    def key(self) -> str:
        # The record key on the wire is the original key's raw bytes; see streams.dead_letter.
        raise TypeError("dead letters are keyed by the original raw key bytes")


OperatorAction = Literal["resume", "halt", "rollback", "set_entropy"]


class OperatorRequest(Event):
    """A person asks the worker to act on a run; the worker validates it against what it
    knows, issues the command (it stays the only writer of ``trainer.commands``) and
    answers on ``ops.replies``. Who asked and why travel with it, and with the answer."""

    TOPIC: ClassVar[Topic] = Topic.OPERATOR_REQUESTS
    request_id: Identifier = Field(
        description="unique per request (a UUID): the ids of the commands it causes derive "
        "from it, so a request sent twice acts once"
    )
    run_id: Identifier
    action: OperatorAction = Field(
        description="resume: clear a halt (fresh rollback budget); halt: stop the run; "
        "rollback: to the kept checkpoint at ``step``; set_entropy: send ``value``"
    )
    step: Step | None = Field(default=None, description="rollback: the checkpoint's step")
    value: NonNegative | None = Field(default=None, description="set_entropy: the coefficient")
    reason: Annotated[str, Field(min_length=1, max_length=1000)]
    requested_by: Identifier = Field(description="who asked, e.g. user@host")
    ts: Timestamp

    @model_validator(mode="after")
    def _parameters_of_the_action(self) -> OperatorRequest:
        if self.action == "rollback" and self.step is None:
            raise ValueError("a rollback request needs the checkpoint's step")
        if self.action == "set_entropy" and self.value is None:
            raise ValueError("a set_entropy request needs the value")
        return self

    def key(self) -> str:
        return self.run_id


class OperatorReply(Event):
    """The worker's answer to an ``OperatorRequest``: done (with the command it issued, if
    any) or refused, with the reason."""

    TOPIC: ClassVar[Topic] = Topic.OPERATOR_REPLIES
    request_id: Identifier
    run_id: Identifier
    action: OperatorAction
    accepted: bool
    detail: str
    command_id: Identifier | None = None
    requested_by: Identifier
    reason: str
    ts: Timestamp

    def key(self) -> str:
        return self.run_id


EVENT_TYPES: tuple[type[Event], ...] = (
    RunAnnounced,
    RunFinished,
    StepMetric,
    CheckpointSaved,
    RewardStats,
    *COMMAND_TYPES,
    CommandAck,
    LlmOutcome,
    LlmControl,
    Rating,
    DeadLetter,
    OperatorRequest,
    OperatorReply,
)
