"""Agent state: live objects in memory, checkpointed to Faust tables' changelogs at commits.

Faust does what it does well for a table: it declares the compacted changelog topic (with
``worker.changelog_topic_configs``), assigns its partitions with the input partitions they
are co-partitioned with, and rebuilds the table from the changelog when this worker takes a
partition (standby replicas included). Writes do not go through Faust's table API (a
``table[key] = value`` is one aiokafka send, tens of microseconds of Python, per key per
batch): the runtime writes each changed key once per checkpoint through ``StateWriter``, a
librdkafka producer, into the same changelog partition Faust recovers from (the source
event's), and mirrors the value into the table's in-memory store.

Every value is bytes (the tables' serializers are raw): the owner of a table encodes and
decodes its own objects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import faust
from aiokafka.partitioner import murmur2
from confluent_kafka import KafkaError, Producer

from config.kafka import confluent_config
from config.settings import Settings
from streams.output import flushed


def key_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default (murmur2) partitioner gives ``key``, as the SDKs'
    producers and Faust use: where a key's events, and so its state, are."""
    return (int(murmur2(key)) & 0x7FFFFFFF) % partitions


class StateDeliveryError(RuntimeError):
    """A checkpoint's state did not reach the changelog: its offsets must not be committed."""


class StateStore(Protocol):
    """One keyed state store, bytes to bytes: what an agent reads its stored state from and
    hands to a ``StateSink`` to write. ``StateTable`` is the worker's; a test's can be a
    dict."""

    @property
    def name(self) -> str: ...
    @property
    def changelog_topic(self) -> str: ...
    def get(self, key: bytes) -> bytes | None: ...
    def keys(self) -> list[bytes]: ...
    def mirror(self, key: bytes, value: bytes | None) -> None:
        """Set the value reads see once the write is durable (None: the key is gone)."""
        ...


class StateSink(Protocol):
    """Where an agent writes its changed state at a checkpoint (``StateWriter``)."""

    def put(self, table: StateStore, key: bytes, value: bytes, partition: int) -> None: ...
    def delete(self, table: StateStore, key: bytes, partition: int) -> None: ...


OpenStore = Callable[[str], StateStore]
"""Opens the named state store of an agent (each name opened once, by one agent)."""


class StateTable:
    """One keyed state store: a Faust table for its changelog and recovery, bytes values."""

    def __init__(self, app: faust.App, name: str, settings: Settings) -> None:
        self.name = name
        self._table: faust.Table[bytes, bytes] = faust.Table(
            app,
            name=name,
            default=None,
            beacon=app.tables.beacon,
            partitions=settings.kafka.partitions,
            extra_topic_configs=settings.worker.changelog_topic_configs,
        )
        # Bytes in, bytes out (Faust would derive serializers from key and value models).
        self._table.key_serializer = "raw"
        self._table.value_serializer = "raw"
        app.tables.add(self._table)

    @property
    def changelog_topic(self) -> str:
        return self._table.changelog_topic.get_topic_name()

    def get(self, key: bytes) -> bytes | None:
        value: bytes | None = self._table.data.get(key)
        return value

    def keys(self) -> list[bytes]:
        return list(self._table.data.keys())

    def mirror(self, key: bytes, value: bytes | None) -> None:
        """Set the in-memory value Faust's recovery would have rebuilt from the changelog
        (None: a tombstone, the key is gone)."""
        if value is None:
            self._table.data.pop(key, None)
        else:
            self._table.data[key] = value


class StateWriter:
    """Writes checkpointed state to changelogs (librdkafka, idempotent, acks=all).

    Only checkpoints produce here, so ``delivered`` (a flush) ends once they are out, even
    while the agents go on producing outputs on their own producer.
    """

    def __init__(self, settings: Settings) -> None:
        worker = settings.worker
        config: dict[str, Any] = {
            **confluent_config(settings.kafka),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 0,
            "compression.type": worker.output_compression,
            "delivery.report.only.error": True,
            "on_delivery": self._on_delivery,
        }
        if settings.kafka.embedded_broker:
            config["batch.num.messages"] = worker.embedded_producer_max_batch_size
        self._producer = Producer(config, logger=logging.getLogger("streams.librdkafka"))
        self._timeout_s = worker.output_flush_timeout_s
        self._failures: list[KafkaError] = []

    def _on_delivery(self, error: KafkaError | None, _message: Any) -> None:
        if error is not None:
            self._failures.append(error)

    def put(self, table: StateStore, key: bytes, value: bytes, partition: int) -> None:
        self._producer.produce(table.changelog_topic, value, key, partition=partition)
        table.mirror(key, value)

    def delete(self, table: StateStore, key: bytes, partition: int) -> None:
        """A tombstone: Faust's recovery (and standbys) drop the key, compaction its history."""
        self._producer.produce(table.changelog_topic, None, key, partition=partition)
        table.mirror(key, None)

    async def delivered(self) -> None:
        """Wait until every state record written so far is on the broker."""
        problem = await flushed([self._producer], self._timeout_s, self)
        if problem:
            raise StateDeliveryError(f"state records: {problem}")

    def take_failures(self) -> list[KafkaError]:
        failures, self._failures = self._failures, []
        return failures


def state_tables(app: faust.App, settings: Settings) -> OpenStore:
    """The worker's ``OpenStore``: each name a ``StateTable`` of ``app``."""

    def open_table(name: str) -> StateStore:
        return StateTable(app, name, settings)

    return open_table
