"""The trainer.* topics -> reward statistics and training commands, in one agent.

One agent reads ``trainer.runs``, ``trainer.metrics``, ``trainer.checkpoints``,
``trainer.acks`` and the operators' ``ops.requests`` (all keyed by run id, so
co-partitioned): each metric feeds both the
reward window and the run's operations. Per record it decodes, calls a rule, and forwards.
Each run's state (settings, ``RunOperations``, ``RewardWindow``) stays live in memory
between batches; the runtime's checkpoints write the runs a batch changed, once each.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from fragrance_ops.settings import Settings
from rules.reward_window import RewardWindow
from rules.training import RequestAnswer, RunOperations
from schemas import (
    DEFAULT_ALGORITHM,
    CheckpointSaved,
    CommandAck,
    InvalidEvent,
    OperatorReply,
    OperatorRequest,
    RewardStats,
    RunAnnounced,
    StepMetric,
    Topic,
    decode,
)
from schemas.signing import SIGNATURE_REJECTIONS, SignatureError, verify
from streams.context import ProcessorContext
from streams.live import input_origin
from streams.runtime import InputRecord
from streams.state import StateTable, StateWriter

log = logging.getLogger(__name__)

HYPERPARAMETER_NAMES = ("entropy_coef", "learning_rate", "clip_epsilon")
RL_GAUGE_NAMES = ("loss", "policy_loss", "value_loss", "reward", "entropy", "entropy_coef")


@dataclass
class TrainingTables:
    # run id -> {"overrides": ..., "algorithm": ...} as JSON; before the algorithm was
    # announced, the overrides alone (a dict of dotted paths, or null): read as PPO's.
    run_settings: StateTable
    windows: StateTable  # run id -> RewardWindow snapshot
    operations: StateTable  # run id -> RunOperations state (JSON)


@dataclass(eq=False)
class _Run:
    """One run's live state on this worker."""

    key: bytes
    partition: int
    overrides: dict[str, Any] | None  # as announced; None: never announced (the defaults)
    algorithm: str  # as announced: the label of the run's metrics
    # (origin, offset) of the newest announcement applied: a replayed older one (a crash
    # after the state was written, before the commit) must not undo a newer one.
    announced_at: tuple[str, int] | None
    ops: RunOperations
    window: RewardWindow


class TrainingAgent:
    """Runs' metrics, checkpoints, acks and announcements -> statistics and commands."""

    name = "training"

    def __init__(self, ctx: ProcessorContext) -> None:
        self.ctx = ctx
        self.tables = TrainingTables(
            run_settings=StateTable(ctx.app, "run-settings", ctx.settings),
            windows=StateTable(ctx.app, "reward-windows", ctx.settings),
            operations=StateTable(ctx.app, "run-operations", ctx.settings),
        )
        self._max_bytes = ctx.settings.worker.max_event_bytes
        # Metrics last: of what a trainer sent in one millisecond, the rules take the rest
        # read ahead of the metrics (held back), not behind (waited for).
        self._handlers: dict[str, Callable[[InputRecord], Awaitable[None]]] = {
            ctx.topic(Topic.RUNS): self.on_run,
            ctx.topic(Topic.CHECKPOINTS): self.on_checkpoint,
            ctx.topic(Topic.ACKS): self.on_ack,
            ctx.topic(Topic.OPERATOR_REQUESTS): self.on_request,
            ctx.topic(Topic.METRICS): self.on_metric,
        }
        self.topics = tuple(self._handlers)
        self._stats_topic = ctx.topic(Topic.REWARD_STATS)
        self._runs: dict[bytes, _Run] = {}
        self._changed: set[bytes] = set()  # runs to write at the next checkpoint
        self._announced: set[bytes] = set()  # runs whose settings changed since then
        self._latest: dict[str, StepMetric] = {}  # run id -> newest metric since a checkpoint
        self._updates: Counter[str] = Counter()  # metrics per algorithm since a checkpoint

    # The runtime's side.
    async def process(self, records: Sequence[InputRecord]) -> None:
        await self.ctx.apply_each(records, self._apply)
        self._share_hyperparameters()

    async def _apply(self, record: InputRecord) -> None:
        await self._handlers[record.topic](record)

    def write_state(self, writer: StateWriter) -> None:
        tables = self.tables
        for key in self._announced:
            run = self._runs[key]
            announced = {
                "overrides": run.overrides,
                "algorithm": run.algorithm,
                "announced_at": run.announced_at,
            }
            writer.put(tables.run_settings, key, orjson.dumps(announced), run.partition)
        for key in self._changed:
            run = self._runs[key]
            writer.put(tables.windows, key, run.window.to_bytes(), run.partition)
            writer.put(tables.operations, key, orjson.dumps(run.ops.to_state()), run.partition)
        self._announced.clear()
        self._changed.clear()
        self._export_metrics()

    def forget(self) -> None:
        self._runs.clear()
        self._changed.clear()
        self._announced.clear()
        self._latest.clear()

    # Live runs.
    def _settings(self, overrides: dict[str, Any] | None) -> Settings:
        return self.ctx.run_settings.resolve(overrides)

    def _run(self, key: bytes, partition: int) -> _Run:
        """The run's live state, loaded from the tables on first use."""
        run = self._runs.get(key)
        if run is not None:
            return run
        tables = self.tables
        overrides, algorithm, announced_at = stored_announcement(tables.run_settings.get(key))
        settings = self._settings(overrides)
        stored_ops = tables.operations.get(key)
        ops = (
            RunOperations.from_state(key.decode(), orjson.loads(stored_ops), settings)
            if stored_ops is not None
            else RunOperations(key.decode(), settings)
        )
        stored_window = tables.windows.get(key)
        capacity = settings.reward.window_size
        window = (
            RewardWindow.from_bytes(stored_window)
            if stored_window is not None
            else RewardWindow(capacity)
        )
        window.resize(capacity)
        run = self._runs[key] = _Run(
            key, partition, overrides, algorithm, announced_at, ops, window
        )
        return run

    def _changed_run(self, key: bytes, partition: int) -> _Run:
        self._changed.add(key)
        return self._run(key, partition)

    # Per record: decode, call a rule, forward.
    async def on_run(self, record: InputRecord) -> None:
        announced = decode(RunAnnounced, record.value, max_bytes=self._max_bytes)
        try:
            settings = self._settings(announced.settings)
        except (ValidationError, ValueError) as exc:
            raise InvalidEvent(str(exc).splitlines()[0], field="settings") from None
        key = announced.run_id.encode()
        origin, offset = input_origin(record)
        known = self._run(key, record.partition).announced_at
        if known is not None and known[0] == origin and offset <= known[1]:
            self.ctx.metrics.replayed_events.labels("training").inc()
            return
        run = self._changed_run(key, record.partition)
        run.overrides = dict(announced.settings)
        run.algorithm = announced.algorithm
        run.announced_at = (origin, offset)
        # The state so far, carried over to the run's new settings.
        run.window.resize(settings.reward.window_size)
        run.ops = RunOperations.from_state(announced.run_id, run.ops.to_state(), settings)
        self._announced.add(key)

    async def on_metric(self, record: InputRecord) -> None:
        ctx = self.ctx
        metric = decode(StepMetric, record.value, max_bytes=self._max_bytes)
        run = self._changed_run(metric.run_id.encode(), record.partition)
        self._latest[metric.run_id] = metric
        self._updates[run.algorithm] += 1
        now = ctx.now()
        # The rules first: statistics the contract cannot carry (a dead-lettered metric)
        # must not hide an anomaly from them.
        for command in run.ops.on_metric(metric, now):
            await ctx.forward(command)
        for notice in run.ops.take_notices():
            log.warning("%s", notice)
            ctx.metrics.unanswered_anomalies.inc()
        if not math.isfinite(metric.reward):
            return  # kept out of the window (it would poison 1,000 others); the rules acted
        stats = run.window.add(metric.reward, step=metric.step, attempt=metric.attempt)
        if stats is not None:
            value = RewardStats.encode_unchecked(
                run_id=metric.run_id,
                step=metric.step,
                reward=stats.reward,
                normalized_reward=stats.normalized_reward,
                mean=stats.mean,
                std=stats.std,
                count=stats.count,
                ts=now,
            )
            await ctx.output.send(self._stats_topic, run.key, value)

    async def on_checkpoint(self, record: InputRecord) -> None:
        checkpoint = decode(CheckpointSaved, record.value, max_bytes=self._max_bytes)
        run = self._changed_run(checkpoint.run_id.encode(), record.partition)
        for command in run.ops.on_checkpoint(checkpoint, self.ctx.now()):
            await self.ctx.forward(command)

    async def on_ack(self, record: InputRecord) -> None:
        ctx = self.ctx
        ack = decode(CommandAck, record.value, max_bytes=self._max_bytes)
        run = self._changed_run(ack.run_id.encode(), record.partition)
        if run.ops.is_replayed_input(*input_origin(record)):
            ctx.metrics.replayed_events.labels("training").inc()
            return
        if ack.status == "rejected" and ack.detail in SIGNATURE_REJECTIONS:
            log.error("run %s refused command %s: %s", ack.run_id, ack.command_id, ack.detail)
            ctx.metrics.signature_rejections.labels(ctx.metrics.run_label(ack.run_id)).inc()
        for command in run.ops.on_ack(ack, ctx.now()):
            await ctx.forward(command)

    async def on_request(self, record: InputRecord) -> None:
        ctx = self.ctx
        request = decode(OperatorRequest, record.value, max_bytes=self._max_bytes)
        key = request.run_id.encode()
        refusal = self._refusal(record, key)
        if refusal is not None:
            answer = RequestAnswer(False, refusal)
        else:
            run = self._changed_run(key, record.partition)
            if run.ops.is_replayed_input(*input_origin(record)):
                ctx.metrics.replayed_events.labels("training").inc()
                return
            answer = run.ops.on_request(request, ctx.now())
        log.warning(
            "operator request %s from %s: %s run %s (%s): %s",
            request.request_id,
            request.requested_by,
            request.action,
            request.run_id,
            request.reason,
            answer.detail if answer.accepted else f"refused: {answer.detail}",
        )
        if answer.command is not None:
            await ctx.forward(answer.command)
        reply = OperatorReply(
            request_id=request.request_id,
            run_id=request.run_id,
            action=request.action,
            accepted=answer.accepted,
            detail=answer.detail,
            command_id=answer.command.command_id if answer.command is not None else None,
            requested_by=request.requested_by,
            reason=request.reason,
            ts=ctx.now(),
        )
        await ctx.forward(reply)

    def _refusal(self, record: InputRecord, key: bytes) -> str | None:
        """Why a request cannot be taken before its run is asked: its signature, or a run
        this worker has never heard of."""
        signing_key = self.ctx.signing_key
        if self.ctx.settings.security.require_signed_requests and signing_key is not None:
            try:
                verify(
                    signing_key,
                    Topic.OPERATOR_REQUESTS.value,
                    record.key or b"",
                    record.value or b"",
                    record.headers,
                )
            except SignatureError as exc:
                return (
                    f"signature check failed ({exc.reason}): requests must be signed with "
                    "security.command_signing_key"
                )
        if key not in self._runs and self.tables.operations.get(key) is None:
            return "unknown run: no metrics, checkpoints or announcement of it were read"
        return None

    def _share_hyperparameters(self) -> None:
        """The hyperparameters the feedback agent's proposals start from: each run's newest."""
        for run_id, metric in self._latest.items():
            hyperparameters = {
                name: value
                for name in HYPERPARAMETER_NAMES
                if (value := getattr(metric, name)) is not None
            }
            if hyperparameters:
                self.ctx.hyperparameters[run_id] = hyperparameters

    def _export_metrics(self) -> None:
        """The per-run training gauges, from each run's newest metric since the last
        checkpoint (Prometheus reads them every few seconds; a batch is milliseconds)."""
        metrics = self.ctx.metrics
        for algorithm, updates in self._updates.items():
            metrics.rl_updates.labels(algorithm).inc(updates)
        self._updates.clear()
        now = self.ctx.now()
        for run_id, metric in self._latest.items():
            label = metrics.run_label(run_id)
            metrics.run_last_metric.labels(label).set(now)
            for name in RL_GAUGE_NAMES:
                value = getattr(metric, name)
                if value is not None:
                    metrics.rl_values.labels(label, name).set(value)
        self._latest.clear()


def stored_announcement(
    stored: bytes | None,
) -> tuple[dict[str, Any] | None, str, tuple[str, int] | None]:
    """(overrides, algorithm, where the announcement was read) from the run-settings table;
    overrides None: never announced."""
    if stored is None:
        return None, DEFAULT_ALGORITHM, None
    announced = orjson.loads(stored)
    if isinstance(announced, dict) and "algorithm" in announced:
        at = announced.get("announced_at")
        return (
            announced["overrides"],
            announced["algorithm"],
            (str(at[0]), int(at[1])) if at else None,
        )
    # Stored before announcements named their algorithm and position.
    return announced, DEFAULT_ALGORITHM, None


def register(ctx: ProcessorContext) -> TrainingAgent:
    agent = TrainingAgent(ctx)
    ctx.runtime.register(agent)
    return agent
