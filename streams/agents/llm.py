"""``llm.outcomes`` -> one circuit breaker per model -> ``llm.control`` (compacted).

Per batch the agent decodes each outcome, calls the model's breaker
(``streams.rules.breaker``), forwards each transition as an ``LlmControl`` event, waits
for the broker to acknowledge them, then writes each touched breaker's state once. A timer
(``breaker.tick_interval_s``) drives recovery from the worker's clock, so a held breaker
goes half-open on time with no traffic at all.

Live breakers stay in memory between batches and ticks (the timer needs them, and loading
state per event would cost a decode each). They belong to the partitions this worker
owns: a rebalance drops them all and they are reloaded from the table, which Faust has
recovered from its changelog by then. Batches and ticks take one lock, so a tick never
interleaves with a half-processed batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import asdict
from typing import Any

import faust
import orjson
from faust.types import TP

from producers.partitioning import partition_for_key
from schemas import LlmControl, LlmOutcome, Topic, decode
from streams.batching import batches, unfinished_batch_guard
from streams.context import ProcessorContext
from streams.rules.breaker import BreakerPolicy, ModelBreaker, Transition
from streams.state import PartitionedTable, partitioned_table

log = logging.getLogger(__name__)


class Breakers:
    """The live breakers of the models whose partitions this worker owns."""

    def __init__(self, ctx: ProcessorContext, table: PartitionedTable) -> None:
        self.ctx = ctx
        self.table = table
        self.policy = BreakerPolicy.from_settings(ctx.settings.breaker)
        self.source = ctx.topic(Topic.LLM_OUTCOMES)
        self.lock = asyncio.Lock()
        self._live: dict[bytes, tuple[ModelBreaker, int]] = {}
        self._touched: set[bytes] = set()

    def forget(self) -> None:
        """After a rebalance: partitions may have moved, reload from the table."""
        self._live.clear()

    def get(self, model_key: bytes, partition: int) -> ModelBreaker:
        live = self._live.get(model_key)
        if live is None:
            stored = self.table.get(model_key)
            model = model_key.decode()
            breaker = (
                ModelBreaker.from_state(model, self.policy, orjson.loads(stored))
                if stored is not None
                else ModelBreaker(model, self.policy)
            )
            live = self._live[model_key] = (breaker, partition)
        return live[0]

    def owned(self) -> Iterable[tuple[bytes, int]]:
        """(model key, partition) of every stored breaker on a partition we actively own."""
        assigned = self.ctx.app.assignor.assigned_actives()
        partitions = self.ctx.settings.kafka.partitions
        for model_key in list(self.table.keys()):
            partition = partition_for_key(model_key, partitions)
            if TP(self.source, partition) in assigned:
                yield model_key, partition

    async def emit(self, transition: Transition | None, model_key: bytes) -> None:
        if transition is None:
            return
        self._touched.add(model_key)
        event = LlmControl(**asdict(transition), ts=self.ctx.now())
        log.info(
            "breaker %s: %s, mode %s, ttl %gs (%s)",
            event.model,
            event.state,
            event.mode,
            event.cache_ttl_s,
            event.reason,
        )
        await self.ctx.forward(event)

    async def commit(self) -> None:
        """Outputs on the broker first, then the state that implies them."""
        if not self._touched:
            return
        await self.ctx.delivered()
        for model_key in self._touched:
            breaker, partition = self._live[model_key]
            self.table.put(model_key, orjson.dumps(breaker.to_state()), partition)
        self._touched.clear()

    async def tick(self) -> None:
        if self.ctx.app.rebalancing:
            return  # the table may be mid-recovery; the next tick catches up
        now = self.ctx.now()
        for model_key, partition in self.owned():
            breaker = self.get(model_key, partition)
            await self.emit(breaker.on_tick(now), model_key)
        await self.commit()


def register(ctx: ProcessorContext) -> Breakers:
    app = ctx.app
    worker = ctx.settings.worker
    table = partitioned_table(
        app, "llm-breakers", partitions=ctx.settings.kafka.partitions, value_serializer="raw"
    )
    breakers = Breakers(ctx, table)
    max_bytes = worker.max_event_bytes
    topic = app.topic(breakers.source, key_serializer="raw", value_serializer="raw")

    async def llm_breakers(stream: faust.StreamT[bytes]) -> AsyncIterator[int]:
        async for events in batches(stream, worker.batch_max_events, worker.batch_within_s):
            async with unfinished_batch_guard(app, events), breakers.lock:
                for event in events:
                    message = event.message
                    try:
                        outcome = decode(LlmOutcome, message.value, max_bytes=max_bytes)
                        model_key = outcome.model.encode()
                        breaker = breakers.get(model_key, message.partition)
                        transition = breaker.on_outcome(
                            outcome.ok,
                            outcome.mode,
                            outcome.latency_ms,
                            ctx.now(),
                            call_id=outcome.call_id,
                        )
                    except Exception as exc:  # bad input, or a value no rule can express
                        await ctx.dead_letters.send(message, exc)
                        continue
                    await breakers.emit(transition, model_key)
                await breakers.commit()
            yield len(events)

    app.agent(topic, name="llm-breakers")(llm_breakers)

    async def breaker_clock() -> None:
        async with breakers.lock:
            await breakers.tick()

    app.timer(ctx.settings.breaker.tick_interval_s)(breaker_clock)

    async def on_rebalance(*_args: Any, **_kwargs: Any) -> None:
        async with breakers.lock:
            breakers.forget()

    app.on_partitions_revoked.connect(on_rebalance)
    app.on_partitions_assigned.connect(on_rebalance)
    return breakers
