"""Kafka client helpers against the real broker."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from config.kafka import consume_ready
from tests.helpers.kafka import create_topics

pytestmark = pytest.mark.integration


def test_a_lone_record_is_handed_over_when_it_arrives_not_at_the_wait_s_end(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}ready"
    create_topics(kafka_bootstrap, [topic], partitions=1)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 0})
    producer.produce(topic, b"first")
    assert producer.flush(10) == 0
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"g{uuid.uuid4().hex}"})
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        started = time.monotonic()
        # A plain consume(500, 20) would return at 20 s: fewer than 500 records exist.
        messages = consume_ready(consumer, 500, 20.0)
        assert time.monotonic() - started < 10.0
        assert [m.value() for m in messages] == [b"first"]
        producer.produce(topic, b"second")
        producer.produce(topic, b"third")
        assert producer.flush(10) == 0
        values: list[bytes | None] = []
        while len(values) < 2:
            values += [m.value() for m in consume_ready(consumer, 500, 20.0, gather_s=0.5)]
        assert values == [b"second", b"third"]
        assert consume_ready(consumer, 500, 0.2) == []  # nothing more: the wait ends
    finally:
        consumer.close()
