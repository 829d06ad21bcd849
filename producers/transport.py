"""How SDK clients reach Kafka: an injectable transport.

``KafkaTransport`` is the real one (confluent-kafka: idempotent, batching, compressed,
Java-compatible key partitioning). ``InMemoryTransport`` keeps records in process so
client code is usable and testable without a broker.

Neither ever blocks or raises into the caller because Kafka is unreachable: the producer
buffers up to a bound, then drops and counts; the command reader logs and retries.

A reader made with ``latest_only`` is for a value where only the newest counts (the run's
reward statistics): it starts at the end of the partition whatever was committed (no
history is read), keeps only the newest record of its key until ``poll`` takes it, and
prefetches at most ``_LATEST_PREFETCH_KB``; its caller does not commit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import (
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from config.kafka import JAVA_COMPATIBLE_PARTITIONER, confluent_config, consume_ready, redacted
from config.settings import Settings

log = logging.getLogger(__name__)
_librdkafka_log = logging.getLogger("producers.librdkafka")
# A reader waits at most this long on Kafka at a time, so close() stops it about as fast.
_METADATA_TIMEOUT_S = 1.0
_POLL_TIMEOUT_S = 0.2
_CONSUME_BATCH = 500
_LATEST_PREFETCH_KB = 1024


RecordHeaders = tuple[tuple[str, bytes | None], ...]
"""A record's headers as Kafka keeps them: ordered, names may repeat, values may be null."""


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    key: bytes
    value: bytes
    offset: int = -1
    headers: RecordHeaders = ()


@dataclass
class DeliveryStats:
    """What happened to what the caller published: counters, never exceptions."""

    produced: int = 0
    delivered: int = 0
    dropped_queue_full: int = 0
    failed_delivery: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_queue_full + self.failed_delivery


class CommandReader(Protocol):
    """Reads one run's records from one keyed topic, resuming after the last commit."""

    def poll(self) -> list[Record]: ...

    def commit(self, record: Record) -> None: ...

    def wait_caught_up(self, timeout_s: float) -> bool:
        """Wait until every record present at start is in ``poll``'s hands; False on timeout."""
        ...

    def close(self) -> None: ...


class Transport(Protocol):
    stats: DeliveryStats

    def produce(self, topic: str, key: bytes, value: bytes) -> None: ...

    def flush(self, timeout_s: float) -> int: ...

    def reader(
        self, topic: str, key: bytes, group_id: str, *, latest_only: bool = False
    ) -> CommandReader: ...

    def close(self, timeout_s: float) -> int: ...


class _Throttled:
    """Each warning at most once per interval, so an outage does not flood the logs."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self._interval_s = interval_s
        self._last: dict[str, float] = {}

    def __call__(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(message, -self._interval_s) >= self._interval_s:
            self._last[message] = now
            log.warning(message, *args)


class KafkaTransport:
    """confluent-kafka producer plus per-run command readers."""

    def __init__(self, settings: Settings, *, extra_config: dict[str, Any] | None = None) -> None:
        self._settings = settings
        self._base = confluent_config(settings.kafka)
        sdk = settings.sdk
        config = {
            **self._base,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": sdk.linger_ms,
            "compression.type": sdk.compression,
            "partitioner": JAVA_COMPATIBLE_PARTITIONER,
            "queue.buffering.max.messages": sdk.queue_max_messages,
            **(extra_config or {}),
        }
        log.debug("producer config: %s", redacted(config))
        self.stats = DeliveryStats()
        self._warn = _Throttled()
        # librdkafka's own log lines go through Python logging, not straight to stderr.
        self._producer = Producer(config, error_cb=self._on_error, logger=_librdkafka_log)

    def _on_error(self, error: KafkaError) -> None:
        self._warn("kafka unreachable or failing (events are buffered): %s", error.str())

    def _on_delivery(self, error: KafkaError | None, _message: Message) -> None:
        if error is None:
            self.stats.delivered += 1
        else:
            self.stats.failed_delivery += 1
            self._warn("event not delivered and dropped: %s", error.str())

    def produce(self, topic: str, key: bytes, value: bytes) -> None:
        try:
            self._producer.produce(topic, value, key, on_delivery=self._on_delivery)
            self.stats.produced += 1
        except BufferError:
            self.stats.dropped_queue_full += 1
            self._warn(
                "local buffer full (%d events): dropping; is Kafka down?",
                self._settings.sdk.queue_max_messages,
            )
        except KafkaException as exc:
            self.stats.failed_delivery += 1
            self._warn("event rejected by the client and dropped: %s", exc)
        self._producer.poll(0)

    def flush(self, timeout_s: float) -> int:
        return int(self._producer.flush(timeout_s))

    def reader(
        self, topic: str, key: bytes, group_id: str, *, latest_only: bool = False
    ) -> CommandReader:
        return _KafkaKeyReader(self._base, topic, key, group_id, latest_only=latest_only)

    def close(self, timeout_s: float) -> int:
        remaining = self.flush(timeout_s)
        if remaining:
            log.warning("closing with %d events undelivered", remaining)
        return remaining


class _KafkaKeyReader:
    """A background thread reads one key's partition; poll() hands records over.

    The partition is found with the same murmur2 partitioner the producers use; records
    with other keys on that partition are skipped. Offsets are committed once the caller
    has handled a record, so a restarted trainer resumes after its last handled one. Only
    the reader thread touches the consumer (librdkafka calls from two threads at once
    deadlocked here); ``commit`` just leaves the offset for it.
    """

    def __init__(
        self,
        base: dict[str, Any],
        topic: str,
        key: bytes,
        group_id: str,
        *,
        latest_only: bool = False,
    ) -> None:
        self._topic = topic
        self._key = key
        self._latest_only = latest_only
        config: dict[str, Any] = {
            **base,
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
        }
        if latest_only:
            config["queued.max.messages.kbytes"] = _LATEST_PREFETCH_KB
        self._consumer = Consumer(config, logger=_librdkafka_log)
        self._caught_up = threading.Event()
        self._buffer: list[Record] = []
        self._partition_number = -1
        self._to_commit: int | None = None  # next offset to commit, left by commit()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._warn = _Throttled()
        self._thread = threading.Thread(
            target=self._run, name=f"reader-{topic}-{key.decode(errors='replace')}", daemon=True
        )
        self._thread.start()

    def _partition(self) -> int:
        from producers.partitioning import partition_for_key

        metadata = self._consumer.list_topics(self._topic, timeout=_METADATA_TIMEOUT_S)
        partitions = metadata.topics[self._topic].partitions
        if not partitions:
            raise KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))
        return partition_for_key(self._key, len(partitions))

    def _run(self) -> None:
        assigned = False
        while not self._stopped.is_set():
            try:
                if not assigned:
                    self._partition_number = self._partition()
                    self._consumer.assign([self._start()])
                    assigned = True
                self._commit_pending()
                messages = consume_ready(self._consumer, _CONSUME_BATCH, _POLL_TIMEOUT_S)
            except (KafkaException, KeyError) as exc:
                self._warn("command reader for %s waiting for Kafka: %s", self._topic, exc)
                self._stopped.wait(_METADATA_TIMEOUT_S)
                continue
            mine: list[Message] = []
            for message in messages:
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        self._caught_up.set()
                    else:
                        self._warn("command reader error: %s", error.str())
                    continue
                if message.key() != self._key:
                    continue
                mine.append(message)
            if self._latest_only:
                mine = mine[-1:]
            taken = [
                Record(
                    self._topic,
                    self._key,
                    message.value() or b"",
                    message.offset() or 0,
                    _headers(message),
                )
                for message in mine
            ]
            if not taken:
                continue
            with self._lock:
                if self._latest_only:
                    self._buffer = taken
                else:
                    self._buffer.extend(taken)

    def _start(self) -> TopicPartition:
        if self._latest_only:
            return TopicPartition(self._topic, self._partition_number, OFFSET_END)
        return TopicPartition(self._topic, self._partition_number)  # the committed offset

    def poll(self) -> list[Record]:
        with self._lock:
            records, self._buffer = self._buffer, []
        return records

    def commit(self, record: Record) -> None:
        with self._lock:
            self._to_commit = record.offset + 1

    def wait_caught_up(self, timeout_s: float) -> bool:
        return self._caught_up.wait(timeout_s)

    def _commit_pending(self, asynchronous: bool = True) -> None:
        with self._lock:
            offset, self._to_commit = self._to_commit, None
        if offset is None or self._partition_number < 0:
            return
        try:
            offsets = [TopicPartition(self._topic, self._partition_number, offset)]
            if asynchronous:
                self._consumer.commit(offsets=offsets, asynchronous=True)
            else:
                self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            self._warn("could not commit command offset (will re-read, ids dedupe): %s", exc)

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5.0)
        if not self._thread.is_alive():  # now this thread may use the consumer
            self._commit_pending(asynchronous=False)
            self._consumer.close()


def _headers(message: Message) -> RecordHeaders:
    headers = message.headers() or ()
    pairs = headers.items() if isinstance(headers, dict) else headers
    return tuple(
        (name, value.encode() if isinstance(value, str) else value) for name, value in pairs
    )


@dataclass
class InMemoryTransport:
    """An in-process stand-in for Kafka: records are kept per topic, in order.

    Tests and notebooks publish through it and read ``records(topic)``; a test plays the
    worker by calling ``deliver(topic, key, value, headers)`` to hand records to readers.
    """

    stats: DeliveryStats = field(default_factory=DeliveryStats)
    _topics: dict[str, list[Record]] = field(default_factory=lambda: defaultdict(list))
    _committed: dict[tuple[str, bytes, str], int] = field(default_factory=dict)
    on_produce: Callable[[Record], None] | None = None

    def produce(self, topic: str, key: bytes, value: bytes) -> None:
        records = self._topics[topic]
        record = Record(topic, key, value, len(records))
        records.append(record)
        self.stats.produced += 1
        self.stats.delivered += 1
        if self.on_produce is not None:
            self.on_produce(record)

    def deliver(self, topic: str, key: bytes, value: bytes, headers: RecordHeaders = ()) -> None:
        """Append a record as if another party (the worker) had produced it."""
        records = self._topics[topic]
        records.append(Record(topic, key, value, len(records), tuple(headers)))

    def records(self, topic: str) -> list[Record]:
        return list(self._topics[topic])

    def flush(self, timeout_s: float) -> int:
        return 0

    def reader(
        self, topic: str, key: bytes, group_id: str, *, latest_only: bool = False
    ) -> CommandReader:
        return _InMemoryReader(self, topic, key, group_id, latest_only)

    def close(self, timeout_s: float) -> int:
        return 0


@dataclass
class _InMemoryReader:
    transport: InMemoryTransport
    topic: str
    key: bytes
    group_id: str
    latest_only: bool = False
    _position: int = -1

    def __post_init__(self) -> None:
        if self.latest_only:
            self._position = len(self.transport._topics[self.topic])
        else:
            committed = self.transport._committed
            self._position = committed.get((self.topic, self.key, self.group_id), 0)

    def poll(self) -> list[Record]:
        records = self.transport._topics[self.topic][self._position :]
        self._position += len(records)
        mine = [record for record in records if record.key == self.key]
        return mine[-1:] if self.latest_only else mine

    def commit(self, record: Record) -> None:
        self.transport._committed[(self.topic, self.key, self.group_id)] = record.offset + 1

    def wait_caught_up(self, timeout_s: float) -> bool:
        return True

    def close(self) -> None:
        pass
