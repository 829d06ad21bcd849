"""Batch processing that never acknowledges what it did not finish.

Faust's ``take_events`` acknowledges a batch's events when the batch ends, even when the
agent body raised: the events would be committed and lost (faust-streaming#606 is this
failure mode). ``unfinished_batch_guard`` withholds those acks and crashes the worker
instead, so a restart resumes at the first unfinished event. Bad input never gets here:
agents dead-letter it per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import faust
from faust.types import EventT

log = logging.getLogger(__name__)


def batches(
    stream: faust.StreamT[Any], max_events: int, within_s: float
) -> AsyncIterator[Sequence[EventT[Any]]]:
    """Events in batches of up to ``max_events``, or fewer after ``within_s`` seconds."""
    # Agents are handed a StreamT; take_events lives on the concrete Stream.
    return cast(faust.Stream[Any], stream).take_events(max_events, within_s)


@contextlib.asynccontextmanager
async def unfinished_batch_guard(
    app: faust.App, events: Sequence[EventT[Any]]
) -> AsyncIterator[None]:
    try:
        yield
    except BaseException as exc:
        unacked = getattr(app.consumer, "_unacked_messages", None)
        for event in events:
            # Marked as acked, Faust's ack becomes a no-op and the offset is never committed.
            event.message.acked = True
            if unacked is not None:
                unacked.discard(event.message)
        if not isinstance(exc, asyncio.CancelledError | GeneratorExit):
            log.critical("batch failed; crashing so a restart reprocesses it", exc_info=exc)
            await app.crash(exc)
        raise
