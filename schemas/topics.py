"""Contract topic names and their properties (public contract v1).

Names here are the unprefixed contract names; deployments may prepend a prefix
(setting ``kafka.topic_prefix``), which every client and the worker apply the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Topic(StrEnum):
    RUNS = "trainer.runs"
    METRICS = "trainer.metrics"
    CHECKPOINTS = "trainer.checkpoints"
    REWARD_STATS = "trainer.reward-stats"
    COMMANDS = "trainer.commands"
    ACKS = "trainer.acks"
    LLM_OUTCOMES = "llm.outcomes"
    LLM_CONTROL = "llm.control"
    RATINGS = "feedback.ratings"
    DEAD_LETTER = "ops.dead-letter"
    OPERATOR_REQUESTS = "ops.requests"
    OPERATOR_REPLIES = "ops.replies"


@dataclass(frozen=True, slots=True)
class TopicSpec:
    topic: Topic
    key: str
    compacted: bool = False


TOPIC_SPECS: dict[Topic, TopicSpec] = {
    spec.topic: spec
    for spec in (
        TopicSpec(Topic.RUNS, key="run_id", compacted=True),
        TopicSpec(Topic.METRICS, key="run_id"),
        TopicSpec(Topic.CHECKPOINTS, key="run_id"),
        TopicSpec(Topic.REWARD_STATS, key="run_id"),
        TopicSpec(Topic.COMMANDS, key="run_id"),
        TopicSpec(Topic.ACKS, key="run_id"),
        TopicSpec(Topic.LLM_OUTCOMES, key="model"),
        TopicSpec(Topic.LLM_CONTROL, key="model", compacted=True),
        TopicSpec(Topic.RATINGS, key="run_id or formula_id"),
        TopicSpec(Topic.DEAD_LETTER, key="original key"),
        TopicSpec(Topic.OPERATOR_REQUESTS, key="run_id"),
        TopicSpec(Topic.OPERATOR_REPLIES, key="run_id"),
    )
}


def topic_name(topic: Topic, prefix: str = "") -> str:
    """The broker-side name of a contract topic under a deployment prefix."""
    return f"{prefix}{topic.value}"
