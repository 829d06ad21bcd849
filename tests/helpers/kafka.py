"""Small synchronous Kafka helpers (confluent-kafka) for arranging and checking tests."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic  # admin re-exports it implicitly (mypy --strict)

Payload = bytes | str | None


def create_topics(
    bootstrap: str,
    names: Iterable[str],
    partitions: int = 1,
    *,
    config: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> None:
    """Create topics (replication factor 1) and wait until every partition has a leader.

    Existing topics are accepted, so a test can call this unconditionally.
    """
    names = list(names)
    admin = AdminClient({"bootstrap.servers": bootstrap})
    new_topics = [
        NewTopic(name, num_partitions=partitions, replication_factor=1, config=dict(config or {}))
        for name in names
    ]
    futures = admin.create_topics(new_topics, operation_timeout=timeout, request_timeout=timeout)
    for future in futures.values():
        try:
            future.result(timeout)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    deadline = time.monotonic() + timeout
    pending = set(names)
    while pending:
        metadata = admin.list_topics(timeout=max(deadline - time.monotonic(), 0.1))
        for name in list(pending):
            topic = metadata.topics.get(name)
            if (
                topic is not None
                and topic.error is None
                and topic.partitions
                and all(p.leader >= 0 for p in topic.partitions.values())
            ):
                pending.discard(name)
        if pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics without leaders after {timeout}s: {sorted(pending)}")
            time.sleep(0.1)


def produce_records(
    bootstrap: str,
    topic: str,
    records: Iterable[tuple[Payload, Payload]],
    *,
    timeout: float = 30.0,
) -> list[Message]:
    """Produce ``(key, value)`` records, flush, and return them as delivered (with offsets).

    Raises if any record fails delivery, so a test never silently sends nothing.
    """
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    delivered: list[Message] = []
    errors: list[KafkaError] = []

    def on_delivery(error: KafkaError | None, message: Message) -> None:
        if error is not None:
            errors.append(error)
        else:
            delivered.append(message)

    expected = 0
    for key, value in records:
        while True:
            try:
                producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
                break
            except BufferError:  # librdkafka's queue is full: let deliveries drain it
                producer.poll(0.1)
        producer.poll(0)
        expected += 1
    remaining = producer.flush(timeout)
    if errors or remaining:
        raise KafkaException(
            f"produce to {topic!r}: {len(errors)} failed, {remaining} undelivered after "
            f"{timeout}s; first error: {errors[0] if errors else None}"
        )
    assert len(delivered) == expected
    return delivered


def consume_all(
    bootstrap: str, topic: str, expected_count: int, timeout: float = 30.0
) -> list[Message]:
    """Read ``topic`` from the beginning of every partition until ``expected_count`` records.

    Uses manual assignment (no group join, no committed offsets), so it is fast,
    sees every record ever written, and leaves no consumer group state behind.
    Fails the test with the count seen so far if the records do not arrive in time.
    """
    deadline = time.monotonic() + timeout
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"consume-all-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        partitions = _wait_for_partitions(consumer, topic, deadline)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        messages: list[Message] = []
        while len(messages) < expected_count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"expected {expected_count} records on {topic!r}, "
                    f"got {len(messages)} within {timeout}s"
                )
            message = consumer.poll(min(remaining, 0.5))
            if message is None:
                continue
            error = message.error()
            if error is not None:
                raise KafkaException(error)
            messages.append(message)
        return messages
    finally:
        consumer.close()


def _wait_for_partitions(consumer: Consumer, topic: str, deadline: float) -> list[int]:
    while True:
        metadata = consumer.list_topics(topic, timeout=max(deadline - time.monotonic(), 0.1))
        found = metadata.topics.get(topic)
        if found is not None and found.error is None and found.partitions:
            return sorted(found.partitions)
        if time.monotonic() > deadline:
            raise AssertionError(f"topic {topic!r} does not exist (error: {found and found.error})")
        time.sleep(0.1)


def consume_until(
    bootstrap: str,
    topic: str,
    done: Callable[[list[Message]], bool],
    timeout: float = 60.0,
    *,
    to_end: bool = False,
) -> list[Message]:
    """Read ``topic`` from the beginning until ``done(messages)`` holds; fail on timeout.
    With ``to_end``, go on reading to the end the topic had when ``done`` first held, so
    that a record after the awaited one (a second rollback, say) is never missed because a
    fetch happened to stop there."""
    deadline = time.monotonic() + timeout
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"consume-until-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        partitions = _wait_for_partitions(consumer, topic, deadline)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        messages: list[Message] = []
        while not done(messages):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"condition not met on {topic!r} within {timeout}s ({len(messages)} records)"
                )
            for message in consumer.consume(1000, timeout=0.5):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise KafkaException(error)
                messages.append(message)
        if to_end:
            ends = {
                p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                for p in partitions
            }
            while True:
                positions = consumer.position([TopicPartition(topic, p) for p in partitions])
                if all(
                    low == high or position.offset >= high
                    for position, (low, high) in zip(positions, ends.values(), strict=True)
                ):
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"{topic!r} not read to its end within {timeout}s")
                for message in consumer.consume(1000, timeout=0.5):
                    if message.error() is None:
                        messages.append(message)
        return messages
    finally:
        consumer.close()


def set_group_offsets(
    bootstrap: str, group: str, offsets: list[TopicPartition], timeout_s: float
) -> None:
    """Set ``group``'s committed offsets, retrying while the broker refuses: it does so while
    the group has a member (a killed worker's session must end first)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    request = [ConsumerGroupTopicPartitions(group, offsets)]
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = admin.alter_consumer_group_offsets(request)[group].result(timeout=10)
            errors = [tp.error for tp in result.topic_partitions if tp.error is not None]
        except KafkaException as exc:
            errors = [exc.args[0]]
        if not errors:
            return
        assert time.monotonic() < deadline, f"offsets of {group} not set: {errors[0]}"
        time.sleep(0.5)
