"""JSON Schema documents of the contract, one per topic, for non-Python clients.

The documents in ``schemas/jsonschema/`` are generated from the pydantic models; a test
fails when they drift. Regenerate with ``python -m schemas.jsonschema``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from pydantic import TypeAdapter

from schemas.events import (
    CheckpointSaved,
    Command,
    CommandAck,
    DeadLetter,
    LlmControl,
    LlmOutcome,
    OperatorReply,
    OperatorRequest,
    Rating,
    RewardStats,
    RunEvent,
    StepMetric,
)
from schemas.topics import Topic

SCHEMA_DIR = Path(__file__).parent / "jsonschema"
_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def documents() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema document, for every contract topic."""
    models: dict[Topic, Any] = {
        Topic.RUNS: RunEvent,
        Topic.METRICS: StepMetric,
        Topic.CHECKPOINTS: CheckpointSaved,
        Topic.REWARD_STATS: RewardStats,
        Topic.COMMANDS: Command,
        Topic.ACKS: CommandAck,
        Topic.LLM_OUTCOMES: LlmOutcome,
        Topic.LLM_CONTROL: LlmControl,
        Topic.RATINGS: Rating,
        Topic.DEAD_LETTER: DeadLetter,
        Topic.OPERATOR_REQUESTS: OperatorRequest,
        Topic.OPERATOR_REPLIES: OperatorReply,
    }
    docs = {}
    for topic, model in models.items():
        schema = TypeAdapter(model).json_schema(mode="validation")
        docs[f"{topic.value}.json"] = {
            "$schema": _DIALECT,
            "$id": f"fragrance-ops/v1/{topic.value}.json",
            "title": topic.value,
            **schema,
        }
    return docs


def render(document: dict[str, Any]) -> bytes:
    return orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def write(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, document in documents().items():
        path = directory / name
        path.write_bytes(render(document))
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write():
        print(path)
