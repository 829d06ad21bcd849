"""The dead-letter sink: a bad input is kept whole, with the reason, and counted."""

from __future__ import annotations

import base64
import logging
import time
from typing import Protocol

from schemas import DeadLetter, InvalidEvent, encode
from streams.metrics import WorkerMetrics
from streams.output import Headers, Output
from streams.runtime import InputRecord

log = logging.getLogger(__name__)


class DeadLetters(Protocol):
    """Where bad input goes (``DeadLetterSink``)."""

    async def send(self, message: InputRecord, error: Exception) -> None: ...


class DeadLetterSink:
    """Sends rejected records to ``ops.dead-letter`` keyed by their original key."""

    def __init__(self, output: Output, topic: str, metrics: WorkerMetrics) -> None:
        self._output = output
        self._topic = topic
        self._metrics = metrics

    async def send(self, message: InputRecord, error: Exception) -> None:
        """Dead-letter ``message``: bad input (InvalidEvent) or a processing failure."""
        if isinstance(error, InvalidEvent):
            reason, field = error.reason, error.field
        else:
            reason, field = f"processing failed: {type(error).__name__}: {error}", None
        record = DeadLetter(
            source_topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            error=reason,
            field=field,
            payload=base64.b64encode(message.value or b"").decode("ascii"),
            original_key=base64.b64encode(message.key).decode("ascii") if message.key else None,
            ts=time.time(),
        )
        headers: Headers = [
            ("error.class", type(error).__name__.encode()),
            ("error.message", str(error).encode("utf-8", "replace")[:1024]),
            ("source.topic", message.topic.encode()),
            ("source.partition", str(message.partition).encode()),
            ("source.offset", str(message.offset).encode()),
        ]
        self._metrics.dead_letters.labels(message.topic).inc()
        log.warning(
            "dead-lettered %s[%d]@%d: %s", message.topic, message.partition, message.offset, error
        )
        await self._output.send(self._topic, message.key, encode(record), headers)
