"""The worker's output producer: confluent-kafka (librdkafka), not Faust's aiokafka producer.

Outputs (reward-stats, commands, control events, dead letters, re-keyed ratings) are the hot
path: librdkafka enqueues a record in about a microsecond where aiokafka spends tens of
microseconds of Python per record. Keys are partitioned with Java's murmur2, as Faust and
the SDKs do. Only failed deliveries come back as reports (``delivery.report.only.error``):
a successful record costs no Python callback.

Compression is per topic (``worker.output_topic_compression``): the topics clients in any
language read leave uncompressed or gzip-compressed, the rest as ``worker.output_compression``.
librdkafka compresses per producer, so there is one producer per codec in use, connected at
the worker's start (``connect``); a topic always goes through the same one, so its records
keep their order.

Outputs leave as soon as librdkafka batches them (``worker.output_linger_ms``); nothing
waits for them per batch. A checkpoint (``streams.runtime``) waits for every output sent so
far (``delivered``) before it writes the state that implies them, and offsets are committed
only after that state: a crash replays what any lost output came from.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from functools import partial
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, Producer

from config.kafka import JAVA_COMPATIBLE_PARTITIONER, confluent_config
from config.settings import Codec, Settings
from schemas import Topic, topic_name

log = logging.getLogger(__name__)

Headers = list[tuple[str, str | bytes | None]]
_FULL_QUEUE_WAIT_S = 0.001
# gzip at level 1: 200,000 reward-stats records cost 0.62 s of CPU to send, against 1.15 s at
# librdkafka's default level (lz4: 0.31 s; uncompressed: 0.51 s, the larger requests).
_LEVELS: dict[Codec, dict[str, int]] = {"gzip": {"compression.level": 1}}


class OutputDeliveryError(RuntimeError):
    """Outputs could not be delivered; the state implying them must not be written."""


class Output(Protocol):
    """Where an agent's outputs go (``OutputProducer``; a test's records them)."""

    async def send(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers | None = None
    ) -> None:
        """Send one record; raise ``OutputDeliveryError`` when it cannot be sent."""
        ...


class OutputProducer:
    def __init__(self, settings: Settings) -> None:
        worker = settings.worker
        prefix = settings.kafka.topic_prefix
        self._flush_timeout_s = worker.output_flush_timeout_s
        self._config: dict[str, Any] = {
            **confluent_config(settings.kafka),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": worker.output_linger_ms,
            "partitioner": JAVA_COMPATIBLE_PARTITIONER,
            "queue.buffering.max.messages": 1_000_000,
            "delivery.report.only.error": True,
            "on_delivery": self._on_delivery,
        }
        self._default_codec: Codec = worker.output_compression
        self._topic_codecs: dict[str, Codec] = {
            topic_name(Topic(name), prefix): codec
            for name, codec in worker.output_topic_compression.items()
        }
        self._by_codec: dict[Codec, Producer] = {}
        self._by_topic: dict[str, Producer] = {}
        self._failures: list[KafkaError] = []

    async def connect(self, topics: Iterable[str], timeout_s: float = 10.0) -> None:
        """Make the producers of ``topics`` and load their metadata. Made on a topic's first
        record instead, a producer's connection and metadata requests held back the first
        outputs (e.g. every model's first downshift) by hundreds of ms.

        The producers are made here, on the loop: ``send`` and ``serve`` read the same maps
        meanwhile, and a producer made in another thread once changed ``serve``'s map under
        its iteration (the batch failed) and could leave a codec with two producers, one of
        them never flushed by ``delivered``. Only the metadata requests, which block, run in
        threads.
        """
        loop = asyncio.get_running_loop()
        producers = {topic: self._producer(topic) for topic in topics}
        for topic, producer in producers.items():
            try:
                await loop.run_in_executor(None, partial(producer.list_topics, topic, timeout_s))
            except KafkaException as exc:  # not fatal: the first record retries
                log.warning("output topic %s not ready yet: %s", topic, exc)

    def codec(self, topic: str) -> Codec:
        """The compression records sent to ``topic`` (a broker-side name) leave with."""
        return self._topic_codecs.get(topic, self._default_codec)

    def _producer(self, topic: str) -> Producer:
        producer = self._by_topic.get(topic)
        if producer is None:
            codec = self.codec(topic)
            producer = self._by_codec.get(codec)
            if producer is None:
                producer = Producer(
                    {**self._config, "compression.type": codec, **_LEVELS.get(codec, {})},
                    logger=logging.getLogger("streams.librdkafka"),
                )
                self._by_codec[codec] = producer
            self._by_topic[topic] = producer
        return producer

    def _on_delivery(self, error: KafkaError | None, _message: Any) -> None:
        if error is not None:  # only failures are reported
            self._failures.append(error)

    async def send(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers | None = None
    ) -> None:
        """Enqueue one record; waits (without blocking the loop) only when the queue is full."""
        try:
            self._producer(topic).produce(topic, value, key, headers=headers)
        except BufferError:
            await self._send_when_room(topic, key, value, headers)

    async def _send_when_room(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers | None
    ) -> None:
        producer = self._producer(topic)
        deadline = time.monotonic() + self._flush_timeout_s
        while True:
            producer.poll(0)
            await asyncio.sleep(_FULL_QUEUE_WAIT_S)
            try:
                producer.produce(topic, value, key, headers=headers)
                return
            except BufferError:
                if time.monotonic() > deadline:
                    raise OutputDeliveryError(
                        f"output queue still full after {self._flush_timeout_s}s"
                    ) from None

    def serve(self) -> None:
        """Serve librdkafka's queued reports (failures only) without waiting."""
        for producer in self._by_codec.values():
            producer.poll(0)

    async def delivered(self) -> None:
        """Wait until every record sent so far is acknowledged by the broker.

        Callers hold every agent's lock (nothing is sent meanwhile), so the flush ends.
        """
        problem = await flushed(list(self._by_codec.values()), self._flush_timeout_s, self)
        if problem:
            raise OutputDeliveryError(f"outputs: {problem}")

    def take_failures(self) -> list[KafkaError]:
        failures, self._failures = self._failures, []
        return failures


class _Failures(Protocol):
    def take_failures(self) -> list[KafkaError]:
        """The delivery failures reported since the last call."""
        ...


async def flushed(producers: Iterable[Producer], timeout_s: float, reports: _Failures) -> str:
    """Flush ``producers`` together off the event loop; what went wrong, with every delivery
    failure reported up to the end of the flush (empty: everything is on the broker).

    The failures are taken after the flush: librdkafka reports a delivery (its callback)
    only inside poll or flush, so a record that failed since the last poll is reported by
    this very flush and must fail it.
    """
    loop = asyncio.get_running_loop()
    remaining = sum(
        await asyncio.gather(
            *(loop.run_in_executor(None, producer.flush, timeout_s) for producer in producers)
        )
    )
    failures = reports.take_failures()
    if not remaining and not failures:
        return ""
    return (
        f"{remaining} undelivered after {timeout_s}s, {len(failures)} failed "
        f"(first: {failures[0] if failures else None})"
    )
