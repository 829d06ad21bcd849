"""Keyed state kept live in memory between batches, for agents that also act on a timer.

The LLM breakers and the rating windows must act when time passes, not only when events
arrive (a downshift ends, a window times out). A timer needs the state in memory, and so
does every batch. ``LiveStates`` holds the objects of the keys this worker owns; batches
and ticks take its one lock, so a tick never interleaves with a half-processed batch. A
rebalance drops them all; they are reloaded from the table (Faust has recovered it from
its changelog by then).

Each stored value carries the partition it was written to (the source event's), so the
timer acts exactly on the keys whose partitions this worker owns, whatever partitioner
produced them. Writes follow the outputs they imply: batches go through
``register_batch_agent``; a tick awaits its outputs on the broker, writes, and flushes the
changelog at once (no input offset commit will do it for a tick).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import faust
import orjson
from faust.types import TP, Message

from streams.batching import register_batch_agent
from streams.context import ProcessorContext
from streams.state import PartitionedTable

log = logging.getLogger(__name__)

T = TypeVar("T")


class LiveStates(Generic[T]):
    """Live objects per key, loaded from and written back to a ``PartitionedTable``."""

    def __init__(
        self,
        ctx: ProcessorContext,
        table: PartitionedTable,
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
        self.lock = asyncio.Lock()
        self._live: dict[bytes, tuple[T, int]] = {}
        self._touched: set[bytes] = set()
        ctx.app.on_partitions_revoked.connect(self._on_rebalance)
        ctx.app.on_partitions_assigned.connect(self._on_rebalance)

    async def _on_rebalance(self, *_args: Any, **_kwargs: Any) -> None:
        async with self.lock:
            self._live.clear()

    def get(self, key: bytes, partition: int) -> T:
        live = self._live.get(key)
        if live is None:
            stored = self.table.get(key)
            name = key.decode()
            if stored:
                record = orjson.loads(stored)
                value, partition = self._load(name, record["state"]), record["partition"]
            else:
                value = self._new(name)
            live = self._live[key] = (value, partition)
        return live[0]

    def touch(self, key: bytes) -> None:
        """The key's object changed: write it with the batch (or tick)."""
        self._touched.add(key)

    def owned(self) -> Iterable[tuple[bytes, int]]:
        """(key, partition) of every stored key on a partition this worker actively owns."""
        if self.ctx.app.rebalancing:
            return  # the table may be mid-recovery; the next tick catches up
        assigned = self.ctx.app.assignor.assigned_actives()
        for key in list(self.table.keys()):
            live = self._live.get(key)
            if live is not None:
                partition = live[1]
            else:
                stored = self.table.get(key)
                if not stored:
                    continue
                partition = orjson.loads(stored)["partition"]
            if any(TP(topic, partition) in assigned for topic in self.source_topics):
                yield key, partition

    def write(self) -> None:
        """Write the touched keys (their outputs must be on the broker already)."""
        for key in self._touched:
            value, partition = self._live[key]
            record = {"partition": partition, "state": self._dump(value)}
            self.table.put(key, orjson.dumps(record), partition)
        self._touched.clear()

    async def tick(self, on_tick: Callable[[bytes, T], Awaitable[None]]) -> None:
        """``on_tick`` for every owned key; one key failing never stops the others."""
        for key, partition in self.owned():
            try:
                await on_tick(key, self.get(key, partition))
            except Exception:
                log.exception("%s: the timer failed on %r; it retries next tick", self.name, key)
                self.ctx.metrics.tick_errors.labels(self.name).inc()
        await self.ctx.delivered()
        self.write()
        await self.ctx.app.producer.flush()


@dataclass
class _LiveBatch(Generic[T]):
    live: LiveStates[T]
    handle: Callable[[Message], Awaitable[None]]

    async def on_message(self, message: Message) -> None:
        await self.handle(message)

    def write_state(self) -> None:
        self.live.write()


def register_live_agent(
    ctx: ProcessorContext,
    live: LiveStates[T],
    channel: faust.TopicT,
    *,
    on_message: Callable[[Message], Awaitable[None]],
    on_tick: Callable[[bytes, T], Awaitable[None]],
    tick_interval_s: float,
) -> None:
    """A batch agent over ``channel`` and a timer, both under ``live``'s lock."""
    register_batch_agent(
        ctx,
        channel,
        name=live.name,
        new_batch=lambda: _LiveBatch(live, on_message),
        lock=live.lock,
    )

    async def clock() -> None:
        async with live.lock:
            await live.tick(on_tick)

    ctx.app.timer(tick_interval_s)(clock)
