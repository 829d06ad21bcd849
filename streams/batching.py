"""Batches of events that are acknowledged only once they are fully processed.

Agents process events in batches so that per-batch costs (waiting for the broker to confirm
outputs, writing state) are shared. ``batches`` yields whatever is buffered, as soon as the
stream's buffer runs dry or ``max_events`` are collected, so a lone event is processed at
once and a backlog is processed in large batches while Faust keeps filling the buffer.
(Faust's ``take_events`` instead waits up to a timeout for a full batch, and stops filling
the buffer while the agent works.)

A batch's events are acknowledged when the agent asks for the next batch, that is, after it
finished the batch. Faust's ``take_events`` acknowledges a batch even when the agent raised,
the failure mode of faust-streaming#606; here ``crash_on_failure`` stops the worker instead,
the events stay unacknowledged and uncommitted, and a restart reprocesses them. Bad input
never gets that far: agents dead-letter it per event.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import faust
from faust.types import EventT

log = logging.getLogger(__name__)


async def batches(stream: faust.StreamT[Any], max_events: int) -> AsyncIterator[list[EventT[Any]]]:
    """Events in batches of up to ``max_events``: what is buffered, without waiting."""
    buffer = getattr(stream.channel, "queue", None)
    stream.enable_acks = False  # acknowledged below, once the agent took the next batch
    batch: list[EventT[Any]] = []
    async for event in stream.events():
        batch.append(event)
        if len(batch) >= max_events or buffer is None or buffer.empty():
            yield batch
            for done in batch:
                await stream.ack(done)
            batch = []


@contextlib.asynccontextmanager
async def crash_on_failure(app: faust.App) -> AsyncIterator[None]:
    """Stop the worker if the block raises, before anything acknowledges its events."""
    try:
        yield
    except Exception as exc:
        log.critical("batch failed; stopping so that a restart reprocesses it", exc_info=exc)
        await app.crash(exc)
        raise
