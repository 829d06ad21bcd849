"""The trainer.* topics -> reward statistics and training commands, in one agent.

One agent reads ``trainer.runs``, ``trainer.metrics``, ``trainer.checkpoints`` and
``trainer.acks`` (all keyed by run id, so co-partitioned): each metric passes through
Faust once and feeds both the reward window and the run's operations. Per event it decodes,
calls a rule, and forwards; per batch it waits for the outputs to be acknowledged and then
writes each touched run's state once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from faust.types import Message
from pydantic import ValidationError

from fragrance_ops.settings import Settings
from schemas import (
    CheckpointSaved,
    CommandAck,
    InvalidEvent,
    RewardStats,
    RunAnnounced,
    StepMetric,
    Topic,
    decode,
)
from schemas.signing import SIGNATURE_REJECTIONS
from streams.batching import register_batch_agent
from streams.context import ProcessorContext
from streams.live import input_origin
from streams.rules.reward_window import RewardWindow
from streams.rules.training import RunOperations
from streams.state import REWARD_WINDOW_CODEC, PartitionedTable, partitioned_table

log = logging.getLogger(__name__)

Handler = Callable[[Message, "_Batch"], Awaitable[None]]

HYPERPARAMETER_NAMES = ("entropy_coef", "learning_rate", "clip_epsilon")
RL_GAUGE_NAMES = ("loss", "policy_loss", "value_loss", "reward", "entropy", "entropy_coef")


@dataclass
class TrainingTables:
    run_settings: PartitionedTable  # run id -> per-run overrides (dict)
    windows: PartitionedTable  # run id -> RewardWindow
    operations: PartitionedTable  # run id -> RunOperations state (JSON bytes)


@dataclass
class _Batch:
    """Runs touched by one batch, loaded once, written back once."""

    ctx: ProcessorContext
    tables: TrainingTables
    handlers: dict[str, Handler]
    partitions: dict[bytes, int] = field(default_factory=dict)
    windows: dict[bytes, RewardWindow] = field(default_factory=dict)
    operations: dict[bytes, RunOperations] = field(default_factory=dict)
    overrides: dict[bytes, dict[str, Any]] = field(default_factory=dict)
    latest: dict[str, StepMetric] = field(default_factory=dict)  # run id -> newest metric

    def settings(self, run_key: bytes) -> Settings:
        overrides = self.overrides.get(run_key, self.tables.run_settings.get(run_key))
        return self.ctx.run_settings.resolve(overrides)

    def window(self, run_key: bytes, partition: int) -> RewardWindow:
        self.partitions[run_key] = partition
        window = self.windows.get(run_key)
        if window is None:
            capacity = self.settings(run_key).reward.window_size
            window = self.tables.windows.get(run_key) or RewardWindow(capacity)
            window.resize(capacity)
            self.windows[run_key] = window
        return window

    def run_operations(self, run_key: bytes, partition: int) -> RunOperations:
        self.partitions[run_key] = partition
        ops = self.operations.get(run_key)
        if ops is None:
            run_id, settings = run_key.decode(), self.settings(run_key)
            stored = self.tables.operations.get(run_key)
            ops = (
                RunOperations.from_state(run_id, orjson.loads(stored), settings)
                if stored is not None
                else RunOperations(run_id, settings)
            )
            self.operations[run_key] = ops
        return ops

    def apply_settings(self, run_key: bytes) -> None:
        """Carry state already loaded in this batch over to the run's new settings."""
        settings = self.settings(run_key)
        if run_key in self.windows:
            self.windows[run_key].resize(settings.reward.window_size)
        ops = self.operations.get(run_key)
        if ops is not None:
            self.operations[run_key] = RunOperations.from_state(
                ops.run_id, ops.to_state(), settings
            )

    async def on_message(self, message: Message) -> None:
        await self.handlers[message.topic](message, self)

    def write_state(self) -> None:
        self.write()
        self.export_metrics()

    def export_metrics(self) -> None:
        """The newest values of each run in this batch: the per-run training gauges, and
        the hyperparameters the feedback agent's proposals start from."""
        metrics = self.ctx.metrics
        for run_id, metric in self.latest.items():
            hyperparameters = {
                name: value
                for name in HYPERPARAMETER_NAMES
                if (value := getattr(metric, name)) is not None
            }
            if hyperparameters:
                self.ctx.hyperparameters[run_id] = hyperparameters
            label = metrics.run_label(run_id)
            for name in RL_GAUGE_NAMES:
                value = getattr(metric, name)
                if value is not None:
                    metrics.rl_values.labels(label, name).set(value)

    def write(self) -> None:
        for run_key, overrides in self.overrides.items():
            self.tables.run_settings.put(run_key, overrides, self.partitions[run_key])
        for run_key, window in self.windows.items():
            self.tables.windows.put(run_key, window, self.partitions[run_key])
        for run_key, ops in self.operations.items():
            state = orjson.dumps(ops.to_state())
            self.tables.operations.put(run_key, state, self.partitions[run_key])


def register(ctx: ProcessorContext) -> TrainingTables:
    app = ctx.app
    worker = ctx.settings.worker
    tables = TrainingTables(
        run_settings=partitioned_table(
            app, "run-settings", settings=ctx.settings, value_serializer="json"
        ),
        windows=partitioned_table(
            app, "reward-windows", settings=ctx.settings, value_serializer=REWARD_WINDOW_CODEC
        ),
        operations=partitioned_table(
            app, "run-operations", settings=ctx.settings, value_serializer="raw"
        ),
    )
    max_bytes = worker.max_event_bytes

    async def on_run(message: Message, batch: _Batch) -> None:
        run = decode(RunAnnounced, message.value, max_bytes=max_bytes)
        try:
            ctx.run_settings.resolve(run.settings)
        except (ValidationError, ValueError) as exc:
            raise InvalidEvent(str(exc).splitlines()[0], field="settings") from None
        run_key = run.run_id.encode()
        batch.partitions[run_key] = message.partition
        batch.overrides[run_key] = dict(run.settings)
        batch.apply_settings(run_key)

    async def on_metric(message: Message, batch: _Batch) -> None:
        metric = decode(StepMetric, message.value, max_bytes=max_bytes)
        run_key = metric.run_id.encode()
        batch.latest[metric.run_id] = metric
        ctx.metrics.rl_updates.labels("ppo").inc()
        now = ctx.now()
        # The rules first: statistics the contract cannot carry (a dead-lettered metric)
        # must not hide an anomaly from them.
        for command in batch.run_operations(run_key, message.partition).on_metric(metric, now):
            await ctx.forward(command)
        if not math.isfinite(metric.reward):
            return  # kept out of the window (it would poison 1,000 others); the rules acted
        stats = batch.window(run_key, message.partition).add(
            metric.reward, step=metric.step, attempt=metric.attempt
        )
        if stats is not None:
            await ctx.forward(
                RewardStats(
                    run_id=metric.run_id,
                    step=metric.step,
                    reward=stats.reward,
                    normalized_reward=stats.normalized_reward,
                    mean=stats.mean,
                    std=stats.std,
                    count=stats.count,
                    ts=now,
                )
            )

    async def on_checkpoint(message: Message, batch: _Batch) -> None:
        checkpoint = decode(CheckpointSaved, message.value, max_bytes=max_bytes)
        ops = batch.run_operations(checkpoint.run_id.encode(), message.partition)
        for command in ops.on_checkpoint(checkpoint, ctx.now()):
            await ctx.forward(command)

    async def on_ack(message: Message, batch: _Batch) -> None:
        ack = decode(CommandAck, message.value, max_bytes=max_bytes)
        ops = batch.run_operations(ack.run_id.encode(), message.partition)
        if ops.is_replayed_ack(*input_origin(message)):
            ctx.metrics.replayed_events.labels("training").inc()
            return
        if ack.status == "rejected" and ack.detail in SIGNATURE_REJECTIONS:
            log.error("run %s refused command %s: %s", ack.run_id, ack.command_id, ack.detail)
            ctx.metrics.signature_rejections.labels(ctx.metrics.run_label(ack.run_id)).inc()
        for command in ops.on_ack(ack, ctx.now()):
            await ctx.forward(command)

    handlers: dict[str, Handler] = {
        ctx.topic(Topic.RUNS): on_run,
        ctx.topic(Topic.METRICS): on_metric,
        ctx.topic(Topic.CHECKPOINTS): on_checkpoint,
        ctx.topic(Topic.ACKS): on_ack,
    }
    topic = app.topic(*handlers, key_serializer="raw", value_serializer="raw")

    register_batch_agent(
        ctx, topic, name="training", new_batch=lambda: _Batch(ctx, tables, handlers)
    )
    return tables
