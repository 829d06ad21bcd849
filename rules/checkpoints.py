"""Checkpoint health, rollback targets, retention and the rollback budget (guide, section 2).

``CheckpointLedger`` (one per run) learns checkpoints from ``trainer.checkpoints``
(``record``) and the anomaly detector's verdicts on ``trainer.metrics``
(``observe_verdict``). A checkpoint at step ``s`` is:

- ``unhealthy`` when a metric in ``(s - health_lookback_steps, s]`` was anomalous;
- ``healthy`` when none was and the run's metrics cover that window: metrics were seen up to
  step ``s`` or beyond, and the ledger's first metric is at or before the window's start
  (windows are clipped at step 0);
- ``unknown`` otherwise (typically: metrics up to ``s`` not seen yet, as the two topics are
  consumed independently);
- ``stale`` when an older attempt saved it than the rollback or resume that branched the run
  at a step below it: it belongs to the abandoned trajectory until a save at the same step
  replaces it. It is never a rollback target.

The rollback target for an anomalous streak is ``newest_healthy_before(streak_start)``.
Retention keeps the newest ``keep`` checkpoints by step plus the newest healthy one, so an
anomaly lasting many checkpoints cannot push the last good state out.

Branching: a verdict with a higher ``attempt`` than before branches the run's timeline at
the step before it; ``restore(step, attempt)`` (after a rollback ack) branches it at the
restored step, refining an earlier branch of the same attempt. Metric knowledge past the
branch point from older attempts is forgotten (it will be observed again), and verdicts of
older attempts are ignored from then on.

Replays change nothing: a verdict or a checkpoint whose ``(attempt, step)`` is not newer than
the last one of its kind is ignored. Order comes from the run's own logical clock, never from
``ts``: a run resumed on a host whose clock is behind still has its checkpoints counted.
Memory: the checkpoints not yet deleted by ``retention`` and anomalous steps as
merged ``[first, last]`` intervals, pruned below the oldest retained checkpoint's window and
capped at ``_MAX_INTERVALS``.

``RollbackBudget`` (one per run) allows at most ``max_rollbacks`` rollbacks whose anomaly
steps lie fewer than ``rollback_within_steps`` apart (steps, not time: a rollback moves the
step back, so a run looping on the same stretch keeps its rollbacks close); beyond that the
run should be halted with ``history``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from config.settings import CheckpointSettings
from rules import Position
from rules.state import check_version, position_from_state, position_to_state

_STATE_VERSION = 2  # of the ledger's and the budget's stored forms
_MAX_INTERVALS = 1024
_HISTORY_LIMIT = 64
Health = Literal["healthy", "unhealthy", "unknown", "stale"]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    step: int
    uri: str
    attempt: int  # the attempt that saved it
    stale: bool = False  # saved on a trajectory a rollback or resume abandoned


class _Branch(NamedTuple):
    """Where a newer attempt than the last recorded checkpoint's branched the run off."""

    point: int  # the step it continues from
    attempt: int


class CheckpointLedger:
    """Per run: which checkpoints exist, which are healthy, which to delete."""

    __slots__ = (
        "_attempt",
        "_branch_point",
        "_branches",
        "_checkpoints",
        "_first_step",
        "_in_streak",
        "_intervals",
        "_last",
        "_last_record",
        "_observed_through",
        "_settings",
        "_superseded",
    )

    def __init__(self, settings: CheckpointSettings) -> None:
        self._settings = settings
        self._checkpoints: dict[int, Checkpoint] = {}
        self._superseded: list[Checkpoint] = []  # replaced by a save at the same step
        self._last_record: Position | None = None
        self._intervals: list[list[int]] = []  # anomalous steps, [first, last], ascending
        self._in_streak = False
        self._first_step: int | None = None
        self._observed_through: int | None = None
        self._last: Position | None = None
        self._attempt: int | None = None
        self._branch_point: int | None = None  # where the current attempt branched off
        self._branches: list[_Branch] = []  # of attempts newer than the last record's

    @property
    def checkpoints(self) -> list[Checkpoint]:
        """Every checkpoint not yet deleted, oldest step first."""
        return [self._checkpoints[step] for step in sorted(self._checkpoints)]

    @property
    def anomalous_intervals(self) -> list[tuple[int, int]]:
        return [(first, last) for first, last in self._intervals]

    def record(self, step: int, uri: str, *, attempt: int = 0) -> bool:
        """A checkpoint was saved; False for a replay (``(attempt, step)`` not newer than the
        last recorded one's)."""
        position = (attempt, step)
        if self._last_record is not None and position <= self._last_record:
            return False
        self._last_record = position
        stale = any(point < step and attempt < branched for point, branched in self._branches)
        self._branches = [branch for branch in self._branches if branch.attempt > attempt]
        previous = self._checkpoints.get(step)
        if previous is not None and previous.uri != uri:
            self._superseded.append(previous)
        self._checkpoints[step] = Checkpoint(step=step, uri=uri, attempt=attempt, stale=stale)
        return True

    @property
    def last_record(self) -> Position | None:
        """The ``(attempt, step)`` of the newest checkpoint recorded."""
        return self._last_record

    def metrics_reached(self, position: Position) -> bool:
        """Whether the run's metrics were judged up to ``position``, or a newer attempt
        began (an older attempt's metrics are ignored from then on)."""
        return (self._last is not None and self._last >= position) or (
            self._attempt is not None and self._attempt > position[0]
        )

    def observe_verdict(self, step: int, anomalous: bool, *, attempt: int = 0) -> bool:
        """The detector judged the metric at ``step``; False for a replay."""
        position = (attempt, step)
        if (self._last is not None and position <= self._last) or (
            self._attempt is not None and attempt < self._attempt
        ):
            return False
        if self._attempt is not None and attempt > self._attempt:
            self._branch(step - 1, attempt, upto=None)
            self._branch_point = step - 1
        self._attempt = attempt
        self._last = position
        if self._first_step is None:
            self._first_step = step
        self._observed_through = step
        if anomalous:
            if self._in_streak and self._intervals:
                self._intervals[-1][1] = step
            else:
                self._intervals.append([step, step])
                del self._intervals[:-_MAX_INTERVALS]
        self._in_streak = anomalous
        return True

    def restore(self, step: int, attempt: int) -> bool:
        """The trainer restored the checkpoint at ``step`` and continues under ``attempt``.

        False (nothing changes) for a replayed or stale ack.
        """
        if self._attempt is not None and attempt < self._attempt:
            return False
        if attempt == self._attempt and self._branch_point is not None:
            if step >= self._branch_point:
                return False
            self._branch(step, attempt, upto=self._branch_point)  # refine: the ack came late
        else:
            self._branch(step, attempt, upto=None)
        self._attempt = attempt
        self._branch_point = step
        return True

    def _branch(self, point: int, attempt: int, *, upto: int | None) -> None:
        """``attempt`` continues from ``point``: forget what older attempts observed in
        ``(point, upto]`` (``upto`` None: beyond), and their checkpoints past it are stale."""

        def older(step: int) -> bool:
            return step > point and (upto is None or step <= upto)

        kept: list[list[int]] = []
        for first, last in self._intervals:
            if older(first):
                continue
            kept.append([first, point] if older(last) else [first, last])
        self._intervals = kept
        if upto is None:
            self._in_streak = False
        if self._observed_through is not None and older(self._observed_through):
            self._observed_through = point
        if self._first_step is not None and older(self._first_step):
            self._first_step = None
        for step, checkpoint in self._checkpoints.items():
            if step > point and checkpoint.attempt < attempt and not checkpoint.stale:
                self._checkpoints[step] = Checkpoint(step, checkpoint.uri, checkpoint.attempt, True)
        if self._last_record is None or attempt > self._last_record[0]:
            self._branches.append(_Branch(point, attempt))

    def health(self, checkpoint: Checkpoint) -> Health:
        if checkpoint.stale:
            return "stale"
        window_start = checkpoint.step - self._settings.health_lookback_steps  # exclusive
        for first, last in self._intervals:
            if first <= checkpoint.step and last > window_start:
                return "unhealthy"
        covered = (
            self._observed_through is not None
            and self._observed_through >= checkpoint.step
            and self._first_step is not None
            and self._first_step <= max(window_start + 1, 0)
        )
        return "healthy" if covered else "unknown"

    def newest_healthy_before(self, step: int | None = None) -> Checkpoint | None:
        """The newest healthy checkpoint with a step below ``step`` (None: any step)."""
        for checkpoint in reversed(self.checkpoints):
            if (step is None or checkpoint.step < step) and self.health(checkpoint) == "healthy":
                return checkpoint
        return None

    def retention(self, keep: int | None = None) -> list[Checkpoint]:
        """Forget and return the checkpoints to delete: all but the newest ``keep`` (default
        ``settings.keep``) and the newest healthy one, plus any replaced by a newer save at the
        same step."""
        keep = self._settings.keep if keep is None else keep
        if keep < 1:
            raise ValueError("keep must be at least 1")
        ordered = self.checkpoints
        kept = {checkpoint.step for checkpoint in ordered[-keep:]}
        protected = self.newest_healthy_before()
        if protected is not None:
            kept.add(protected.step)
        deleted = self._superseded + [c for c in ordered if c.step not in kept]
        self._superseded = []
        for checkpoint in deleted:
            if self._checkpoints.get(checkpoint.step) == checkpoint:
                del self._checkpoints[checkpoint.step]
        if self._checkpoints:
            bound = min(self._checkpoints) - self._settings.health_lookback_steps
            self._intervals = [interval for interval in self._intervals if interval[1] > bound]
        return deleted

    def to_state(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "checkpoints": [_checkpoint_state(c) for c in self.checkpoints],
            "superseded": [_checkpoint_state(c) for c in self._superseded],
            "last_record": position_to_state(self._last_record),
            "intervals": [list(interval) for interval in self._intervals],
            "in_streak": self._in_streak,
            "first_step": self._first_step,
            "observed_through": self._observed_through,
            "last": position_to_state(self._last),
            "attempt": self._attempt,
            "branch_point": self._branch_point,
            "branches": [list(branch) for branch in self._branches],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], settings: CheckpointSettings) -> CheckpointLedger:
        check_version(state, _STATE_VERSION, "checkpoint ledger")
        ledger = cls(settings)
        for item in state["checkpoints"]:
            checkpoint = _checkpoint(item)
            ledger._checkpoints[checkpoint.step] = checkpoint
        ledger._superseded = [_checkpoint(item) for item in state["superseded"]]
        ledger._last_record = position_from_state(state["last_record"])
        ledger._intervals = [[int(first), int(last)] for first, last in state["intervals"]]
        ledger._in_streak = bool(state["in_streak"])
        ledger._first_step = state["first_step"]
        ledger._observed_through = state["observed_through"]
        ledger._last = position_from_state(state["last"])
        ledger._attempt = state["attempt"]
        ledger._branch_point = state["branch_point"]
        ledger._branches = [
            _Branch(int(point), int(attempt)) for point, attempt in state["branches"]
        ]
        return ledger


def _checkpoint_state(checkpoint: Checkpoint) -> list[Any]:
    return [checkpoint.step, checkpoint.uri, checkpoint.attempt, checkpoint.stale]


def _checkpoint(item: list[Any]) -> Checkpoint:
    step, uri, attempt, stale = item
    return Checkpoint(step=int(step), uri=str(uri), attempt=int(attempt), stale=bool(stale))


@dataclass(frozen=True, slots=True)
class RollbackRecord:
    """A rollback the rules sent, as a halt's ``history`` lists it."""

    attempt: int  # the attempt that was rolled back
    step: int  # the anomaly's
    checkpoint_step: int  # the target
    reason: str

    def to_state(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt,
            "step": self.step,
            "checkpoint_step": self.checkpoint_step,
            "reason": self.reason,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RollbackRecord:
        return cls(
            attempt=int(state["attempt"]),
            step=int(state["step"]),
            checkpoint_step=int(state["checkpoint_step"]),
            reason=str(state["reason"]),
        )


class RollbackBudget:
    """Per run: how many rollbacks are left before the run must be halted."""

    __slots__ = ("_history", "_max", "_within")

    def __init__(self, settings: CheckpointSettings) -> None:
        self._max = settings.max_rollbacks
        self._within = settings.rollback_within_steps
        self._history: list[RollbackRecord] = []  # oldest first, at most _HISTORY_LIMIT

    @property
    def history(self) -> list[dict[str, Any]]:
        """Rollbacks so far, oldest first (``RollbackRecord``), as a halt command lists them."""
        return [record.to_state() for record in self._history]

    @property
    def max_rollbacks(self) -> int:
        """Rollbacks allowed whose anomaly steps lie fewer than ``within_steps`` apart."""
        return self._max

    @property
    def within_steps(self) -> int:
        return self._within

    def used(self, step: int) -> int:
        """Rollbacks counted against one more for an anomaly at ``step``: those whose
        anomaly step lies fewer than ``within_steps`` from it."""
        return sum(1 for record in self._history if abs(record.step - step) < self._within)

    def allow(self, step: int) -> bool:
        """Whether one more rollback for an anomaly at ``step`` stays within the budget."""
        return self.used(step) < self._max

    def record(self, step: int, checkpoint_step: int, reason: str, attempt: int = 0) -> bool:
        """A rollback was sent; False for a replay (same attempt and anomaly step)."""
        if any(record.attempt == attempt and record.step == step for record in self._history):
            return False
        self._history.append(RollbackRecord(attempt, step, checkpoint_step, reason))
        del self._history[:-_HISTORY_LIMIT]
        return True

    def to_state(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "history": self.history}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], settings: CheckpointSettings) -> RollbackBudget:
        check_version(state, _STATE_VERSION, "rollback budget")
        budget = cls(settings)
        budget._history = [RollbackRecord.from_state(record) for record in state["history"]]
        return budget
