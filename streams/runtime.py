"""The agents' runtime: each fetch handed to its agents in one batch, state checkpointed at
commits, offsets committed only behind durable state.

Faust's consumer fetches (``streams.faust_fixes.consumer``) and hands every fetched batch
of input records here in one call, instead of Faust's two tasks and a queue hop per record.
Each agent (training, LLM breakers, feedback) processes its records against live objects
it keeps in memory between batches, and forwards outputs without waiting for them.

What makes that exact after a crash is the checkpoint, Kafka Streams' commit: at each
offset commit (Faust's ``broker_commit_interval``, and before partitions are revoked or
the worker stops), ``checkpoint`` holds every agent at a batch boundary, waits until every
output sent so far is acknowledged, has each agent write the state its batches changed
(once per key, ``streams.state``), waits for that state, and only then lets the consumer
commit the offsets those batches reached. So:

- a committed offset never runs ahead of the state that applied the records below it;
- written state never implies an output that was lost: outputs are acknowledged first;
- state may run ahead of the committed offsets (a crash between the state write and the
  commit, or commits that fail): the records read again are replays, and each agent's
  state recognises them by position (``RunOperations``, ``RewardWindow``, ``LiveStates``).

Decisions that read the worker's clock (when a downshift ends, when a rating window timed
out) are checkpointed promptly as well (``checkpoint_soon``): remade in a replay, later,
they could differ. The training agent's decisions, like its statistics, are a function of
its records alone (the replay makes the same commands, with the same ids), so they wait
for the commit.

A batch that fails with anything but bad input (which agents dead-letter per record)
crashes the worker; the failed agent's live state is never checkpointed, so a restart
resumes at its last checkpoint. A rebalance drops every live object after the revoking
commit's checkpoint; they are reloaded from the tables Faust recovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from faust.types import TP

if TYPE_CHECKING:
    import faust

    from streams.metrics import WorkerMetrics
    from streams.output import OutputProducer
    from streams.state import StateSink, StateWriter

log = logging.getLogger(__name__)


class InputRecord(Protocol):
    """One consumed record, as aiokafka's ``ConsumerRecord`` carries it."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...
    @property
    def timestamp(self) -> int:
        """Milliseconds: when the producer made it (or the broker appended it)."""


class BatchAgent(Protocol):
    """A stream processor: records in, outputs forwarded, live state checkpointed."""

    @property
    def name(self) -> str: ...
    @property
    def topics(self) -> tuple[str, ...]:
        """The input topics it reads (each read by one agent); of records produced in the
        same millisecond, those of an earlier topic are processed first."""
        ...

    async def process(self, records: Sequence[InputRecord]) -> None:
        """Apply each record (dead-lettering bad input) and forward the outputs."""
        ...

    def write_state(self, writer: StateSink) -> None:
        """Write the state changed since the last checkpoint (its outputs are delivered)."""
        ...

    def forget(self) -> None:
        """Drop live state (a rebalance): reload it from the tables when next needed."""
        ...


class AgentFailed(RuntimeError):
    """A batch failed for a reason other than bad input; the worker must restart."""


@dataclass(eq=False)
class _Slot:
    agent: BatchAgent
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    processed: dict[TP, int] = field(default_factory=dict)  # next offset after the batches
    broken: bool = False  # a batch failed midway: its live state must never be written
    serial: int = 0  # batches started


class AgentRuntime:
    """Routes fetched input records to their agents and checkpoints their state."""

    def __init__(
        self,
        app: faust.App,
        output: OutputProducer,
        state: StateWriter,
        metrics: WorkerMetrics,
    ) -> None:
        self._app = app
        self._output = output
        self._state = state
        self._metrics = metrics
        self._slots: list[_Slot] = []
        self._by_topic: dict[str, _Slot] = {}
        self._committable: dict[TP, int] = {}
        self._checkpointing = asyncio.Lock()
        self._checkpoint_requested = asyncio.Event()
        app.task(self._checkpoint_when_requested)
        # agent name -> serial of its batch in progress (absent between batches): the stall
        # watchdog's view of a hung agent.
        self.running_batches: dict[str, int] = {}

    def register(self, agent: BatchAgent) -> None:
        slot = _Slot(agent)
        for topic in agent.topics:
            if topic in self._by_topic:
                raise ValueError(f"{topic} is read by two agents")
            self._by_topic[topic] = slot
            # Registered with Faust's conductor: subscribed, and known as an acked input.
            self._app.topics.add(
                self._app.topic(topic, key_serializer="raw", value_serializer="raw")
            )
        self._slots.append(slot)

    @property
    def input_topics(self) -> frozenset[str]:
        return frozenset(self._by_topic)

    def is_input(self, topic: str) -> bool:
        return topic in self._by_topic

    async def deliver(
        self, fetched: Mapping[TP, Sequence[InputRecord]], is_current: Callable[[], bool]
    ) -> int:
        """Process one fetch: each agent its records, one batch each, in partition order.

        A batch whose fetch stopped being current while it waited for its agent (a seek
        back or a rebalance came first) is not processed; returns how many records were
        left so, to be read again.
        """
        per_slot: dict[_Slot, list[tuple[TP, Sequence[InputRecord]]]] = {}
        inbound = self._app.monitor.stream_inbound_time  # read by Faust's livelock check
        now = time.monotonic()
        for tp, records in fetched.items():
            if records:
                per_slot.setdefault(self._by_topic[tp.topic], []).append((tp, records))
                inbound[tp] = now
        left = 0
        for slot, parts in per_slot.items():
            left += await self._run_batch(slot, parts, is_current)
        return left

    async def _run_batch(
        self,
        slot: _Slot,
        parts: list[tuple[TP, Sequence[InputRecord]]],
        is_current: Callable[[], bool],
    ) -> int:
        name = slot.agent.name
        slot.serial += 1
        self.running_batches[name] = slot.serial
        started = time.perf_counter()
        records = in_produced_order(parts, slot.agent.topics)
        try:
            async with slot.lock:
                if not is_current():
                    return len(records)
                if slot.broken:
                    raise AgentFailed(f"agent {name} failed earlier; the worker must restart")
                try:
                    await slot.agent.process(records)
                except BaseException:
                    # Mid-batch, cancelled included (Faust stops the fetcher on shutdown):
                    # its state must never be written; a restart replays the batch.
                    slot.broken = True
                    raise
                for tp, batch in parts:
                    slot.processed[tp] = max(slot.processed.get(tp, 0), batch[-1].offset + 1)
                self._output.serve()
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                log.critical("agent %s: batch failed; crashing to replay it", name, exc_info=exc)
                await self._app.crash(exc)
            raise
        finally:
            del self.running_batches[name]
        metrics = self._metrics
        for tp, batch in parts:
            metrics.events.labels(tp.topic).inc(len(batch))
        metrics.batch_seconds.labels(name).observe(time.perf_counter() - started)
        return 0

    async def run_exclusive(self, agent: BatchAgent, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` (a timer's tick) between the agent's batches; skipped once it failed."""
        slot = next(slot for slot in self._slots if slot.agent is agent)
        async with slot.lock:
            if slot.broken:
                return
            try:
                await work()
            except BaseException as exc:
                slot.broken = True  # as a failed batch: its state is never checkpointed
                if not isinstance(exc, asyncio.CancelledError):
                    log.critical("agent %s: timer failed; crashing", agent.name, exc_info=exc)
                    await self._app.crash(exc)
                raise

    async def checkpoint(self) -> None:
        """Outputs acknowledged, then each agent's changed state written and acknowledged;
        then the offsets the checkpointed batches reached become committable."""
        async with self._checkpointing:
            reached: dict[TP, int] = {}
            async with contextlib.AsyncExitStack() as held:
                for slot in self._slots:
                    await held.enter_async_context(slot.lock)
                await self._output.delivered()
                for slot in self._slots:
                    if slot.broken:
                        continue  # its state is mid-batch: the restart replays from before
                    slot.agent.write_state(self._state)
                    reached.update(slot.processed)
            await self._state.delivered()
            self._committable.update(reached)

    def checkpoint_soon(self) -> None:
        """Checkpoint as soon as the running batch or tick is over (a decision was made)."""
        self._checkpoint_requested.set()

    async def _checkpoint_when_requested(self) -> None:
        while True:
            await self._checkpoint_requested.wait()
            self._checkpoint_requested.clear()
            try:
                await self.checkpoint()
            except Exception as exc:  # outputs or state undeliverable: as a failed commit
                log.critical("checkpoint failed; crashing to replay from the last", exc_info=exc)
                await self._app.crash(exc)
                return

    def committable(self, tp: TP) -> int | None:
        """The offset to commit for ``tp``: as far as checkpointed state has applied."""
        return self._committable.get(tp)

    def committable_partitions(self) -> Iterable[TP]:
        return list(self._committable)

    async def forget(self, revoked: Iterable[TP]) -> None:
        """After the revoking commit: drop every agent's live state and what it knew of
        the revoked partitions (their new owner recovers the state from the changelogs)."""
        gone = set(revoked)
        for tp in gone:
            self._committable.pop(tp, None)
        for slot in self._slots:
            async with slot.lock:
                slot.agent.forget()
                # Reloaded state is the checkpoint's: so is how far it has applied (a batch
                # that ran after the revoking checkpoint is read again, as a replay).
                slot.processed = {
                    tp: self._committable[tp] for tp in slot.processed if tp in self._committable
                }


def in_produced_order(
    parts: Sequence[tuple[TP, Sequence[InputRecord]]], topics: Sequence[str]
) -> list[InputRecord]:
    """One batch's records from several partitions, as their producers made them: merged by
    timestamp, each partition's in offset order, ties in ``topics``' order.

    A fetch can bring a thousand metrics of a run with its checkpoints (a worker catching
    up): handed over partition after partition, the checkpoints would be read a thousand
    steps behind the metrics. One trainer produces all of its run's topics, so its clock
    orders them as it sent them; the rules still decide the same whatever the order
    (``rules.training``), this keeps the waits they allow for short.
    """
    if len(parts) == 1:
        return list(parts[0][1])
    rank = {topic: i for i, topic in enumerate(topics)}
    ordered = sorted(parts, key=lambda part: rank[part[0].topic])
    return list(heapq.merge(*(batch for _, batch in ordered), key=_timestamp))


def _timestamp(record: InputRecord) -> int:
    return record.timestamp
