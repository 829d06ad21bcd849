"""Faust's aiokafka consumer, delivering whole fetches to the agents' runtime, committing
only what checkpointed state covers, and never losing records across a seek back.

**Batch delivery** (``Consumer._drain_messages``). Faust hands records to streams one at a
time: per record a ``ConsumerMessage``, two tasks (``wait_first(callback(message),
suspend_flow.wait())``), a queue hop through the conductor and a stream iteration: that
machinery, not the rules, would be most of the worker's time. Here each fetch's records of
input topics go to ``AgentRuntime.deliver`` in one call, per agent one batch; records of
other topics (table changelogs in recovery, standbys) still take Faust's own path, record
by record. Tested by ``tests/test_streams/test_faust_fixes/test_consumer.py`` and every
worker test.

**Offsets: what checkpointed state covers** (``_new_offset``,
``_filter_tps_with_pending_acks``, ``force_commit``). Faust commits the offsets streams
acknowledged; here every commit first runs the runtime's checkpoint (outputs acknowledged,
state written and acknowledged) and commits the offsets that checkpoint reached. Faust's
acked-offset lists, gaps and per-message acks are not used for input topics. Tested by
``tests/test_faults`` (SIGKILL loop, slow batch, rebalances, broker restart).

**The consumer on the worker's loop** (``_SeekingConsumerThread``): Faust's consumer
thread served as a task, its class docstring says why.

**Fetch sessions** (``_SeekingConsumerThread.on_start``): aiokafka's fetcher replaced by
one fetching in incremental sessions, ``fetch_sessions.py`` says why.

**Fetch size** (``_SeekingConsumerThread._create_consumer``). Faust creates aiokafka's
consumer with ``fetch_max_wait_ms=1500`` and the default ``fetch_min_bytes=1``: the broker
answers a fetch as soon as any of the worker's ~56 input partitions has one record, so at
200 metrics/s the worker would make about one fetch round trip, in Python, per record. The
broker holds a fetch here until ``worker.batch_min_bytes`` arrived or
``worker.batch_within_s`` passed. Tested by
``test_consumer.py::test_a_fetch_waits_for_its_batch``.

**Nothing is delivered past records dropped before a seek back; they are read again.** A
rebalance clears what Faust buffered (``FlowControlEvent.clear``) and seeks back to the
committed offsets (``Recovery._resume_streams``), and records fetched before that seek may
still come back from a fetch in flight afterwards. Every clear asks for a seek back before
the next fetch, and input records of a fetch made before the latest seek back (or while one
is asked for) are dropped, to be read again after it: delivered, they would be applied
before the records they skipped, and the state, which recognises replays by position, would
then take those for replays and lose them. Each fetch is tagged, when it completes, with
the number of seeks back done before it. Tested by
``test_consumer.py::test_records_dropped_by_a_seek_back_are_read_again_before_newer_ones``.

**A partition the group never committed is read again from its beginning** on a seek back.
aiokafka's ``seek_to_committed`` seeks only partitions whose committed offset is above 0
(``aiokafka/consumer/consumer.py``): a partition with no commit would keep its position
past the records dropped. Not ``seek_to_beginning``: its reset leaves no position for a
moment, and Faust's livelock check crashes the worker on that. Tested by
``test_consumer.py::test_a_partition_never_committed_is_read_again_from_its_beginning``.

Input partitions only: Faust positions its changelog partitions itself (table recovery)
and never reads its assignor's leader topic.

**A partition Faust pauses is paused in aiokafka too** (``_Consumer.pause_partitions``).
Faust pauses a partition only in its own bookkeeping (``Consumer.pause_partitions``): it
stops asking ``getmany`` for it, while aiokafka's fetcher goes on fetching it (aiokafka
expects pauses through ``AIOKafkaConsumer.pause``, aio-libs/aiokafka#304, #473). The table
changelogs, paused once recovered, took every state write of the worker's checkpoints back
in fetch responses; unread, those records held back the next fetch for aiokafka's retry
backoff (100 ms), and with it every input record behind them: the breaker's downshift
p99 was 79-83 ms, and 30-34 ms once they were paused (``benchmarks/llm_breaker_latency.py``).
Paused in both, a changelog is not fetched until Faust resumes it (recovery, standbys), and
what was fetched before the pause is let go. Tested by
``test_consumer.py::test_a_partition_faust_pauses_is_not_fetched_until_resumed``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

import aiokafka
import faust
from aiokafka import TopicPartition
from aiokafka.errors import ConsumerStoppedError
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as driver
from faust.types import TP
from faust.types.transports import TransportT
from mode import ServiceT
from mode.utils.futures import maybe_async
from mode.utils.objects import cached_property
from mode.utils.queues import FlowControlEvent

from config.settings import Settings
from streams.faust_fixes.fetch_sessions import SessionFetcher
from streams.runtime import AgentRuntime

log = logging.getLogger(__name__)


class _SeekingConsumerThread(driver.AIOKafkaConsumerThread):
    """Faust's aiokafka consumer "thread", served on the worker's own event loop.

    Faust runs aiokafka's consumer in a thread with its own loop and reaches it through
    method queues: every fetch handed over costs two cross-thread wake-ups and a dozen
    task switches, and the two threads contend for the GIL (a thread waiting for it can
    wait a 5 ms switch interval), which was most of the worker's CPU per event above idle
    and the tail of its decision latency. Here the consumer lives on the worker's loop:
    ``call_thread`` awaits the call, the "thread" is a task. The batches the loop runs are
    bounded (``worker.batch_max_events``), so aiokafka's heartbeats still go out in time.
    A call in flight when the consumer stops (a crash stops it at once) ends in
    ``ConsumerStoppedError``, as mode's thread cancelled it. Tested by every worker test;
    the stop under a commit in flight by ``tests/test_faults/test_stall_watchdog.py``.
    """

    # Seeks back and fetches both run in the consumer's task: a fetch is tagged with the
    # number of seeks back done when it completed.
    seeks_back = 0
    fetched_after_seeks = 0
    _serving: asyncio.Task[None] | None = None

    async def start(self) -> None:  # mode's ServiceThread.start, without a thread
        self._thread_started.set()
        self._thread_running = asyncio.Future(loop=self.parent_loop)
        self._serving = self.parent_loop.create_task(self._serve())
        try:
            await self._thread_running
        finally:
            self._thread_running = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._calls: set[asyncio.Future[Any]] = set()  # calls to the consumer in flight

    async def _gather_remaining_tasks(self) -> None:
        # mode cancels every task of the thread's loop once the consumer is stopped (the
        # worker crashing stops it at once, whatever is in flight). Here that loop is the
        # worker's: only the calls made to the consumer are cancelled; left running, a
        # commit sent as the consumer closed retried forever and the worker never exited.
        for call in list(self._calls):
            call.cancel()

    async def call_thread(self, fun: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.should_stop:
            raise ConsumerStoppedError()
        call = asyncio.ensure_future(maybe_async(fun(*args, **kwargs)))
        self._calls.add(call)
        call.add_done_callback(self._calls.discard)
        try:
            return await call
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if call.cancelled() and not (task is not None and task.cancelling()):
                raise ConsumerStoppedError() from None  # the consumer stopped under it
            raise

    async def cast_thread(self, fun: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.add_future(maybe_async(fun(*args, **kwargs)))

    def _create_consumer(self, loop: asyncio.AbstractEventLoop) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_consumer(loop)
        app = cast(WorkerApp, self.consumer.app)
        # Read by AIOKafkaConsumer.start() when it creates its Fetcher.
        consumer._fetch_min_bytes = app.fetch_min_bytes
        consumer._fetch_max_wait_ms = app.fetch_max_wait_ms
        return consumer

    async def on_start(self) -> None:
        await super().on_start()
        # Fetch in incremental sessions (fetch_sessions.py): the fetcher aiokafka made in
        # start() is replaced before the group assigns it anything to fetch.
        consumer = self._ensure_consumer()
        upstream = consumer._fetcher
        app = cast(WorkerApp, self.consumer.app)
        consumer._fetcher = SessionFetcher.for_consumer(consumer, app.quiet_fetch_wait_ms)
        await upstream.close()

    def pause_fetching(self, tps: Iterable[TP]) -> None:
        """Stop aiokafka fetching ``tps`` (those assigned); let go what it fetched of them."""
        consumer, paused = self._assigned(tps)
        if consumer is None:
            return
        consumer.pause(*paused)
        fetched = consumer._fetcher._records
        for tp in paused:
            fetched.pop(tp, None)  # unread, it would hold back its node's next fetch

    def resume_fetching(self, tps: Iterable[TP]) -> None:
        consumer, resumed = self._assigned(tps)
        if consumer is not None:
            consumer.resume(*resumed)

    def _assigned(
        self, tps: Iterable[TP]
    ) -> tuple[aiokafka.AIOKafkaConsumer | None, list[TopicPartition]]:
        """aiokafka's consumer (None before it starts) and those of ``tps`` assigned to it,
        as the ``TopicPartition``s its pause and resume take."""
        consumer = self._consumer
        if consumer is None:
            return None, []
        assigned = consumer.assignment()
        wanted = (TopicPartition(tp.topic, tp.partition) for tp in tps)
        return consumer, [tp for tp in wanted if tp in assigned]

    async def seek_to_committed(self) -> Mapping[TP, int]:
        committed: Mapping[TP, int] = await self.call_thread(self._seek_back)
        return committed

    async def _seek_back(self) -> Mapping[Any, int | None]:
        consumer = self._ensure_consumer()
        committed: Mapping[Any, int | None] = await consumer.seek_to_committed()
        is_input = cast(WorkerApp, self.consumer.app).runtime.is_input
        uncommitted = [tp for tp, offset in committed.items() if not offset and is_input(tp.topic)]
        if uncommitted:
            beginnings = await consumer.beginning_offsets(uncommitted)
            for tp, offset in beginnings.items():
                consumer.seek(tp, offset)
        self.seeks_back += 1
        return committed

    async def _fetch_records(self, *args: Any, **kwargs: Any) -> Any:
        records = await super()._fetch_records(*args, **kwargs)
        self.fetched_after_seeks = self.seeks_back
        return records


class _Consumer(driver.Consumer):
    _thread: _SeekingConsumerThread
    _seek_pending = False  # records were dropped: seek back before fetching again

    @property
    def _runtime(self) -> AgentRuntime:
        return cast(WorkerApp, self.app).runtime

    def pause_partitions(self, tps: Iterable[TP]) -> None:
        tpset = set(tps)
        super().pause_partitions(tpset)
        self._thread.pause_fetching(tpset)

    def resume_partitions(self, tps: Iterable[TP]) -> None:
        tpset = set(tps)
        super().resume_partitions(tpset)
        self._thread.resume_fetching(tpset)

    def buffers_cleared(self) -> None:
        """Faust cleared what it had fetched: it must be read again."""
        self._seek_pending = True

    def _new_consumer_thread(self) -> driver.AIOKafkaConsumerThread:
        return _SeekingConsumerThread(
            self, loop=self.loop, thread_loop=self.loop, beacon=self.beacon
        )

    async def _drain_messages(self, fetcher: ServiceT) -> None:  # Faust's fetch loop
        runtime = self._runtime
        consumer_stopped = self._stopped.is_set
        fetcher_stopped = cast(faust.Service, fetcher)._stopped.is_set
        while not (consumer_stopped() or fetcher_stopped()):
            if self._seek_pending and self.flow_active:
                self._seek_pending = False  # first: a clear during the seek asks for another
                await self.perform_seek()
            self.diag.set_flag(CONSUMER_FETCHING)
            records, active = await self._wait_next_records(1.0)
            self.diag.unset_flag(CONSUMER_FETCHING)
            await asyncio.sleep(0)  # Faust's: a loop of instant fetches must not starve others
            if not records or self.should_stop:
                continue
            fetched_after = self._thread.fetched_after_seeks

            def is_current(fetched_after: int = fetched_after) -> bool:
                # Every rebalance stops the flow and ends in a seek back before it resumes.
                return (
                    self.flow_active
                    and not self._seek_pending
                    and self._thread.seeks_back == fetched_after
                )

            stale = not is_current()
            inputs: dict[TP, Sequence[Any]] = {}
            dropped = 0
            for tp, batch in records.items():
                if not runtime.is_input(tp.topic):
                    if self.flow_active:
                        await self._deliver_one_by_one(tp, batch, active)
                elif stale or (active is not None and tp not in active):
                    dropped += len(batch)
                else:
                    inputs[tp] = batch
            if inputs:
                dropped += await runtime.deliver(inputs, is_current)
            if dropped:
                # Fetched before a seek back or a rebalance, or for a paused partition: read
                # again after a seek back to the committed offsets.
                log.info("%d input records dropped, read again after a seek back", dropped)
                self._seek_pending = True

    async def _deliver_one_by_one(
        self, tp: TP, batch: Sequence[Any], active: set[TP] | None
    ) -> None:
        """Faust's own per-record path, for the topics no agent reads (table changelogs)."""
        if active is not None and tp not in active and tp not in self._buffered_partitions:
            return
        read_offset = self._read_offset
        for record in batch:
            last = read_offset[tp]
            if last is not None and record.offset < last:
                continue  # Faust's drain loop skips what it read already
            await self.wait_first(
                self.callback(self._to_message(tp, record)), self.suspend_flow.wait()
            )
            read_offset[tp] = record.offset

    # Commits: the offsets the runtime's checkpointed state reached.
    async def force_commit(self, topics: Any = None, start_new_transaction: bool = True) -> bool:
        await self._runtime.checkpoint()
        return cast(bool, await super().force_commit(topics, start_new_transaction))

    def _filter_tps_with_pending_acks(self, topics: Any = None) -> Iterator[TP]:
        for tp in self._runtime.committable_partitions():
            if topics is None or tp in topics or tp.topic in topics:
                yield tp

    def _new_offset(self, tp: TP) -> int | None:
        return self._runtime.committable(tp)

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        await super().on_partitions_revoked(revoked)
        await self._runtime.forget(revoked)


class _Transport(driver.Transport):
    Consumer = _Consumer


class _FlowControl(FlowControlEvent):
    def __init__(self, app: faust.App) -> None:
        super().__init__(loop=app.loop)
        self.app = app

    def clear(self) -> None:
        super().clear()
        cast(_Consumer, self.app.consumer).buffers_cleared()


class WorkerApp(faust.App):
    """``faust.App`` consuming through the consumer above into ``runtime``'s agents."""

    #: Set before the worker starts: the agents the consumer hands fetched records to.
    runtime: AgentRuntime
    #: Set by ``fetch_with`` before the worker starts.
    fetch_min_bytes: int
    fetch_max_wait_ms: int
    quiet_fetch_wait_ms: int

    def fetch_with(self, settings: Settings) -> None:
        """Fetch as ``settings`` say: the broker holds a fetch until ``worker.batch_min_bytes``
        arrived or ``worker.batch_within_s`` passed; after an empty one, until the first
        record or ``worker.quiet_fetch_wait_s``."""
        worker = settings.worker
        self.fetch_min_bytes = worker.batch_min_bytes
        self.fetch_max_wait_ms = max(1, round(worker.batch_within_s * 1000))
        self.quiet_fetch_wait_ms = max(1, round(worker.quiet_fetch_wait_s * 1000))

    def _new_transport(self) -> TransportT:
        return _Transport(self.conf.broker_consumer, self)

    @cached_property
    def flow_control(self) -> FlowControlEvent:
        return _FlowControl(self)
