"""Stall detection: input waiting on a partition that the worker has stopped reading.

Faust's consumer can stop fetching for good after the broker restarts, with the process up
and no error logged (robinhood/faust#596, faust-streaming/faust#523, reproduced by the
broker-restart fault test). Kafka keeps the records; what is lost is liveness. The worker
therefore watches, per assigned input partition, its consumer's fetch position and the
partition's high watermark: a partition that has had records waiting (high watermark past
the position) with no progress for ``timeout_s`` is stalled, and the worker crashes so
that its supervisor restarts it (a restart resumes at the committed offset, so nothing is
lost). A hung agent is watched the same way: its batch in progress is "waiting" until a
batch with a new serial starts.

Time counts only while the broker answers and no rebalance is under way: a round in which
the high watermarks could not be read, or partitions were moving (``unknown``), restarts
every clock, so an outage or a table recovery longer than the timeout is not mistaken for
a stall once it is over.

Plain Python: no Kafka, no Faust.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Stall:
    partition: Hashable
    next_offset: int
    highwater: int
    idle_s: float

    def describe(self) -> str:
        return (
            f"{self.partition}: stuck at {self.next_offset} of {self.highwater} "
            f"for {self.idle_s:.0f} s"
        )


class StallDetector:
    """Per partition: since when its records have waited with no progress."""

    def __init__(self, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError("the stall timeout must be positive")
        self.timeout_s = timeout_s
        # partition -> (the next offset to read, since when records have waited at it);
        # present only while records wait.
        self._since: dict[Hashable, tuple[int, float]] = {}

    def observe(self, now: float, partitions: Mapping[Hashable, tuple[int, int]]) -> list[Stall]:
        """``partitions``: each assigned partition's (next offset to fetch, high watermark).

        Returns the stalled ones; partitions no longer assigned are forgotten.
        """
        stalls: list[Stall] = []
        since: dict[Hashable, tuple[int, float]] = {}
        for partition, (next_offset, highwater) in partitions.items():
            if highwater <= next_offset:
                continue  # nothing to read: not a stall however long it lasts
            previous = self._since.get(partition)
            if previous is None or previous[0] != next_offset:
                since[partition] = (next_offset, now)  # records newly waiting, or progress
                continue
            since[partition] = previous
            idle_s = now - previous[1]
            if idle_s >= self.timeout_s:
                stalls.append(Stall(partition, next_offset, highwater, idle_s))
        self._since = since
        return stalls

    def unknown(self, now: float) -> None:
        """Nothing can be said about progress now: restart every clock (the module doc)."""
        self._since = {partition: (offset, now) for partition, (offset, _) in self._since.items()}
