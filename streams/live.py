"""Keyed state kept live in memory, for agents that also act on a timer.

The LLM breakers and the rating windows must act when time passes, not only when events
arrive (a downshift ends, a window times out). A timer needs the state in memory, and so
does every batch. ``LiveStates`` holds the objects of the keys this worker owns; the
runtime runs batches and ticks of one agent one at a time (``AgentRuntime.run_exclusive``),
so a tick never interleaves with a half-processed batch, and writes the changed keys at its
checkpoints (``streams.runtime``, through the agent's ``write_state``). A rebalance drops
them all; they are reloaded from the table (Faust has recovered it from its changelog by
then).

Each stored value carries the partition it was written to (the source event's), so the
timer acts exactly on the keys whose partitions this worker owns, whatever partitioner
produced them.

Replays: state is checkpointed before offsets are committed, and a crash after the one and
before the other, or commits that fail, or offsets reset by an operator, leave the restored
state ahead of the committed offset by any number of events. Each stored value therefore
also carries, per origin partition, the offset of the newest input applied to it;
``is_replay`` recognises an input at or below it exactly, however long the replay (bounded
id windows, like the breakers' call ids, cannot). An event re-keyed through an internal
topic names its origin in the ``ORIGIN_HEADER`` (``origin_header``), so its copies from a
replayed re-keying are recognised too.

A stored value also carries when (the worker's clock) an input last changed it, so that a
key's state is dropped (``drop``: a tombstone) only once no input has changed it for a while
(``quiet``): the rating window of a finished run goes with the run (``rules.run_lifecycle``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import orjson
from faust.types import TP

from streams.context import ProcessorContext
from streams.output import OutputDeliveryError
from streams.runtime import InputRecord
from streams.state import StateSink, StateStore

log = logging.getLogger(__name__)

T = TypeVar("T")

ORIGIN_HEADER = "fragrance-ops-origin"


def origin_header(message: InputRecord) -> tuple[str, bytes]:
    """The header that names ``message``'s position, for a copy re-keyed to another topic."""
    return ORIGIN_HEADER, f"{message.partition}:{message.offset}:{message.topic}".encode()


def input_origin(message: InputRecord) -> tuple[str, int]:
    """``("<partition>:<topic>", offset)``: where the event entered the system."""
    headers = message.headers or ()
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    for name, value in pairs:
        if name == ORIGIN_HEADER:
            partition, offset, topic = value.decode().split(":", 2)
            return f"{partition}:{topic}", int(offset)
    return f"{message.partition}:{message.topic}", message.offset


@dataclass
class _Entry(Generic[T]):
    value: T
    partition: int
    applied: dict[str, int] = field(default_factory=dict)  # origin -> newest offset applied
    applied_at: float | None = None  # the worker's clock at the newest input applied


class LiveStates(Generic[T]):
    """Live objects per key, loaded from and written back to a ``StateStore``."""

    def __init__(
        self,
        ctx: ProcessorContext,
        table: StateStore,
        source_topics: Iterable[str],
        *,
        name: str,
        new: Callable[[str], T],
        load: Callable[[str, dict[str, Any]], T],
        dump: Callable[[T], dict[str, Any]],
    ) -> None:
        self.ctx = ctx
        self.table = table
        self.name = name
        self.source_topics = tuple(source_topics)
        self._new, self._load, self._dump = new, load, dump
        self._live: dict[bytes, _Entry[T]] = {}
        self._touched: set[bytes] = set()

    def forget(self) -> None:
        """Drop every live object (a rebalance); reloaded from the table when next needed."""
        self._live.clear()
        self._touched.clear()

    def _entry(self, key: bytes, partition: int) -> _Entry[T]:
        entry = self._live.get(key)
        if entry is None:
            stored = self.table.get(key)
            name = key.decode()
            if stored:
                record = orjson.loads(stored)
                entry = _Entry(
                    self._load(name, record["state"]),
                    record["partition"],
                    record.get("applied", {}),
                    record.get("applied_at"),
                )
            else:
                entry = _Entry(self._new(name), partition)
            self._live[key] = entry
        return entry

    def get(self, key: bytes, partition: int) -> T:
        return self._entry(key, partition).value

    def is_replay(self, key: bytes, message: InputRecord) -> bool:
        """Whether ``message`` was applied to the key's state already (then it is counted)."""
        origin, offset = input_origin(message)
        applied = self._entry(key, message.partition).applied.get(origin)
        if applied is None or offset > applied:
            return False
        self.ctx.metrics.replayed_events.labels(self.name).inc()
        return True

    def applied(self, key: bytes, message: InputRecord) -> None:
        """``message`` changed the key's object: remember its position, write it."""
        origin, offset = input_origin(message)
        entry = self._entry(key, message.partition)
        entry.applied[origin] = offset
        entry.applied_at = self.ctx.now()
        self._touched.add(key)

    def touch(self, key: bytes) -> None:
        """The key's object changed (not by an input): write it with the batch (or tick)."""
        self._touched.add(key)

    def owned(self) -> Iterable[tuple[bytes, int]]:
        """(key, partition) of every stored key on a partition this worker actively owns."""
        if self.ctx.assignment.rebalancing:
            return  # the table may be mid-recovery; the next tick catches up
        assigned = self.ctx.assignment.assigned_actives()
        for key in list(self.table.keys()):
            entry = self._live.get(key)
            if entry is not None:
                partition = entry.partition
            else:
                stored = self.table.get(key)
                if not stored:
                    continue
                partition = orjson.loads(stored)["partition"]
            if any(TP(topic, partition) in assigned for topic in self.source_topics):
                yield key, partition

    def _owns(self, partition: int) -> bool:
        """Whether this worker actively owns ``partition`` of the source topics."""
        assigned = self.ctx.assignment.assigned_actives()
        return any(TP(topic, partition) in assigned for topic in self.source_topics)

    def peek(self, key: bytes) -> tuple[T, int] | None:
        """(object, partition) of the key, live or stored, if this worker actively owns it;
        None otherwise. Read-only (state queries): never creates an object, and one loaded
        from the table is not kept live."""
        entry = self._live.get(key)
        if entry is not None:
            return (entry.value, entry.partition) if self._owns(entry.partition) else None
        stored = self.table.get(key)
        if not stored:
            return None
        record = orjson.loads(stored)
        partition = int(record["partition"])
        if not self._owns(partition):
            return None
        return self._load(key.decode(), record["state"]), partition

    def held_keys(self) -> list[bytes]:
        """Every key with an object live or stored here (owned or not: ``peek`` tells)."""
        return sorted(set(self._live) | set(self.table.keys()))

    def _held(self, key: bytes) -> tuple[int, float | None] | None:
        """(partition, applied_at) of the key's state, live or stored, if this worker
        actively owns it; None otherwise."""
        entry = self._live.get(key)
        if entry is not None:
            partition, applied_at = entry.partition, entry.applied_at
        else:
            stored = self.table.get(key)
            if not stored:
                return None
            record = orjson.loads(stored)
            partition, applied_at = record["partition"], record.get("applied_at")
        if not self._owns(partition):
            return None
        return partition, applied_at

    def quiet(self, key: bytes, since: float) -> bool:
        """Whether no input was applied to the key's state after ``since`` (or it holds none
        here)."""
        held = self._held(key)
        return held is None or held[1] is None or held[1] <= since

    def drop(self, key: bytes, writer: StateSink) -> bool:
        """Forget the key's state for good (at a checkpoint, every agent held): tombstone
        its stored value. Returns whether there was one to drop."""
        held = self._held(key)
        if held is None:
            return False
        self._live.pop(key, None)
        self._touched.discard(key)
        if self.table.get(key) is not None:
            writer.delete(self.table, key, held[0])
        return True

    def write(self, writer: StateSink) -> None:
        """Write the touched keys (their outputs are on the broker already)."""
        for key in self._touched:
            entry = self._live[key]
            record = {
                "partition": entry.partition,
                "state": self._dump(entry.value),
                "applied": entry.applied,
                "applied_at": entry.applied_at,
            }
            writer.put(self.table, key, orjson.dumps(record), entry.partition)
        self._touched.clear()

    async def tick(self, on_tick: Callable[[bytes, T], Awaitable[None]]) -> None:
        """``on_tick`` for every owned key; one key failing never stops the others."""
        for key, partition in self.owned():
            try:
                await on_tick(key, self.get(key, partition))
            except OutputDeliveryError:
                raise  # the decision is in the state already: fail, restart from the checkpoint
            except Exception:
                log.exception("%s: the timer failed on %r; it retries next tick", self.name, key)
                self.ctx.metrics.tick_errors.labels(self.name).inc()


class LiveStatesAgent(Generic[T]):
    """The runtime's side of an agent whose state is one object per key in ``live``: a batch
    applied record by record (``on_record``, bad input dead-lettered), a tick per owned key
    (``on_tick``), the changed objects written at a checkpoint, all dropped on a rebalance."""

    ctx: ProcessorContext
    live: LiveStates[T]

    async def process(self, records: Sequence[InputRecord]) -> None:
        await self.ctx.apply_each(records, self.on_record)

    async def tick(self) -> None:
        await self.live.tick(self.on_tick)

    def write_state(self, writer: StateSink) -> None:
        self.live.write(writer)

    def forget(self) -> None:
        self.live.forget()

    async def on_record(self, record: InputRecord) -> None:
        """Decode one record and apply it."""
        raise NotImplementedError

    async def on_tick(self, key: bytes, value: T) -> None:
        """Act on the time that passed for one owned key."""
        raise NotImplementedError
