"""trainer.runs -> the run-settings table (per-run overrides of any default)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import faust
from pydantic import ValidationError

from schemas import InvalidEvent, RunAnnounced, Topic, decode
from streams.context import ProcessorContext
from streams.state import PartitionedTable, partitioned_table


def register(ctx: ProcessorContext) -> PartitionedTable:
    app = ctx.app
    runs = partitioned_table(
        app,
        "run-settings",
        partitions=ctx.settings.kafka.partitions,
        value_serializer="json",
    )
    topic = app.topic(ctx.topic(Topic.RUNS), key_serializer="raw", value_serializer="raw")
    max_bytes = ctx.settings.worker.max_event_bytes

    async def record_runs(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        async for event in stream.events():
            message = event.message
            try:
                run = decode(RunAnnounced, message.value, max_bytes=max_bytes)
                try:
                    ctx.run_settings.resolve(run.settings)
                except (ValidationError, ValueError) as exc:
                    raise InvalidEvent(str(exc).splitlines()[0], field="settings") from None
            except InvalidEvent as exc:
                await ctx.dead_letters.send(message, exc)
                await ctx.delivered()  # before Faust acks the event
                continue
            runs.put(run.run_id.encode(), dict(run.settings), message.partition)
            yield None

    app.agent(topic, name="record-runs")(record_runs)
    return runs
