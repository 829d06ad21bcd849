"""Faust tables whose changelog partition is the source event's partition.

Agents here take events in batches (``stream.take_events``) and write state once per key
per batch, so there is no "current event" for Faust to read the partition from; the
table is told the partition explicitly instead.
"""

from __future__ import annotations

from typing import Any

import faust
from faust.serializers import codecs

from fragrance_ops.settings import Settings
from streams.rules.reward_window import RewardWindow


class RewardWindowCodec(codecs.Codec):
    """Changelog encoding of a reward window: its compact binary snapshot."""

    def _dumps(self, obj: Any) -> bytes:
        assert isinstance(obj, RewardWindow)
        return obj.to_bytes()

    def _loads(self, s: bytes) -> Any:
        return RewardWindow.from_bytes(s)


REWARD_WINDOW_CODEC = "fragrance-reward-window"
codecs.register(REWARD_WINDOW_CODEC, RewardWindowCodec())


class PartitionedTable(faust.Table[bytes, Any]):
    """A table written with an explicit changelog partition (the source event's)."""

    _partition_override: int | None = None

    def __init__(self, app: faust.App, *, value_serializer: str, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        # Faust derives serializers from key_type/value_type models; ours are codecs.
        self.key_serializer = "raw"
        self.value_serializer = value_serializer

    def put(self, key: bytes, value: Any, partition: int) -> None:
        self._partition_override = partition
        try:
            self[key] = value
        finally:
            self._partition_override = None

    def partition_for_key(self, key: Any) -> int | None:
        if self._partition_override is not None:
            return self._partition_override
        return super().partition_for_key(key)


def partitioned_table(
    app: faust.App,
    name: str,
    *,
    settings: Settings,
    value_serializer: str,
) -> PartitionedTable:
    table = PartitionedTable(
        app,
        name=name,
        default=None,
        beacon=app.tables.beacon,
        partitions=settings.kafka.partitions,
        value_serializer=value_serializer,
        extra_topic_configs=settings.worker.changelog_topic_configs,
    )
    app.tables.add(table)
    return table
