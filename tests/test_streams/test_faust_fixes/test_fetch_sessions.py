"""Incremental fetch sessions: what each fetch sends, and a consumer reading through one."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.consumer.fetcher import Fetcher
from aiokafka.protocol.fetch import FetchRequest, FetchRequest_v11
from aiokafka.structs import TopicPartition
from confluent_kafka import Producer

from streams.faust_fixes.fetch_sessions import (
    SessionFetcher,
    _FetchLimits,
    _Session,
    _SessionFetchRequest,
)
from tests.helpers.kafka import create_topics

A0, A1, B0 = TopicPartition("a", 0), TopicPartition("a", 1), TopicPartition("b", 0)


LIMITS = _FetchLimits(
    max_wait_ms=500,
    min_bytes=1 << 16,
    max_bytes=1 << 20,
    max_partition_bytes=1024,
    isolation_level=0,
    rack_id="",
)


def wanted(**positions: int) -> dict[TopicPartition, tuple[int, int]]:
    """The positions to fetch: ``a0=5`` is topic a, partition 0, at offset 5."""
    return {
        TopicPartition(name[0], int(name[1:])): (offset, 1024) for name, offset in positions.items()
    }


def sent(request: _SessionFetchRequest) -> tuple[int, int, dict[str, list[int]], list[Any]]:
    struct = request.build(FetchRequest_v11)
    partitions = {topic: sorted(p[0] for p in parts) for topic, parts in struct.topics}
    return struct.session_id, struct.session_epoch, partitions, struct.forgotten_topics_data


def test_without_a_session_a_fetch_names_every_partition_and_opens_one() -> None:
    request = _SessionFetchRequest(wanted(a0=5, a1=7, b0=1), _Session(), LIMITS)
    assert sent(request) == (0, 0, {"a": [0, 1], "b": [0]}, [])


def test_in_a_session_a_fetch_names_what_moved_and_forgets_what_is_not_wanted() -> None:
    held = {A0: (5, 1024), A1: (7, 1024), B0: (1, 1024)}
    session = _Session(session_id=42, epoch=3, partitions=held)
    # a0 moved on (its records were consumed); b0 has records still buffered: not fetched.
    request = _SessionFetchRequest(wanted(a0=9, a1=7), session, LIMITS)
    assert sent(request) == (42, 3, {"a": [0]}, [("b", [0])])
    # The response is matched against every partition fetched, moved or not.
    assert request.topics == [("a", [(0, 9, 1024), (1, 7, 1024)])]


def test_a_broker_without_sessions_gets_full_fetches() -> None:
    session = _Session(session_id=42, epoch=3, partitions={A0: (5, 1024)})
    request = _SessionFetchRequest(wanted(a0=5, a1=7), session, LIMITS)
    struct = request.build(FetchRequest._CLASSES[4])  # v4: no session fields
    assert [(t, sorted(p[0] for p in parts)) for t, parts in struct.topics] == [("a", [0, 1])]


@pytest.mark.parametrize(
    ("error_code", "session_id", "kept"),
    [(0, 42, True), (70, 0, False), (71, 0, False), (0, 0, False)],  # 70/71: session errors
)
def test_a_response_keeps_the_session_or_ends_it(
    error_code: int, session_id: int, kept: bool
) -> None:
    fetcher = SessionFetcher.__new__(SessionFetcher)  # the bookkeeping alone, no client
    fetcher._sessions = {}
    fetcher._timestamps_refreshed = 0.0
    fetcher._subscriptions = SimpleNamespace(subscription=SimpleNamespace(assignment=None))
    session = fetcher.session(1)
    session.session_id, session.epoch = 42, 3
    request = _SessionFetchRequest(wanted(a0=5), session, LIMITS)
    response = SimpleNamespace(
        API_VERSION=11, error_code=error_code, session_id=session_id, topics=[]
    )
    fetcher.on_session_response(1, request, response)
    if kept:
        assert (session.session_id, session.epoch, session.partitions) == (42, 4, {A0: (5, 1024)})
    else:
        assert (session.session_id, session.epoch, session.partitions) == (0, 0, {})


def test_after_a_response_with_nothing_the_next_fetch_is_answered_at_the_first_record() -> None:
    fetcher = SessionFetcher.__new__(SessionFetcher)  # the bookkeeping alone, no client
    fetcher._sessions = {}
    fetcher._timestamps_refreshed = 0.0
    fetcher._subscriptions = SimpleNamespace(subscription=SimpleNamespace(assignment=None))
    fetcher._limits = LIMITS
    fetcher._quiet_limits = replace(LIMITS, min_bytes=1, max_wait_ms=30_000)
    fetcher.session(1).session_id = 42

    def answered(partitions: list[Any]) -> tuple[int, int]:
        request = fetcher.fetch_request(1, wanted(a0=5))
        response = SimpleNamespace(API_VERSION=11, error_code=0, session_id=42, topics=partitions)
        fetcher.on_session_response(1, request, response)
        return request._min_bytes, request._max_wait_ms

    assert answered([]) == (1 << 16, 500)  # a batch: fetch_min_bytes, up to fetch_max_wait_ms
    assert answered([("a", [(0, 0, 9)])]) == (1, 30_000)  # quiet: the first byte, or 30 s
    assert answered([]) == (1 << 16, 500)  # records came: a batch again
    assert answered([]) == (1, 30_000)


@pytest.mark.integration
def test_a_consumer_reads_everything_through_incremental_fetches(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    topics = [f"{topic_prefix}s{n}" for n in range(3)]
    create_topics(kafka_bootstrap, topics, partitions=4)
    fetched: list[tuple[int, int]] = []  # partitions sent, partitions answered

    decisions: list[int] = []  # fetches decided, each as aiokafka decides it

    class Recording(SessionFetcher):
        def _get_actions_per_node(self, assignment: Any) -> Any:
            lean = super()._get_actions_per_node(assignment)
            upstream = Fetcher._get_actions_per_node(self, assignment)
            (_, resets, timeout, metadata, resumes), upstream_timeout = lean, upstream[2]
            assert (resets, metadata, resumes) == (upstream[1], upstream[3], upstream[4])
            assert timeout == pytest.approx(upstream_timeout, abs=0.01)  # a backoff: time-bound
            assert {node: request.wanted for node, request in lean[0]} == {
                node: {
                    TopicPartition(topic, partition): (offset, max_bytes)
                    for topic, partitions in request.topics
                    for partition, offset, max_bytes in partitions
                }
                for node, request in upstream[0]
            }
            decisions.append(len(lean[0]))
            return lean

        def on_session_response(self, node_id: int, request: Any, response: Any) -> None:
            fetched.append((sum(len(p) for _, p in request._topics), len(response.topics)))
            super().on_session_response(node_id, request, response)

    async def scenario() -> list[tuple[str, bytes]]:
        consumer = AIOKafkaConsumer(
            *topics,
            bootstrap_servers=kafka_bootstrap,
            group_id=f"g{uuid.uuid4().hex}",
            auto_offset_reset="earliest",
            fetch_min_bytes=1 << 20,
            fetch_max_wait_ms=20,
        )
        await consumer.start()
        upstream, consumer._fetcher = consumer._fetcher, Recording.for_consumer(consumer)
        await upstream.close()
        producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 0})
        seen: list[tuple[str, bytes]] = []
        try:
            for n in range(60):
                producer.produce(topics[n % 3], f"{n}".encode(), f"k{n % 7}".encode())
                await asyncio.to_thread(producer.flush, 10)
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    seen.extend((r.topic, r.value) for r in records)
            while len(seen) < 60:
                batch = await consumer.getmany(timeout_ms=2000)
                assert batch, f"only {len(seen)} of 60 records read"
                for records in batch.values():
                    seen.extend((r.topic, r.value) for r in records)
        finally:
            await consumer.stop()
        return seen

    seen = asyncio.run(scenario())
    assert sorted(int(value) for _, value in seen) == list(range(60))  # none lost or repeated
    assert sum(decisions) >= len(fetched)  # every fetch answered was checked against aiokafka's
    assert fetched[0][0] == 12  # the opening fetch names every partition
    incremental = fetched[1:]
    assert incremental
    assert max(request for request, _ in incremental) <= 3  # only what moved
    assert sum(request for request, _ in incremental) < 12 * len(incremental) / 4
