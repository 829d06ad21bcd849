"""trainer.metrics -> trainer.reward-stats: each reward normalized over its run's window."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator

import faust
from faust.types import Message

from schemas import RewardStats, StepMetric, Topic, decode
from streams.batching import batches, crash_on_failure
from streams.context import ProcessorContext
from streams.rules.reward_window import RewardWindow
from streams.state import REWARD_WINDOW_CODEC, PartitionedTable, partitioned_table

log = logging.getLogger(__name__)


def register(ctx: ProcessorContext, run_settings: PartitionedTable) -> PartitionedTable:
    app = ctx.app
    worker = ctx.settings.worker
    windows = partitioned_table(
        app,
        "reward-windows",
        partitions=ctx.settings.kafka.partitions,
        value_serializer=REWARD_WINDOW_CODEC,
    )
    topic = app.topic(ctx.topic(Topic.METRICS), key_serializer="raw", value_serializer="raw")

    def window_for(run_key: bytes) -> RewardWindow:
        capacity = ctx.run_settings.resolve(run_settings.get(run_key)).reward.window_size
        window: RewardWindow | None = windows.get(run_key)
        if window is None:
            return RewardWindow(capacity)
        window.resize(capacity)
        return window

    def normalize(
        message: Message, touched: dict[bytes, tuple[RewardWindow, int]]
    ) -> RewardStats | None:
        metric = decode(StepMetric, message.value, max_bytes=worker.max_event_bytes)
        if not math.isfinite(metric.reward):
            # Kept out of the window so one bad step cannot poison 1,000 others;
            # the anomaly detector acts on it.
            log.info("run %s step %d: non-finite reward", metric.run_id, metric.step)
            return None
        run_key = metric.run_id.encode()
        window = touched[run_key][0] if run_key in touched else window_for(run_key)
        touched[run_key] = (window, message.partition)
        stats = window.add(metric.reward, step=metric.step, attempt=metric.attempt)
        if stats is None:
            return None  # a duplicate step: replays are harmless
        return RewardStats(
            run_id=metric.run_id,
            step=metric.step,
            reward=stats.reward,
            normalized_reward=stats.normalized_reward,
            mean=stats.mean,
            std=stats.std,
            count=stats.count,
            ts=ctx.now(),
        )

    async def normalize_rewards(stream: faust.StreamT[bytes]) -> AsyncIterator[int]:
        async for events in batches(stream, worker.batch_max_events):
            async with crash_on_failure(app):
                touched: dict[bytes, tuple[RewardWindow, int]] = {}
                for event in events:
                    try:
                        result = normalize(event.message, touched)
                    except Exception as exc:  # bad input or a value no rule can express
                        await ctx.dead_letters.send(event.message, exc)
                        continue
                    if result is not None:
                        await ctx.forward(result)
                # Outputs first, then the state that implies them: a crash between the two
                # replays the batch against the old state instead of skipping lost outputs.
                await ctx.delivered()
                for run_key, (window, partition) in touched.items():
                    windows.put(run_key, window, partition)
            yield len(events)

    app.agent(topic, name="normalize-rewards")(normalize_rewards)
    return windows
