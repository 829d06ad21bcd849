"""What the worker and a trainer said about one run's rollback, read back from Kafka, for the
end-to-end tests of the framework callbacks."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

from schemas import Topic, topic_name
from tests.helpers.kafka import consume_until


@dataclass(frozen=True)
class RollbackRecords:
    commands: list[dict[str, Any]]
    acks: list[dict[str, Any]]
    announced_uris: set[str]

    def the_rollback(self, *, checkpoint_uri: str, checkpoint_step: int, anomaly_step: int) -> Any:
        """The run's one rollback, to ``checkpoint_uri``, acknowledged as applied once, and
        no halt; returns the command."""
        rollbacks = [command for command in self.commands if command["type"] == "rollback"]
        assert len(rollbacks) == 1, rollbacks
        (rollback,) = rollbacks
        assert rollback["checkpoint_step"] == checkpoint_step
        assert rollback["anomaly_step"] == anomaly_step
        assert rollback["checkpoint_uri"] == checkpoint_uri
        assert checkpoint_uri in self.announced_uris
        assert not [command for command in self.commands if command["type"] == "halt"]
        acks = [ack for ack in self.acks if ack["command_id"] == rollback["command_id"]]
        assert [ack["status"] for ack in acks] == ["applied"]
        assert acks[0]["after"] == {"step": checkpoint_step, "attempt": 1}
        return rollback


def read_rollback_records(
    bootstrap: str, prefix: str, *, announced: bytes, settle_s: float = 2.0
) -> RollbackRecords:
    """Acks and commands (each read to the topic's end once a rollback is among them: a
    second rollback would be seen) and the checkpoints announced until one whose URI holds
    ``announced``. ``settle_s``: how long the worker is given to send a second rollback."""

    def has_rollback(got: list[Any]) -> bool:
        return any(b'"rollback"' in (m.value() or b"") for m in got)

    acks = consume_until(bootstrap, topic_name(Topic.ACKS, prefix), has_rollback, 30, to_end=True)
    time.sleep(settle_s)
    commands = consume_until(
        bootstrap, topic_name(Topic.COMMANDS, prefix), has_rollback, 30, to_end=True
    )
    checkpoints = consume_until(
        bootstrap,
        topic_name(Topic.CHECKPOINTS, prefix),
        lambda got: any(announced in (m.value() or b"") for m in got),
        30,
    )
    return RollbackRecords(
        commands=[orjson.loads(m.value()) for m in commands],
        acks=[orjson.loads(m.value()) for m in acks],
        announced_uris={orjson.loads(m.value())["uri"] for m in checkpoints},
    )
