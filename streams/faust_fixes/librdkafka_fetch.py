"""Partitions fetched by librdkafka; aiokafka keeps the group and the positions.

aiokafka's fetcher is Python: building each fetch request, decoding each response,
bookkeeping per partition and the asyncio plumbing around it cost the worker about 1 ms of
CPU per fetch round trip, in Faust's consumer thread, whether the fetch brought records or
not (about 50 ms/s idle with the broker holding fetches for ``worker.batch_within_s``, and
half the worker's CPU per metric at a trainer's rate). librdkafka fetches in C threads;
Python takes the records it has ready in one call.

Who does what:

- aiokafka's consumer stays the group member: Faust's assignor, rebalances, committed
  offsets, seeks, pauses and offset resets all go through it as before. Its own fetcher
  only resets positions (``ListOffsets``); it fetches no records.
- A librdkafka consumer, never a group member (partitions assigned by hand, nothing
  committed), fetches each assigned partition Faust asks for (inputs, and table
  changelogs in recovery or on standby) that aiokafka holds a position for and has not
  paused, from exactly that position.
- ``fetched_records`` hands Faust its records in aiokafka's shape and moves aiokafka's
  position of each partition past them: every reader of positions (Faust's seeks and
  recovery, the stall watchdog, the tagging of fetches by seeks back in ``consumer.py``)
  sees what it saw before.

A partition whose aiokafka position moves other than by handing records over (a seek back
after a rebalance, an offset reset) is unassigned from librdkafka and assigned again at the
new position: librdkafka drops what it fetched for the partition before, and a record below
the position expected is dropped here as well, so nothing is delivered twice or out of
order. Offsets above the position expected (records removed by retention, transaction
markers) are read past, as aiokafka does.

Tested by ``tests/test_streams/test_faust_fixes/test_librdkafka_fetch.py``, by
``test_consumer.py`` (seeks back, never-committed partitions) and by every worker test and
the fault suite (SIGKILL loop, rebalances, broker restart, long replay, catch-up).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from aiokafka import AIOKafkaConsumer
from aiokafka.consumer.fetcher import Fetcher
from aiokafka.structs import TopicPartition
from confluent_kafka import Consumer, KafkaError, Message
from confluent_kafka import TopicPartition as RdTopicPartition

from config.kafka import consume_ready

log = logging.getLogger(__name__)

_UNKNOWN = -1  # librdkafka's position of a partition whose records were dropped


class FetchedRecord:
    """One fetched record, with what the runtime (``streams.runtime.InputRecord``) and
    Faust's own per-record path (``Consumer._to_message``) read of aiokafka's."""

    __slots__ = (
        "checksum",
        "headers",
        "key",
        "offset",
        "partition",
        "serialized_key_size",
        "serialized_value_size",
        "timestamp",
        "timestamp_type",
        "topic",
        "value",
    )

    def __init__(self, message: Any) -> None:
        self.topic: str = message.topic()
        self.partition: int = message.partition()
        self.offset: int = message.offset()
        self.key: bytes | None = message.key()
        self.value: bytes | None = message.value()
        self.headers: list[tuple[str, bytes]] = message.headers() or []
        self.timestamp_type, self.timestamp = message.timestamp()
        self.checksum = None
        self.serialized_key_size = -1 if self.key is None else len(self.key)
        self.serialized_value_size = -1 if self.value is None else len(self.value)


class _PositionsToReset:
    """The group's assignment as aiokafka's fetcher sees it: only the partitions whose
    position it has to reset; librdkafka fetches the rest."""

    def __init__(self, assignment: Any) -> None:
        self._assignment = assignment

    @property
    def tps(self) -> list[TopicPartition]:
        state_value = self._assignment.state_value
        return [tp for tp in self._assignment.tps if not state_value(tp).has_valid_position]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._assignment, name)


class LibrdkafkaFetcher(Fetcher):  # type: ignore[misc]  # aiokafka is untyped
    """aiokafka's fetcher, records fetched by a librdkafka consumer."""

    #: The longest one wait for records blocks librdkafka's consumer: seeks, pauses and new
    #: assignments reach librdkafka between waits (records arrive without waiting for it).
    max_wait_s = 0.1
    #: How long a wait that got its first record gathers the rest of that record's fetch.
    gather_s = 0.002

    def __init__(
        self, client: Any, subscriptions: Any, *, librdkafka_config: dict[str, Any], **kwargs: Any
    ) -> None:
        super().__init__(client, subscriptions, **kwargs)
        self._librdkafka = librdkafka_consumer(librdkafka_config)
        # Waits block a thread of their own, never the consumer's event loop.
        self._waits = ThreadPoolExecutor(1, thread_name_prefix="librdkafka-fetch")
        self._wait: asyncio.Future[list[Message]] | None = None  # in progress, or not taken
        # Partitions assigned to librdkafka -> the offset of the next record expected
        # (_UNKNOWN: records were dropped, librdkafka must be assigned the partition again).
        self._expected: dict[TopicPartition, int] = {}
        self._reset_view: _PositionsToReset | None = None
        self._timestamps_refreshed_at = 0.0

    @classmethod
    def for_librdkafka(
        cls, consumer: AIOKafkaConsumer, librdkafka_config: dict[str, Any]
    ) -> LibrdkafkaFetcher:
        """Made as ``AIOKafkaConsumer.start`` makes its fetcher; librdkafka fetches with the
        same isolation level and sizes."""
        config = {
            "isolation.level": consumer._isolation_level,
            "max.partition.fetch.bytes": consumer._max_partition_fetch_bytes,
            "fetch.max.bytes": consumer._fetch_max_bytes,
            "fetch.min.bytes": consumer._fetch_min_bytes,
            "fetch.wait.max.ms": consumer._fetch_max_wait_ms,
            **librdkafka_config,
        }
        return cls(
            consumer._client,
            consumer._subscription,
            librdkafka_config=config,
            key_deserializer=consumer._key_deserializer,
            value_deserializer=consumer._value_deserializer,
            fetch_min_bytes=consumer._fetch_min_bytes,
            fetch_max_bytes=consumer._fetch_max_bytes,
            fetch_max_wait_ms=consumer._fetch_max_wait_ms,
            max_partition_fetch_bytes=consumer._max_partition_fetch_bytes,
            check_crcs=consumer._check_crcs,
            fetcher_timeout=consumer._consumer_timeout,
            retry_backoff_ms=consumer._retry_backoff_ms,
            auto_offset_reset=consumer._auto_offset_reset,
            isolation_level=consumer._isolation_level,
            client_rack=consumer._client_rack,
        )

    def _get_actions_per_node(self, assignment: Any) -> Any:
        # aiokafka's own routine: position resets only.
        view = self._reset_view
        if view is None or view._assignment is not assignment:
            view = self._reset_view = _PositionsToReset(assignment)
        return super()._get_actions_per_node(view)

    async def fetched_records(
        self,
        partitions: Collection[Any],
        timeout: float = 0,  # noqa: ASYNC109  # aiokafka's signature, called by Faust
        max_records: int | None = None,
    ) -> dict[TopicPartition, list[Any]]:
        deadline = time.monotonic() + timeout
        while True:
            if self._subscriptions.reassignment_in_progress:
                await self._subscriptions.wait_for_assignment()
            remaining = max(0.0, deadline - time.monotonic())
            assignment = self._active_assignment()
            if self._wait is None:
                if assignment is not None:
                    self._assign(assignment, partitions)
                if not self._expected:
                    # Nothing to fetch; aiokafka's waiter wakes on its errors, which reach
                    # Faust (e.g. authorization).
                    waiter = self._create_fetch_waiter()
                    await asyncio.wait([waiter], timeout=min(remaining, self.max_wait_s))
                    if waiter.done():
                        waiter.result()
                    else:
                        waiter.cancel()
                    if time.monotonic() >= deadline or self._closed:
                        return {}
                    continue
                self._wait = asyncio.get_running_loop().run_in_executor(
                    self._waits,
                    self._consume,
                    max_records or 10_000,
                    min(remaining, self.max_wait_s),
                )
            # Shielded: a caller cancelled mid-wait leaves the records to the next call.
            messages = await asyncio.shield(self._wait)
            self._wait = None
            records = self._take(self._active_assignment(), partitions, messages)
            if records or time.monotonic() >= deadline or self._closed:
                return records

    def _consume(self, max_records: int, wait_s: float) -> list[Message]:
        # In the waits' thread. librdkafka queues a fetch response partition by partition:
        # the rest of the first record's fetch is gathered into the same batch.
        return consume_ready(self._librdkafka, max_records, wait_s, self.gather_s)

    def _active_assignment(self) -> Any:
        subscription = self._subscriptions.subscription
        assignment = subscription.assignment if subscription is not None else None
        return assignment if assignment is not None and assignment.active else None

    def _take(
        self, assignment: Any, partitions: Collection[Any], messages: list[Message]
    ) -> dict[TopicPartition, list[Any]]:
        """The records of ``messages`` aiokafka would hand over now: of partitions asked for,
        assigned, unpaused, at the position aiokafka holds. Others are dropped, and their
        partitions assigned to librdkafka again at aiokafka's position."""
        expected = self._expected
        taken: dict[TopicPartition, list[Any]] = {}
        refused: set[TopicPartition] = set()
        for message in messages:
            error = message.error()
            if error is not None:
                self._on_error(error)
                continue
            tp = TopicPartition(message.topic(), message.partition())
            if tp in refused:
                continue
            records = taken.get(tp)
            if records is None:
                state = assignment.state_value(tp) if assignment is not None else None
                if (
                    state is None
                    or state.paused
                    or (partitions and tp not in partitions)
                    or not state.has_valid_position
                    or state.position != expected.get(tp)
                ):
                    # Moved (a seek back), paused or revoked while librdkafka fetched.
                    refused.add(tp)
                    if tp in expected:
                        expected[tp] = _UNKNOWN
                    continue
                records = taken[tp] = []
            offset = cast(int, message.offset())  # None only on error messages
            if offset < expected[tp]:
                continue  # read already
            expected[tp] = offset + 1
            records.append(FetchedRecord(message))
        for tp, records in list(taken.items()):
            if records:
                assignment.state_value(tp).consumed_to(expected[tp])
            else:
                del taken[tp]
        if assignment is not None:
            self._refresh_timestamps(assignment)
        return taken

    def _assign(self, assignment: Any, partitions: Collection[Any]) -> None:
        """librdkafka fetches what aiokafka would: each partition asked for, unpaused, with
        a position, from that position."""
        wanted: dict[TopicPartition, int] = {}
        for tp in assignment.tps:
            if partitions and tp not in partitions:
                continue
            state = assignment.state_value(tp)
            if not state.paused and state.has_valid_position:
                wanted[tp] = state.position
        expected = self._expected
        if wanted == expected:
            return
        # Gone, or moved by a seek or reset: librdkafka's records fetched before are dropped.
        dropped = [tp for tp, offset in expected.items() if wanted.get(tp) != offset]
        added = [tp for tp, offset in wanted.items() if expected.get(tp) != offset]
        if dropped:
            self._librdkafka.incremental_unassign(
                [RdTopicPartition(tp.topic, tp.partition) for tp in dropped]
            )
        if added:
            self._librdkafka.incremental_assign(
                [RdTopicPartition(tp.topic, tp.partition, wanted[tp]) for tp in added]
            )
        self._expected = wanted

    def _refresh_timestamps(self, assignment: Any) -> None:
        # Faust's livelock check reads when each partition was last fetched (it speaks up
        # after minutes); librdkafka keeps fetching every assigned one.
        now = time.time()
        if now - self._timestamps_refreshed_at < 1.0:
            return
        self._timestamps_refreshed_at = now
        for tp in self._expected:
            state = assignment.state_value(tp)
            if state is not None:
                state.timestamp = int(1000 * now)

    @staticmethod
    def _on_error(error: KafkaError) -> None:
        # Per-partition news (an offset reset, a leader change): librdkafka retries by
        # itself. A fatal error stops the worker.
        if error.fatal():
            raise RuntimeError(f"librdkafka consumer failed: {error}")
        log.warning("librdkafka consumer: %s", error)

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            if self._wait is not None:  # librdkafka's consumer is not closed under a wait
                with contextlib.suppress(Exception):
                    await self._wait
            self._waits.shutdown()
            with contextlib.suppress(RuntimeError):  # closed already
                self._librdkafka.close()


def librdkafka_consumer(config: dict[str, Any]) -> Consumer:
    """A consumer of hand-assigned partitions: no group membership, nothing committed."""
    return Consumer(
        {
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": False,
            **config,
        },
        logger=logging.getLogger("streams.librdkafka"),
    )
