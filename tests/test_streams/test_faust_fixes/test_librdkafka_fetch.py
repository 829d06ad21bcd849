"""aiokafka's consumer with records fetched by librdkafka: everything read once and in
order, positions kept in aiokafka, seeks and pauses obeyed, a cancelled wait loses nothing.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from confluent_kafka import Producer

from streams.faust_fixes.librdkafka_fetch import LibrdkafkaFetcher
from tests.helpers.kafka import create_topics

pytestmark = pytest.mark.integration

PARTITIONS = 3


def produce(bootstrap: str, topic: str, values: Sequence[int]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    for value in values:
        producer.produce(topic, str(value).encode(), partition=value % PARTITIONS)
    assert producer.flush(10) == 0


@asynccontextmanager
async def consumer_of(bootstrap: str, topic: str) -> AsyncIterator[AIOKafkaConsumer]:
    """A group member reading ``topic`` through the librdkafka fetcher, as the worker does."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"g{uuid.uuid4().hex}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=20,
    )
    await consumer.start()
    upstream = consumer._fetcher
    consumer._fetcher = LibrdkafkaFetcher.for_librdkafka(
        consumer, {"bootstrap.servers": bootstrap, "group.id": "unused"}
    )
    await upstream.close()
    try:
        yield consumer
    finally:
        await consumer.stop()


async def positioned(consumer: AIOKafkaConsumer) -> None:
    """Once the group has assigned every partition and aiokafka knows its position."""
    while len(consumer.assignment()) < PARTITIONS:
        await consumer.getmany(timeout_ms=100)
    for tp in consumer.assignment():
        await consumer.position(tp)


async def read(consumer: AIOKafkaConsumer, count: int, *tps: TopicPartition) -> list[int]:
    """``count`` values, in the order handed over; fails if they do not come."""
    values: list[int] = []
    while len(values) < count:
        batch = await consumer.getmany(*tps, timeout_ms=5000)
        assert batch, f"only {len(values)} of {count} records read"
        for tp, records in batch.items():
            assert [r.offset for r in records] == sorted(r.offset for r in records)
            assert consumer._subscription.subscription.assignment.state_value(tp).position == (
                records[-1].offset + 1
            )
            values.extend(int(r.value) for r in records)
    return values


def test_every_record_is_read_once_in_order_and_positions_move_past_it(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}fetched"
    create_topics(kafka_bootstrap, [topic], partitions=PARTITIONS)
    produce(kafka_bootstrap, topic, range(300))

    async def scenario() -> tuple[list[int], list[int | None]]:
        async with consumer_of(kafka_bootstrap, topic) as consumer:
            values = await read(consumer, 300)
            assert not await consumer.getmany(timeout_ms=300)  # nothing read twice
            positions = [await consumer.position(TopicPartition(topic, p)) for p in range(3)]
            return values, positions

    values, positions = asyncio.run(scenario())
    assert sorted(values) == list(range(300))
    for partition in range(PARTITIONS):  # per partition, in produced order
        mine = [v for v in values if v % PARTITIONS == partition]
        assert mine == sorted(mine)
    assert positions == [100, 100, 100]


def test_a_seek_back_reads_again_from_the_new_position(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}seek"
    create_topics(kafka_bootstrap, [topic], partitions=PARTITIONS)
    produce(kafka_bootstrap, topic, range(90))
    tp = TopicPartition(topic, 0)

    async def scenario() -> list[int]:
        async with consumer_of(kafka_bootstrap, topic) as consumer:
            await read(consumer, 90)
            # librdkafka has fetched to the end; the records from offset 10 come again.
            consumer.seek(tp, 10)
            return await read(consumer, 20, tp)

    assert asyncio.run(scenario()) == list(range(30, 90, 3))


def test_a_paused_partition_is_not_handed_over_until_resumed(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}pause"
    create_topics(kafka_bootstrap, [topic], partitions=PARTITIONS)
    paused = TopicPartition(topic, 1)

    async def scenario() -> tuple[list[int], list[int]]:
        async with consumer_of(kafka_bootstrap, topic) as consumer:
            await positioned(consumer)
            consumer.pause(paused)
            await asyncio.to_thread(produce, kafka_bootstrap, topic, range(30))
            while_paused = await read(consumer, 20)
            assert not await consumer.getmany(timeout_ms=500)
            consumer.resume(paused)
            return while_paused, await read(consumer, 10)

    while_paused, after = asyncio.run(scenario())
    assert all(value % PARTITIONS != 1 for value in while_paused)
    assert after == list(range(1, 30, 3))


def test_records_of_a_cancelled_wait_reach_the_next_call(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}cancel"
    create_topics(kafka_bootstrap, [topic], partitions=PARTITIONS)

    async def scenario() -> list[int]:
        async with consumer_of(kafka_bootstrap, topic) as consumer:
            await positioned(consumer)
            waiting = asyncio.create_task(consumer.getmany(timeout_ms=5000))
            await asyncio.sleep(0.02)  # librdkafka's wait (0.1 s at most) has started
            waiting.cancel()
            await asyncio.to_thread(produce, kafka_bootstrap, topic, range(30))
            return await read(consumer, 30)

    assert sorted(asyncio.run(scenario())) == list(range(30))
