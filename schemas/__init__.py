"""fragrance-ops event contract v1: topics, events, the codec and its one error type."""

from schemas.codec import DEFAULT_MAX_EVENT_BYTES, decode, decode_command, encode, validate
from schemas.errors import InvalidEvent
from schemas.events import (
    COMMAND_TYPES,
    EVENT_TYPES,
    CheckpointSaved,
    Command,
    CommandAck,
    DeadLetter,
    Event,
    Halt,
    LlmControl,
    LlmOutcome,
    Rating,
    Retune,
    RewardStats,
    Rollback,
    RunAnnounced,
    SetEntropyCoef,
    StepMetric,
)
from schemas.topics import TOPIC_SPECS, Topic, TopicSpec, topic_name

__all__ = [
    "COMMAND_TYPES",
    "DEFAULT_MAX_EVENT_BYTES",
    "EVENT_TYPES",
    "TOPIC_SPECS",
    "CheckpointSaved",
    "Command",
    "CommandAck",
    "DeadLetter",
    "Event",
    "Halt",
    "InvalidEvent",
    "LlmControl",
    "LlmOutcome",
    "Rating",
    "Retune",
    "RewardStats",
    "Rollback",
    "RunAnnounced",
    "SetEntropyCoef",
    "StepMetric",
    "Topic",
    "TopicSpec",
    "decode",
    "decode_command",
    "encode",
    "topic_name",
    "validate",
]
