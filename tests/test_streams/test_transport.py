"""The worker's transport against the real broker: records Faust fetched are never skipped.

Each test runs a one-agent ``WorkerApp`` in this process and puts its consumer in the
state a fault leaves it in (how it gets there is in ``streams/transport.py``'s docstring),
then checks that every record is still delivered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

import pytest
from confluent_kafka import Producer
from faust.transport.consumer import Consumer
from faust.types import TP

from streams.transport import WorkerApp
from tests.helpers.kafka import create_topics

pytestmark = pytest.mark.integration

BATCH = 10


def produce(bootstrap: str, topic: str, count: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for index in range(count):
        producer.produce(topic, key=b"k", value=str(index).encode())
    assert producer.flush(10) == 0


async def eventually(condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def consumer(app: WorkerApp) -> Consumer:
    return cast(Consumer, app.consumer)  # the base class, which keeps the offsets


def run_app(
    bootstrap: str,
    topic_prefix: str,
    data_dir: Path,
    fault: Callable[[WorkerApp, TP], Awaitable[None]],
    *,
    commits: bool,
) -> list[int]:
    """Deliver a batch, inject ``fault``, deliver another; return the offsets the agent saw.

    ``commits``: whether the consumer commits (after every record), or never.
    """
    topic = f"{topic_prefix}inputs"
    create_topics(bootstrap, [topic])
    app = WorkerApp(
        f"app-{topic}",
        broker=f"kafka://{bootstrap}",
        store="memory://",
        datadir=str(data_dir),
        topic_partitions=1,
        consumer_auto_offset_reset="earliest",
        broker_commit_every=1 if commits else 10**9,
        broker_commit_interval=0.1 if commits else 3600.0,
        web_enabled=False,
        key_serializer="raw",
        value_serializer="raw",
    )
    seen: list[int] = []

    @app.agent(app.topic(topic, partitions=1))
    async def record(stream):  # type: ignore[no-untyped-def]  # Faust's agent protocol
        async for event in stream.events():
            seen.append(event.message.offset)

    tp = TP(topic, 0)

    async def scenario() -> None:
        await app.start()
        try:
            await asyncio.to_thread(produce, bootstrap, topic, BATCH)
            await eventually(lambda: len(seen) == BATCH, "the first batch")
            if commits:
                await eventually(
                    lambda: consumer(app)._committed_offset.get(tp) == BATCH, "its commit"
                )
            await fault(app, tp)
            await asyncio.to_thread(produce, bootstrap, topic, BATCH)
            await eventually(lambda: 2 * BATCH - 1 in seen, "the second batch", 20)
        finally:
            await app.stop()

    asyncio.run(scenario())
    return seen


def test_records_below_a_stale_read_offset_are_delivered(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    async def stale_read_offset(app: WorkerApp, tp: TP) -> None:
        # What the delivery that outlived a rebalance writes after the seek back: an offset
        # past records not yet processed (Faust's drain loop would skip up to it).
        consumer(app)._read_offset[tp] = BATCH + BATCH // 2

    seen = run_app(kafka_bootstrap, topic_prefix, tmp_path, stale_read_offset, commits=True)
    assert seen == list(range(2 * BATCH))


def test_a_partition_never_committed_is_read_again_from_its_beginning(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    async def seek_back(app: WorkerApp, tp: TP) -> None:
        # Faust's own answer to records it dropped: seek back to the committed offsets.
        await app.consumer.perform_seek()

    seen = run_app(kafka_bootstrap, topic_prefix, tmp_path, seek_back, commits=False)
    first, second = list(range(BATCH)), list(range(BATCH, 2 * BATCH))
    assert seen == first + first + second


def test_records_cleared_from_the_buffers_are_read_again_before_newer_ones(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    async def clear_buffers(app: WorkerApp, tp: TP) -> None:
        # What Faust's recovery does last (``Recovery._resume_streams``): resuming the flow
        # clears the streams' buffers, whatever was fetched into them.
        app.flow_control.resume()

    seen = run_app(kafka_bootstrap, topic_prefix, tmp_path, clear_buffers, commits=False)
    first, second = list(range(BATCH)), list(range(BATCH, 2 * BATCH))
    assert seen == first + first + second  # read again from the commit (none: the start)
