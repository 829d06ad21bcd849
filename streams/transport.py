"""Faust's aiokafka transport, with three fixes for records Faust fetched and then lost.

Faust drops records on its way through a rebalance (it clears the streams' buffers, skips
what it fetched before), counting on a seek back to the committed offsets to read them
again. Three gaps in that plan lost records until the next restart, or for good once
newer records were applied; the fault suite found each (``tests/test_faults``).

**Nothing is delivered past records Faust cleared or skipped; they are read again first.**
Faust's recovery seeks back to the committed offsets and then resumes the flow, which
clears the streams' buffers (``Recovery._resume_streams``, mode's
``FlowControlEvent.resume``). But a batch fetched before the seek went on being delivered
after it, past the records just cleared; and records fetched after the seek could land in
the buffers just before the clear. Either way newer records were applied first, and the
ones cleared came back behind them, where the state took them for replays (it recognises
replays by position): the broker-restart scenario lost 232 outcomes this way, in 3 runs
of 6. So here every clear of the buffers asks for a seek back before the next fetch, and
input records of a batch fetched before the latest seek back (or while one is asked for)
are dropped, to be read again after it. Seeks back and fetches both run in the consumer's
thread, one after the other, so each fetch is tagged there with the number of seeks back
done before it.

**A record below the partition's read offset is delivered, not dropped.** Faust's fetch
loop (``Consumer._drain_messages``) skips any record below the last offset it read, as
read already. ``perform_seek`` resets that offset, but the loop writes it again when the
message it was delivering when the seek came goes through. The records read again from
the commit then all fall below it: skipped, and the commit stays behind them until the
worker restarts. After a seek back, a record below the read offset can only be one to
process again; the state recognises what it has applied already.

**A partition the group never committed is read again from its beginning** on a seek
back. aiokafka's ``seek_to_committed`` seeks only partitions whose committed offset is
above 0 (``aiokafka/consumer/consumer.py``): a partition with no commit kept its position
past the records Faust dropped (``tests/test_faults/test_long_replay.py`` caught it in
about one run in three). The app's ``consumer_auto_offset_reset`` is ``earliest``.

Input partitions only (topics whose records streams acknowledge): Faust positions its
changelog partitions itself (table recovery) and never reads its assignor's leader topic.
``tests/test_streams/test_transport.py`` drives each fix against the broker.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing
from typing import Any, cast

import faust
from faust.transport.drivers import aiokafka as driver
from faust.types import TP, Message
from faust.types.transports import TransportT
from mode.utils.objects import cached_property
from mode.utils.queues import FlowControlEvent

log = logging.getLogger(__name__)


class _SeekingConsumerThread(driver.AIOKafkaConsumerThread):
    # Seeks back and fetches both run in the consumer's thread, one after the other: a
    # fetch is tagged with the number of seeks back done when it completed.
    seeks_back = 0
    fetched_after_seeks = 0

    async def seek_to_committed(self) -> Mapping[TP, int]:
        committed: Mapping[TP, int] = await self.call_thread(self._seek_back)
        return committed

    async def _seek_back(self) -> Mapping[Any, int | None]:
        consumer = self._ensure_consumer()
        committed: Mapping[Any, int | None] = await consumer.seek_to_committed()
        # Stream inputs only (their records are acknowledged): Faust positions changelog
        # partitions itself (recovery), and never reads its assignor's leader topic.
        is_input = self.consumer.app.topics.acks_enabled_for
        uncommitted = [tp for tp, offset in committed.items() if not offset and is_input(tp.topic)]
        if uncommitted:
            # Not seek_to_beginning: its reset leaves no position for a moment, and Faust's
            # livelock check (verify_event_path) crashes the worker on that.
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
    _batch_seeks = 0  # the tag of the batch being delivered
    _seek_pending = False  # the streams' buffers were cleared: seek back before fetching

    def buffers_cleared(self) -> None:
        """Faust cleared the streams' buffers: what they held must be read again."""
        self._seek_pending = True

    def _new_consumer_thread(self) -> driver.AIOKafkaConsumerThread:
        return _SeekingConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _getmany(self, active_partitions: set[TP] | None, timeout: float) -> Any:  # noqa: ASYNC109  (Faust's signature)
        records = await super()._getmany(active_partitions, timeout)
        self._batch_seeks = self._thread.fetched_after_seeks
        return records

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Message]]:  # noqa: ASYNC109  (Faust's signature)
        if self._seek_pending and self.flow_active:
            self._seek_pending = False  # first: a clear during the seek asks for another
            await self.perform_seek()
        read_offset = self._read_offset
        is_input = self.app.topics.acks_enabled_for
        dropped: Counter[TP] = Counter()
        fetched = cast(AsyncGenerator[tuple[TP, Message], None], super().getmany(timeout))
        async with aclosing(fetched) as records:
            async for tp, message in records:
                stale_batch = self._seek_pending or self._thread.seeks_back != self._batch_seeks
                if stale_batch and is_input(tp.topic):
                    dropped[tp] += 1  # fetched before a seek back: read again after it
                    continue
                stale = read_offset[tp]
                if stale is not None and message.offset < stale:
                    log.info(
                        "%s: reading again from %d; Faust would have skipped it up to %d",
                        tp,
                        message.offset,
                        stale,
                    )
                    read_offset[tp] = None  # nor is it a gap: the drain loop reads None
                yield tp, message
        for tp, count in dropped.items():
            log.info("%s: %d records fetched before a seek back, read again after it", tp, count)


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
    """``faust.App`` consuming through the transport above."""

    def _new_transport(self) -> TransportT:
        return _Transport(self.conf.broker_consumer, self)

    @cached_property
    def flow_control(self) -> FlowControlEvent:
        return _FlowControl(self)
