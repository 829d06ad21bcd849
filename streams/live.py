"""Keyed state kept live in memory between batches, for agents that also act on a timer.

The LLM breakers and the rating windows must act when time passes, not only when events
arrive (a downshift ends, a window times out). A timer needs the state in memory, and so
does every batch. ``LiveStates`` holds the objects of the keys this worker owns; batches
and ticks take its one lock, so a tick never interleaves with a half-processed batch. A
rebalance drops them all; they are reloaded from the table (Faust has recovered it from
its changelog by then). Writes follow the outputs they imply: ``commit`` waits for the
broker to acknowledge the outputs, then writes each touched key once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Generic, TypeVar

import faust
import orjson
from faust.types import TP, Message

from producers.partitioning import partition_for_key
from streams.batching import batches, unfinished_batch_guard
from streams.context import ProcessorContext
from streams.state import PartitionedTable

T = TypeVar("T")


class LiveStates(Generic[T]):
    """Live objects per key, loaded from and written back to a ``PartitionedTable``."""

    def __init__(
        self,
        ctx: ProcessorContext,
        table: PartitionedTable,
        source_topics: Iterable[str],
        *,
        new: Callable[[str], T],
        load: Callable[[str, dict[str, Any]], T],
        dump: Callable[[T], dict[str, Any]],
    ) -> None:
        self.ctx = ctx
        self.table = table
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
            value = self._load(name, orjson.loads(stored)) if stored else self._new(name)
            live = self._live[key] = (value, partition)
        return live[0]

    def touch(self, key: bytes) -> None:
        """The key's object changed: write it at the next ``commit``."""
        self._touched.add(key)

    def owned(self) -> Iterable[tuple[bytes, int]]:
        """(key, partition) of every stored key on a partition this worker actively owns."""
        if self.ctx.app.rebalancing:
            return  # the table may be mid-recovery; the next tick catches up
        assigned = self.ctx.app.assignor.assigned_actives()
        partitions = self.ctx.settings.kafka.partitions
        for key in list(self.table.keys()):
            partition = partition_for_key(key, partitions)
            if any(TP(topic, partition) in assigned for topic in self.source_topics):
                yield key, partition

    async def commit(self) -> None:
        """Outputs on the broker first, then the state that implies them."""
        if not self._touched:
            return
        await self.ctx.delivered()
        for key in self._touched:
            value, partition = self._live[key]
            self.table.put(key, orjson.dumps(self._dump(value)), partition)
        self._touched.clear()


def register_live_agent(
    ctx: ProcessorContext,
    live: LiveStates[Any],
    channel: faust.TopicT,
    *,
    name: str,
    on_message: Callable[[Message], Awaitable[None]],
    tick: Callable[[], Awaitable[None]],
    tick_interval_s: float,
) -> None:
    """A batch agent over ``channel`` and a timer, both under ``live``'s lock.

    Per batch: each message through ``on_message`` (bad input is dead-lettered and the
    batch goes on), then ``live.commit()``; a batch that fails otherwise is never
    acknowledged (``unfinished_batch_guard``). The timer calls ``tick`` (which commits).
    """
    app, worker = ctx.app, ctx.settings.worker

    async def agent(stream: faust.StreamT[bytes]) -> AsyncIterator[int]:
        async for events in batches(stream, worker.batch_max_events, worker.batch_within_s):
            started = time.perf_counter()
            async with unfinished_batch_guard(app, events), live.lock:
                for event in events:
                    try:
                        await on_message(event.message)
                    except Exception as exc:  # bad input, or a value no rule can express
                        await ctx.dead_letters.send(event.message, exc)
                await live.commit()
            ctx.observe_batch(name, (event.message.topic for event in events), started)
            yield len(events)

    async def clock() -> None:
        async with live.lock:
            await tick()

    app.agent(channel, name=name)(agent)
    app.timer(tick_interval_s)(clock)
