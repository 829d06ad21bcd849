"""State on request: what the worker answers about a run or a model, as JSON.

The worker's HTTP server (``streams.http``, on ``metrics.port``) answers ``GET /runs/<id>``
and ``GET /models/<name>`` from the state its agents hold live, and lists the runs and
models whose partitions it owns (``GET /runs``, ``GET /models``). This module makes the
answers: the JSON shapes (``RunState``, ``ModelState``), made by plain functions from the
rule objects (``run_state``, ``model_state``), and ``StateQueries``, which finds a key's
objects in the agents without ever creating or changing state: a key this worker holds
nothing of is not loaded, not created, and answered ``None`` (the server's 404, or a
request routed to the key's owner).

What a run's answer says (each field's rule in its own module):

- ``halted``, ``finished``, the newest metric's ``attempt`` and ``step``;
- ``last_metric_at`` (the worker's clock when it applied the run's newest metric, to the
  nearest 10 s, kept across restarts and rebalances; null: none known), ``silent_s`` since
  then, and ``stale``: silent for longer than ``metrics.stale_run_after_s`` (or no metric
  known) and not finished (a finished run is silent by design), as status decides it
  from the topics;
- ``rollbacks``: ``used`` (rollbacks whose anomaly steps lie fewer than
  ``checkpoints.rollback_within_steps`` from the newest step: what the budget counts
  against the next one, ``rules.checkpoints.RollbackBudget``), ``budget``
  (``checkpoints.max_rollbacks``), and every rollback sent (``history``);
- ``pending_rollback``: a rollback sent and not yet acknowledged by the trainer;
  ``awaiting_target``: an anomaly that must act and waits for a healthy checkpoint;
- ``checkpoints``: those kept, each with its health, and the ``protected`` step (the
  newest healthy checkpoint, which retention never deletes);
- ``reward_window``: count, capacity, mean and population std (``rules.reward_window``);
- ``entropy_coef``: the coefficient last sent to the trainer (null: none sent yet);
- ``rating_window``: the open window of ratings for the run (``rules.retune``), with its
  size against ``retune.min_window``/``max_window`` and when it times out; null when no
  rating of the run was counted since its last window closed.

A model's answer is its breaker (``rules.breaker``): ``state``, ``mode``,
``cache_ttl_s``, ``until`` and ``recovers_in_s`` (seconds until the hold ends: probing, or
closing with ``recovery="time"``; the probe round's end when half-open; null when closed),
``probe_mode``, ``epoch`` and the last transition's ``reason``.

The answers are read on the worker's event loop whenever its agents wait (an output's
send, between batches): the live state, ahead of the last checkpoint, and within a batch
possibly between two effects of one record (its rollback decided, its reward not yet in
the window).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, TypedDict

from rules.breaker import ModelBreaker
from rules.checkpoints import CheckpointLedger, RollbackBudget
from rules.retune import Retuner
from rules.reward_window import RewardWindow
from rules.run_lifecycle import RunLifecycle
from rules.training import RunOperations
from streams.state import key_partition

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import faust

    from config.settings import RetuneSettings
    from streams.agents.feedback import Feedback
    from streams.agents.llm import Breakers
    from streams.agents.training import TrainingAgent


class RollbackRecordJson(TypedDict):
    attempt: int  # the attempt rolled back
    step: int  # the anomaly's
    checkpoint_step: int  # the target
    reason: str


class Rollbacks(TypedDict):
    used: int  # counted against the next rollback (within ``within_steps`` of the newest step)
    budget: int  # checkpoints.max_rollbacks
    within_steps: int  # checkpoints.rollback_within_steps
    history: list[RollbackRecordJson]  # every rollback sent, oldest first (at most 64)


class PendingRollbackJson(TypedDict):
    command_id: str
    step: int  # the checkpoint rolled back to
    attempt: int  # the attempt the trainer continues under once it applied it


class AwaitingTargetJson(TypedDict):
    step: int  # the metric that acted
    attempt: int
    streak_start: int  # the target must be saved before it
    reason: str


class CheckpointJson(TypedDict):
    step: int
    uri: str
    attempt: int  # the attempt that saved it
    health: str  # healthy, unhealthy, unknown, stale


class Checkpoints(TypedDict):
    kept: list[CheckpointJson]  # not deleted yet, oldest step first
    protected: int | None  # the newest healthy one's step: retention keeps it


class RewardWindowJson(TypedDict):
    count: int
    capacity: int
    mean: float | None  # null: empty
    std: float | None  # population std (ddof=0); null: empty


class RatingWindow(TypedDict):
    target: str
    sequence: int  # the open window's number (0, 1, 2, ... per target)
    size: int  # counted ratings
    min_window: int  # retune.min_window: judged on evidence from this size on
    max_window: int  # retune.max_window: judged at this size, decided or not
    opened_at: float  # the worker's clock
    times_out_at: float  # opened_at + retune.window_timeout_s
    times_out_in_s: float


class RunState(TypedDict):
    run_id: str
    partition: int
    algorithm: str
    halted: bool
    finished: bool
    last_metric_at: float | None  # the worker's clock; null: not known
    silent_s: float | None
    stale: bool
    attempt: int | None  # of the newest metric judged; null: none yet
    step: int | None
    rollbacks: Rollbacks
    pending_rollback: PendingRollbackJson | None
    awaiting_target: AwaitingTargetJson | None
    checkpoints: Checkpoints
    reward_window: RewardWindowJson
    entropy_coef: float | None  # last sent; null: none sent yet
    rating_window: RatingWindow | None


class ModelState(TypedDict):
    model: str
    partition: int
    state: str  # closed, open, half_open
    mode: str  # creative, balanced, fast
    cache_ttl_s: float
    until: float | None  # the worker's clock
    recovers_in_s: float | None
    probe_mode: str | None
    probe_calls: int | None
    recovery: str  # probe or time
    epoch: int
    reason: str


# --- the shapes, from the rule objects -----------------------------------------------------


def rollbacks(budget: RollbackBudget, step: int | None) -> Rollbacks:
    history: list[RollbackRecordJson] = [
        {
            "attempt": int(record["attempt"]),
            "step": int(record["step"]),
            "checkpoint_step": int(record["checkpoint_step"]),
            "reason": str(record["reason"]),
        }
        for record in budget.history
    ]
    return {
        "used": budget.used(step) if step is not None else 0,
        "budget": budget.max_rollbacks,
        "within_steps": budget.within_steps,
        "history": history,
    }


def checkpoints(ledger: CheckpointLedger) -> Checkpoints:
    protected = ledger.newest_healthy_before()
    return {
        "kept": [
            {
                "step": checkpoint.step,
                "uri": checkpoint.uri,
                "attempt": checkpoint.attempt,
                "health": ledger.health(checkpoint),
            }
            for checkpoint in ledger.checkpoints
        ],
        "protected": protected.step if protected is not None else None,
    }


def reward_window(window: RewardWindow) -> RewardWindowJson:
    return {
        "count": window.count,
        "capacity": window.capacity,
        "mean": window.mean,
        "std": window.std,
    }


def rating_window(retuner: Retuner, settings: RetuneSettings, now: float) -> RatingWindow | None:
    """The open window of ``retuner``; None when none is open (no counted rating since the
    last one closed)."""
    opened_at = retuner.opened_at
    if opened_at is None:
        return None
    times_out_at = opened_at + settings.window_timeout_s
    return {
        "target": retuner.target,
        "sequence": retuner.sequence,
        "size": retuner.size,
        "min_window": settings.min_window,
        "max_window": settings.max_window,
        "opened_at": opened_at,
        "times_out_at": times_out_at,
        "times_out_in_s": max(0.0, times_out_at - now),
    }


def run_state(
    run_id: str,
    *,
    partition: int,
    algorithm: str,
    ops: RunOperations,
    window: RewardWindow,
    lifecycle: RunLifecycle,
    rating: RatingWindow | None,
    last_metric_at: float | None,
    now: float,
    stale_after_s: float,
) -> RunState:
    """What the worker knows of one run (see the module doc)."""
    silent_s = max(0.0, now - last_metric_at) if last_metric_at is not None else None
    position = ops.detector.last_position
    if position is None and window.last_position[0] >= 0:
        position = window.last_position
    attempt, step = position if position is not None else (None, None)
    pending, trigger = ops.pending_rollback, ops.awaiting_target
    return {
        "run_id": run_id,
        "partition": partition,
        "algorithm": algorithm,
        "halted": ops.halted,
        "finished": lifecycle.finished,
        "last_metric_at": last_metric_at,
        "silent_s": silent_s,
        "stale": not lifecycle.finished and (silent_s is None or silent_s > stale_after_s),
        "attempt": attempt,
        "step": step,
        "rollbacks": rollbacks(ops.budget, step),
        "pending_rollback": (
            {"command_id": pending.command_id, "step": pending.step, "attempt": pending.attempt}
            if pending is not None
            else None
        ),
        "awaiting_target": (
            {
                "step": trigger.step,
                "attempt": trigger.attempt,
                "streak_start": trigger.streak_start,
                "reason": trigger.reason,
            }
            if trigger is not None
            else None
        ),
        "checkpoints": checkpoints(ops.ledger),
        "reward_window": reward_window(window),
        "entropy_coef": ops.entropy.last_sent,
        "rating_window": rating,
    }


def model_state(breaker: ModelBreaker, *, partition: int, now: float) -> ModelState:
    """What the worker knows of one model: its breaker (see the module doc)."""
    control = breaker.control()
    until = control.until
    return {
        "model": breaker.model,
        "partition": partition,
        "state": control.state,
        "mode": control.mode,
        "cache_ttl_s": control.cache_ttl_s,
        "until": until,
        "recovers_in_s": max(0.0, until - now) if until is not None else None,
        "probe_mode": control.probe_mode,
        "probe_calls": control.probe_calls,
        "recovery": breaker.policy.recovery,
        "epoch": control.epoch,
        "reason": control.reason,
    }


# --- finding them in the agents ------------------------------------------------------------


class StateQueries:
    """Reads the agents' state for the HTTP server; call on the worker's event loop."""

    def __init__(
        self,
        app: faust.App,
        training: TrainingAgent,
        breakers: Breakers,
        feedback: Feedback,
    ) -> None:
        self.app = app
        self.training = training
        self.breakers = breakers
        self.feedback = feedback
        self._partitions = training.ctx.settings.kafka.partitions
        # Where this worker's HTTP server listens, once it does (with port 0, the only way
        # to know it: its advertised URL, Faust's canonical URL, is not it).
        self.serving_at: str | None = None

    def run(self, run_id: str) -> RunState | None:
        """The run's state, if this worker holds it on a partition it owns; None otherwise."""
        key = run_id.encode()
        run = self.training.peek(key)
        if run is None:
            return None
        feedback = self.feedback
        held = feedback.live.peek(key)
        now = feedback.ctx.now()
        rating = rating_window(held[0], feedback.settings, now) if held is not None else None
        return run_state(
            run_id,
            partition=run.partition,
            algorithm=run.algorithm,
            ops=run.ops,
            window=run.window,
            lifecycle=run.lifecycle,
            rating=rating,
            last_metric_at=run.last_metric_at,
            now=now,
            stale_after_s=self.training.ctx.settings.metrics.stale_run_after_s,
        )

    def runs(self) -> dict[str, RunState]:
        """Every run this worker holds on a partition it owns; one whose stored state cannot
        be read is left out (and logged), not the others."""
        found: dict[str, RunState] = {}
        for key in self.training.held_keys():
            with _logged("run", key):
                state = self.run(key.decode())
                if state is not None:
                    found[state["run_id"]] = state
        return found

    def model(self, model: str) -> ModelState | None:
        """The model's breaker, if this worker holds it on a partition it owns."""
        held = self.breakers.live.peek(model.encode())
        if held is None:
            return None
        breaker, partition = held
        return model_state(breaker, partition=partition, now=self.breakers.ctx.now())

    def models(self) -> dict[str, ModelState]:
        """Every model this worker holds on a partition it owns (as ``runs``)."""
        found: dict[str, ModelState] = {}
        for key in self.breakers.live.held_keys():
            with _logged("model", key):
                state = self.model(key.decode())
                if state is not None:
                    found[state["model"]] = state
        return found

    @property
    def rebalancing(self) -> bool:
        """Partitions are moving: what this worker holds may be mid-recovery."""
        return bool(self.app.rebalancing)

    def _canonical(self) -> str:
        """This worker's URL as the group knows it (Faust's canonical URL: ``metrics.url``)."""
        return str(self.app.conf.canonical_url)

    def own_url(self) -> str:
        """This worker's URL: as advertised, else where its server listens."""
        if self.training.ctx.settings.metrics.advertised_url() is None and self.serving_at:
            return self.serving_at
        return self._canonical()

    def is_self(self, url: str) -> bool:
        return url == self._canonical()

    def workers(self) -> list[str]:
        """The URL of every worker in the group, as each advertises it (``metrics.url``)."""
        urls = {str(url) for url in self.app.router.tables_metadata()}
        if self._canonical() in urls:
            urls = (urls - {self._canonical()}) | {self.own_url()}
        return sorted(urls)

    def run_owner(self, run_id: str) -> str | None:
        return self._owner(self.training.tables.operations.changelog_topic, run_id.encode())

    def model_owner(self, model: str) -> str | None:
        return self._owner(self.breakers.live.table.changelog_topic, model.encode())

    def _owner(self, changelog_topic: str, key: bytes) -> str | None:
        """The URL of the worker owning the key's partition (the default partitioner's), as
        the group's last assignment distributed them; None: no worker owns it."""
        partition = key_partition(key, self._partitions)
        for url, topics in self.app.router.tables_metadata().items():
            if partition in topics.get(changelog_topic, ()):
                return str(url)
        return None


@contextlib.contextmanager
def _logged(kind: str, key: bytes) -> Iterator[None]:
    try:
        yield
    except Exception:
        log.exception("state query: the %s %r could not be read; left out", kind, key)
