"""The runtime's batch order: records merged as their producers made them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from faust.types import TP

from streams.runtime import InputRecord, in_produced_order


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None = None
    value: bytes | None = None
    headers: Sequence[tuple[str, bytes]] = field(default_factory=tuple)


def part(topic: str, timestamps: list[int], partition: int = 0) -> tuple[TP, list[InputRecord]]:
    records: list[InputRecord] = [
        Record(topic, partition, offset, ts) for offset, ts in enumerate(timestamps)
    ]
    return TP(topic, partition), records


def order(records: list[InputRecord]) -> list[tuple[str, int]]:
    return [(r.topic, r.offset) for r in records]


def test_partitions_are_merged_by_timestamp_with_ties_in_the_agents_topic_order() -> None:
    metrics = part("metrics", [10, 10, 11, 12, 20])
    checkpoints = part("checkpoints", [10, 12])
    merged = in_produced_order([metrics, checkpoints], ("checkpoints", "metrics"))
    assert order(merged) == [
        ("checkpoints", 0),  # same millisecond as the first two metrics: its topic first
        ("metrics", 0),
        ("metrics", 1),
        ("metrics", 2),
        ("checkpoints", 1),
        ("metrics", 3),
        ("metrics", 4),
    ]


def test_a_partition_keeps_its_offset_order_whatever_its_timestamps() -> None:
    # Two producers with skewed clocks writing one partition: never reordered within it.
    skewed = part("metrics", [50, 10, 40, 5])
    other = part("metrics", [30], partition=1)
    merged = in_produced_order([skewed, other], ("metrics",))
    assert [r.offset for r in merged if r.partition == 0] == [0, 1, 2, 3]
    assert len(merged) == 5
