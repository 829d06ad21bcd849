"""Faust's aiokafka transport, with one fix: a partition the group never committed is
read again from its beginning when Faust seeks back to the committed offsets.

Faust drops records it has fetched but not yet handed to a stream when the consumer
generation changes or flow is paused (``Consumer.getmany`` in
``faust/transport/consumer.py``), counting on a seek to the committed offsets to read them
again. aiokafka's ``seek_to_committed`` seeks only partitions whose committed offset is
above 0 (``aiokafka/consumer/consumer.py``): a partition with no commit keeps its position
past the dropped records, and they are skipped until the next restart. A rebalance during
the replay after a crash does exactly this (``tests/test_faults/test_long_replay.py``
caught it in about one run in three). Read again from the beginning (the app's
``consumer_auto_offset_reset`` is ``earliest``), the records the state has applied already
are recognised as replays (``streams/live.py``, and positions in the training state).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import faust
from faust.transport.drivers import aiokafka as driver
from faust.types import TP
from faust.types.transports import TransportT


class _SeekingConsumerThread(driver.AIOKafkaConsumerThread):
    async def seek_to_committed(self) -> Mapping[TP, int]:
        committed: Mapping[Any, int | None] = await super().seek_to_committed()
        # Input partitions only: Faust positions changelog partitions itself (recovery).
        changelogs = self.consumer.app.tables.changelog_topics
        uncommitted = [
            tp for tp, offset in committed.items() if not offset and tp.topic not in changelogs
        ]
        if uncommitted:
            consumer = self._ensure_consumer()
            await self.call_thread(consumer.seek_to_beginning, *uncommitted)
        return committed  # type: ignore[return-value]  # aiokafka's TopicPartition keys


class _Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> driver.AIOKafkaConsumerThread:
        return _SeekingConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(driver.Transport):
    Consumer = _Consumer


class WorkerApp(faust.App):
    """``faust.App`` consuming through the transport above."""

    def _new_transport(self) -> TransportT:
        return _Transport(self.conf.broker_consumer, self)
