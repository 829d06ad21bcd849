"""The trainer.* topics -> reward statistics and training commands, in one agent.

One agent reads ``trainer.runs``, ``trainer.metrics``, ``trainer.checkpoints``,
``trainer.acks`` and the operators' ``ops.requests`` (all keyed by run id, so
co-partitioned): each metric feeds both the
reward window and the run's operations. Per record it decodes, calls a rule, and forwards.
Each run's state (settings, ``RunOperations``, ``RewardWindow``) stays live in memory
between batches; the runtime's checkpoints write the runs a batch changed, once each. Its
decisions, like its statistics, are a function of its records alone, but one: its timer
(every ``SILENCE_CHECK_INTERVAL_S``) decides for an anomaly still waiting for its rollback
target on a run silent for ``checkpoints.silent_decision_after_s`` (``RunOperations
.on_silence``). That decision reads the clock, so it is checkpointed promptly: a replay must
not remake it differently. A run's silence counts from its newest input applied here, or
from when this worker took the run over (a start, a rebalance): the timer then finds the
runs waiting in the run-operations table.

The end of a run (``rules.run_lifecycle``): a finish on ``trainer.runs`` marks the run
finished; at a checkpoint (every agent held, outputs delivered) a finished run quiet for
``worker.finished_run_retention_s`` is dropped: a tombstone for its key in every table that
holds it (run-settings, reward-windows, run-operations, and the feedback agent's
feedback-windows), its metric series removed. Deciding at the checkpoint makes the drop
durable before any later input is applied, as a clock decision must be. The other agents'
state goes first, the run's own at the next checkpoint, once those tombstones are on the
broker: a crash in between leaves the run's own state, still finished and quiet, to be
dropped again, never a rating window nothing would drop.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from faust.types import TP
from pydantic import ValidationError

from config.settings import Settings
from rules import Position
from rules.reward_window import RewardWindow
from rules.run_lifecycle import RunLifecycle
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
    RunFinished,
    StepMetric,
    Topic,
    decode,
    decode_run_event,
)
from schemas.signing import SIGNATURE_REJECTIONS, SignatureError, verify
from streams.context import ProcessorContext
from streams.live import input_origin
from streams.metrics import RUN_VALUE_NAMES, remove_series
from streams.runtime import InputRecord
from streams.state import OpenStore, StateSink, StateStore, key_partition

log = logging.getLogger(__name__)

HYPERPARAMETER_NAMES = ("entropy_coef", "learning_rate", "clip_epsilon")
NO_POSITION: Position = (-1, -1)  # before any metric
# A run's last_metric_at moves (and its settings record is written) at most this often.
LAST_METRIC_RESOLUTION_S = 10.0
SILENCE_CHECK_INTERVAL_S = 1.0


@dataclass
class TrainingTables:
    # run id -> {"overrides", "algorithm", "announced_at", "partition", "finished" (the
    # RunLifecycle state; absent while it runs)} as JSON; before the algorithm was
    # announced, the overrides alone (a dict of dotted paths, or null): read as PPO's.
    run_settings: StateStore
    windows: StateStore  # run id -> RewardWindow snapshot
    operations: StateStore  # run id -> RunOperations state (JSON)


@dataclass(eq=False)
class _Run:
    """One run's live state on this worker."""

    key: bytes
    partition: int
    overrides: dict[str, Any] | None  # as announced; None: never announced (the defaults)
    algorithm: str  # as announced: the label of the run's metrics
    # (origin, offset) of the newest trainer.runs record (announcement or finish) applied:
    # a replayed older one (a crash after the state was written, before the commit) must
    # not undo a newer one.
    announced_at: tuple[str, int] | None
    ops: RunOperations
    window: RewardWindow
    lifecycle: RunLifecycle  # finished or not; kept with the settings
    # The worker's clock when a metric newer than any before was applied; kept with the
    # settings, so that a run's silence survives a restart or a move to another worker.
    last_metric_at: float | None = None


class TrainingAgent:
    """Runs' metrics, checkpoints, acks and announcements -> statistics and commands."""

    name = "training"
    internal_topics: tuple[str, ...] = ()
    tick_interval_s: float | None = SILENCE_CHECK_INTERVAL_S  # silent runs (the module doc)

    def __init__(self, ctx: ProcessorContext, stores: OpenStore) -> None:
        self.ctx = ctx
        self.tables = TrainingTables(
            run_settings=stores("run-settings"),
            windows=stores("reward-windows"),
            operations=stores("run-operations"),
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
        self._settings_changed: set[bytes] = set()  # runs whose run-settings record changed
        self._latest: dict[str, StepMetric] = {}  # run id -> newest metric since a checkpoint
        self._updates: Counter[str] = Counter()  # metrics per algorithm since a checkpoint
        self._retention_s = ctx.settings.worker.finished_run_retention_s
        self._partitions = ctx.settings.kafka.partitions
        # Finished runs on the partitions this worker owns: key -> (partition, lifecycle),
        # the lifecycle shared with the live run. None: to be read from the table (at the
        # first checkpoint after a start or a rebalance, once the table is recovered).
        self._finished: dict[bytes, tuple[int, RunLifecycle]] | None = None
        self._held_since = 0.0  # the worker's clock when it last took its partitions over
        self._releasing: set[bytes] = set()  # finished runs whose other state was dropped
        self._last_input: dict[bytes, float] = {}  # live run -> the worker's clock at its input
        self._taken_over = False  # _take_over done since the start or the latest rebalance

    # The runtime's side.
    async def process(self, records: Sequence[InputRecord]) -> None:
        await self.ctx.apply_each(records, self.on_record)
        self._share_hyperparameters()

    async def tick(self) -> None:
        """Decide for the anomalies waiting for their target on silent runs."""
        if self.ctx.assignment.rebalancing:
            return  # partitions move, tables recover: a later tick decides
        now = self.ctx.now()
        if not self._taken_over:
            self._take_over(now)
        for key, run in list(self._runs.items()):
            ops = run.ops
            if ops.awaiting_target is None or ops.halted or run.lifecycle.finished:
                continue  # a finished run is silent by design: nothing to roll back
            silent_s = now - self._last_input.setdefault(key, now)
            if silent_s < ops.settings.checkpoints.silent_decision_after_s:
                continue
            self._changed.add(key)
            self.ctx.checkpoints.checkpoint_soon()
            for command in ops.on_silence(now):
                await self.ctx.forward(command)
            self._log_notices(run)

    def _take_over(self, now: float) -> None:
        """After a start or a rebalance (which cleared the per-run gauges), for every run
        the tables hold on an owned partition: export its health (a halted or silent run
        must stay visible without sending anything), and keep live those waiting for a
        rollback target (their silence counts from now). Loads each run once."""
        self._taken_over = True
        for key in self.held_keys():
            run = self.peek(key)
            if run is None:
                continue
            self._export_run_health(run)
            if key not in self._runs and run.ops.awaiting_target is not None:
                self._runs[key] = run  # live from now on: the timer decides for it
                self._last_input[key] = now

    def write_state(self, writer: StateSink) -> None:
        tables = self.tables
        for key in self._settings_changed:
            run = self._runs[key]
            stored: dict[str, Any] = {
                "overrides": run.overrides,
                "algorithm": run.algorithm,
                "announced_at": run.announced_at,
                "partition": run.partition,
            }
            finished = run.lifecycle.to_state()
            if finished is not None:
                stored["finished"] = finished
            if run.last_metric_at is not None:
                stored["last_metric_at"] = run.last_metric_at
            writer.put(tables.run_settings, key, orjson.dumps(stored), run.partition)
        changed = [self._runs[key] for key in self._changed]
        for run in changed:
            writer.put(tables.windows, run.key, run.window.to_bytes(), run.partition)
            writer.put(tables.operations, run.key, orjson.dumps(run.ops.to_state()), run.partition)
        self._settings_changed.clear()
        self._changed.clear()
        self._export_metrics(changed)
        self._end_finished_runs(writer)

    def forget(self) -> None:
        self._runs.clear()
        self._changed.clear()
        self._settings_changed.clear()
        self._latest.clear()
        self._finished = None
        self._releasing.clear()
        self._last_input.clear()
        self._taken_over = False

    # Live runs.
    def _settings(self, overrides: dict[str, Any] | None) -> Settings:
        return self.ctx.run_settings.resolve(overrides)

    def _run(self, key: bytes, partition: int) -> _Run:
        """The run's live state, loaded from the tables on first use."""
        run = self._runs.get(key)
        if run is None:
            run = self._runs[key] = self._load_run(key, partition)
        return run

    def _load_run(self, key: bytes, partition: int) -> _Run:
        """The run's state as the tables hold it (new when they hold none)."""
        tables = self.tables
        stored_settings = tables.run_settings.get(key)
        overrides, algorithm, announced_at = stored_announcement(stored_settings)
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
        indexed = self._finished.get(key) if self._finished is not None else None
        lifecycle = indexed[1] if indexed is not None else stored_lifecycle(stored_settings)[0]
        if lifecycle.reached is None:  # kept only once finished: what the state knows
            lifecycle.reached = _newest(ops.detector.last_position, window.last_position)
        run = _Run(key, partition, overrides, algorithm, announced_at, ops, window, lifecycle)
        run.last_metric_at = stored_last_metric_at(stored_settings)
        return run

    def _changed_run(self, key: bytes, partition: int, position: Position | None = None) -> _Run:
        """The run an input is applied to; a finished run's quiet time starts again."""
        self._changed.add(key)
        run = self._run(key, partition)
        now = self._last_input[key] = self.ctx.now()
        lifecycle = run.lifecycle
        if lifecycle.on_metric(position, now) if position is not None else lifecycle.on_input(now):
            self._settings_changed.add(key)
        return run

    # Read-only views, for state queries (``streams.queries``).
    def peek(self, key: bytes) -> _Run | None:
        """The run's state, live or stored, if this worker actively owns its partition;
        None otherwise. Never creates a run, and one loaded from the tables is not kept
        live."""
        run = self._runs.get(key)
        if run is not None:
            partition = run.partition
        elif self._holds(key):
            stored = stored_lifecycle(self.tables.run_settings.get(key))[1]
            # Never announced: where the default partitioner put its events.
            partition = stored if stored is not None else key_partition(key, self._partitions)
        else:
            return None
        assigned = self.ctx.assignment.assigned_actives()
        if not any(TP(topic, partition) in assigned for topic in self.topics):
            return None  # a standby's copy, or a partition this worker gave up
        return run if run is not None else self._load_run(key, partition)

    def held_keys(self) -> list[bytes]:
        """Every run with state live or in a table here (owned or not: ``peek`` tells)."""
        tables = self.tables
        keys = set(self._runs)
        for table in (tables.run_settings, tables.operations, tables.windows):
            keys.update(table.keys())
        return sorted(keys)

    def _holds(self, key: bytes) -> bool:
        """Whether this worker holds any state of the run (live or in a table)."""
        tables = self.tables
        return key in self._runs or any(
            table.get(key) is not None
            for table in (tables.run_settings, tables.operations, tables.windows)
        )

    # Per record: decode, call a rule, forward.
    async def on_record(self, record: InputRecord) -> None:
        """Apply a record by its topic's handler (``InvalidEvent``: dead-lettered)."""
        await self._handlers[record.topic](record)

    async def on_run(self, record: InputRecord) -> None:
        event = decode_run_event(record.value, max_bytes=self._max_bytes)
        if isinstance(event, RunFinished):
            self.on_finish(record, event)
        else:
            self.on_announce(record, event)

    def on_announce(self, record: InputRecord, announced: RunAnnounced) -> None:
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
        self._settings_changed.add(key)
        if run.lifecycle.finished:  # announced again: resumed, no longer finished
            run.lifecycle.on_start()
            if self._finished is not None:
                self._finished.pop(key, None)
            self._releasing.discard(key)
            remove_series(self.ctx.metrics.run_finished, announced.run_id)

    def on_finish(self, record: InputRecord, finished: RunFinished) -> None:
        """The run ended: it is dropped once quiet for the retention (``rules.run_lifecycle``).
        A run this worker holds nothing of (dropped already, so this is a finish read again,
        or never seen) stays so: nothing is created to be dropped."""
        ctx = self.ctx
        key = finished.run_id.encode()
        if not self._holds(key):
            log.info("run %s finished: no state of it here, nothing to drop", finished.run_id)
            return
        run = self._run(key, record.partition)
        origin, offset = input_origin(record)
        known = run.announced_at
        if known is not None and known[0] == origin and offset <= known[1]:
            ctx.metrics.replayed_events.labels("training").inc()
            return
        run.announced_at = (origin, offset)
        now = ctx.now()
        final = (finished.attempt, finished.step) if finished.step is not None else None
        run.lifecycle.on_finish(now, final)
        self._settings_changed.add(key)
        if self._finished is not None:
            self._finished[key] = (run.partition, run.lifecycle)
        label = ctx.metrics.run_label(finished.run_id)
        if label == finished.run_id:  # ``other`` runs share series: not all of them ended
            ctx.metrics.run_finished.labels(label).set(now)
        log.warning(
            "run %s finished (last metric: %s): its state goes %g s after its last input",
            finished.run_id,
            f"attempt {finished.attempt}, step {finished.step}" if final else "none",
            self._retention_s,
        )

    async def on_metric(self, record: InputRecord) -> None:
        ctx = self.ctx
        metric = decode(StepMetric, record.value, max_bytes=self._max_bytes)
        position = (metric.attempt, metric.step)
        run = self._changed_run(metric.run_id.encode(), record.partition, position)
        now = self._last_input[run.key]  # the clock _changed_run read
        newest = _newest(run.ops.detector.last_position, run.window.last_position)
        if position > (newest or NO_POSITION):
            last = run.last_metric_at
            if last is None or now - last >= LAST_METRIC_RESOLUTION_S:
                run.last_metric_at = now
                self._settings_changed.add(run.key)
        self._latest[metric.run_id] = metric
        self._updates[run.algorithm] += 1
        # The rules first: statistics the contract cannot carry (a dead-lettered metric)
        # must not hide an anomaly from them.
        for command in run.ops.on_metric(metric, now):
            await ctx.forward(command)
        self._log_notices(run)
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

    def _log_notices(self, run: _Run) -> None:
        """What the run's operations decided not to act on: logged and counted."""
        for notice in run.ops.take_notices():
            log.warning("%s", notice)
            self.ctx.metrics.unanswered_anomalies.inc()

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
            return (
                "unknown run: no metrics, checkpoints or announcement of it were read "
                "(or it finished and its state was dropped)"
            )
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

    def _export_metrics(self, changed: list[_Run]) -> None:
        """The per-run training gauges, from each run's newest metric since the last
        checkpoint and the state of the runs changed (Prometheus reads them every few
        seconds; a batch is milliseconds)."""
        metrics = self.ctx.metrics
        for run in changed:
            self._export_run_health(run)
        for algorithm, updates in self._updates.items():
            metrics.rl_updates.labels(algorithm).inc(updates)
        self._updates.clear()
        for run_id, metric in self._latest.items():
            label = metrics.run_label(run_id)
            for name in RUN_VALUE_NAMES:
                value = getattr(metric, name)
                if value is not None:
                    metrics.rl_values.labels(label, name).set(value)
        self._latest.clear()

    def _export_run_health(self, run: _Run) -> None:
        """Whether the run is halted, its reward window, when it was last heard of. Under its
        own label only: the runs past ``metrics.max_run_labels`` share ``other``, where one
        run's value would hide another's."""
        metrics = self.ctx.metrics
        run_id = run.key.decode()
        if metrics.run_label(run_id) != run_id:
            return
        metrics.run_halted.labels(run_id).set(1 if run.ops.halted else 0)
        window = run.window
        if window.count:
            metrics.reward_window.labels(run_id, "mean").set(window.mean or 0.0)
            metrics.reward_window.labels(run_id, "std").set(window.std or 0.0)
            metrics.reward_window.labels(run_id, "count").set(window.count)
        if run.last_metric_at is not None and not run.lifecycle.finished:
            metrics.run_last_metric.labels(run_id).set(run.last_metric_at)

    # The end of finished runs, at each checkpoint (see the module doc).
    def _end_finished_runs(self, writer: StateSink) -> None:
        if self.ctx.assignment.rebalancing:
            return  # partitions move, tables recover: the next checkpoint after it decides
        now = self.ctx.now()
        if self._finished is None:
            self._finished = self._finished_runs_owned()
            self._held_since = now
            metrics = self.ctx.metrics
            for key, (_partition, lifecycle) in self._finished.items():
                run_id = key.decode()
                if metrics.run_label(run_id) == run_id and lifecycle.finished_at is not None:
                    metrics.run_finished.labels(run_id).set(lifecycle.finished_at)
        finished, retention = self._finished, self._retention_s
        # Their other state was dropped at an earlier checkpoint, whose tombstones are on
        # the broker: now their own, unless an input came meanwhile.
        releasing, self._releasing = self._releasing, set()
        for key in releasing:
            if key in finished and self._expired(finished[key][1], now):
                self._drop(key, writer)
        for key, (_partition, lifecycle) in list(finished.items()):
            if key in releasing or not self._expired(lifecycle, now):
                continue
            run_id = key.decode()
            holders = self.ctx.run_state
            if not all(holder.run_quiet(run_id, now - retention) for holder in holders):
                continue  # a rating of it came lately: it is not quiet
            # Every holder drops its part (a list, not a short-circuiting generator).
            if any([holder.drop_run(run_id, writer) for holder in holders]):
                self._releasing.add(key)
            else:
                self._drop(key, writer)
        if self._releasing:
            self.ctx.checkpoints.checkpoint_soon()

    def _expired(self, lifecycle: RunLifecycle, now: float) -> bool:
        return lifecycle.expired(now, self._retention_s, held_since=self._held_since)

    def _finished_runs_owned(self) -> dict[bytes, tuple[int, RunLifecycle]]:
        """The finished runs in the run-settings table on partitions this worker owns."""
        assigned = self.ctx.assignment.assigned_actives()
        table = self.tables.run_settings
        found: dict[bytes, tuple[int, RunLifecycle]] = {}
        for key in list(table.keys()):
            run = self._runs.get(key)
            if run is not None:
                partition: int | None = run.partition
                lifecycle = run.lifecycle
            else:
                stored = table.get(key)
                if not stored or b'"finished"' not in stored:
                    continue  # cheap: most runs run, or stored before finishes existed
                try:
                    lifecycle, partition = stored_lifecycle(stored)
                except (ValueError, TypeError, KeyError):  # a checkpoint must not fail on it
                    log.exception("run %s: unreadable stored lifecycle; kept", key.decode())
                    continue
            if not lifecycle.finished or partition is None:
                continue
            if any(TP(topic, partition) in assigned for topic in self.topics):
                found[key] = (partition, lifecycle)
        return found

    def _drop(self, key: bytes, writer: StateSink) -> None:
        """Forget a finished run: tombstones for its keys, its live state, its series."""
        assert self._finished is not None
        partition, lifecycle = self._finished.pop(key)
        tables = self.tables
        for table in (tables.run_settings, tables.windows, tables.operations):
            if table.get(key) is not None:
                writer.delete(table, key, partition)
        self._runs.pop(key, None)
        self._last_input.pop(key, None)
        run_id = key.decode()
        self._latest.pop(run_id, None)
        self.ctx.hyperparameters.pop(run_id, None)
        self.ctx.metrics.forget_run(run_id)
        log.warning(
            "run %s finished and has been quiet for %g s: its state and metric series are dropped",
            run_id,
            self.ctx.now() - (lifecycle.last_input_at or 0.0),
        )


def _newest(*positions: Position | None) -> Position | None:
    """The newest of known metric positions; (-1, -1) is an empty window's none."""
    known = [position for position in positions if position is not None and position[0] >= 0]
    return max(known, default=None)


def stored_lifecycle(stored: bytes | None) -> tuple[RunLifecycle, int | None]:
    """The run's lifecycle (finished or not) and the partition its state is on, from the
    run-settings table (stored before finishes existed: running, partition unknown)."""
    if stored is None:
        return RunLifecycle(), None
    record = orjson.loads(stored)
    if not isinstance(record, dict) or "algorithm" not in record:
        return RunLifecycle(), None
    partition = record.get("partition")
    return RunLifecycle.from_state(record.get("finished")), (
        int(partition) if partition is not None else None
    )


def stored_last_metric_at(stored: bytes | None) -> float | None:
    """When the worker last applied a new metric of the run (its clock), from the
    run-settings table; None: not known (no metric, or stored before it was kept)."""
    if stored is None or b'"last_metric_at"' not in stored:
        return None
    record = orjson.loads(stored)
    return float(record["last_metric_at"])


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
