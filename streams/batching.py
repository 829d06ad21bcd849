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
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

import faust
from faust.types import EventT, Message

if TYPE_CHECKING:
    from streams.context import ProcessorContext

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


class BatchHandler(Protocol):
    """One agent's part of a batch: each message, then the state the batch changed."""

    async def on_message(self, message: Message) -> None: ...

    def write_state(self) -> None:
        """Write the state the batch changed (called once its outputs are on the broker)."""
        ...


def register_batch_agent(
    ctx: ProcessorContext,
    channel: faust.TopicT,
    *,
    name: str,
    new_batch: Callable[[], BatchHandler],
    lock: asyncio.Lock | None = None,
) -> None:
    """The one batch loop every agent runs.

    Per batch (under ``lock`` when given): each message through the handler, bad input
    dead-lettered with the batch going on; then the outputs are awaited on the broker, and
    only then the state that implies them is written, so a crash between the two replays
    the batch against the old state instead of skipping lost outputs. A batch that fails
    otherwise is never acknowledged (``unfinished_batch_guard``).
    """
    app, worker = ctx.app, ctx.settings.worker
    held = lock if lock is not None else contextlib.nullcontext()

    async def agent(stream: faust.StreamT[bytes]) -> AsyncIterator[int]:
        serial = 0
        async for events in batches(stream, worker.batch_max_events, worker.batch_within_s):
            started = time.perf_counter()
            serial += 1
            ctx.running_batches[name] = serial
            async with unfinished_batch_guard(app, events), held:
                handler = new_batch()
                for event in events:
                    try:
                        await handler.on_message(event.message)
                    except Exception as exc:  # bad input, or a value no rule can express
                        await ctx.dead_letters.send(event.message, exc)
                await ctx.delivered()
                handler.write_state()
            del ctx.running_batches[name]
            ctx.observe_batch(name, (event.message.topic for event in events), started)
            yield len(events)

    app.agent(channel, name=name)(agent)
