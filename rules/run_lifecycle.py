"""The end of a run: when the worker may forget it.

A trainer ends its run with a finish (``TrainerClient.finish()``: ``RunFinished`` on
``trainer.runs``). The worker keeps the run's state (its settings, reward window,
operations and rating window) and its per-run metric series for
``worker.finished_run_retention_s`` more, and drops them once the run has been quiet that
long after its finish:

- Quiet: no input of the run (metric, checkpoint, ack, operator request, rating,
  announcement, finish) applied for the retention, on the worker's clock. A late input
  pushes the drop back, so state is never dropped just after an input changed it: by the
  time it is dropped, the offsets of every input it applied were committed long ago (one
  commit interval, 2.8 s, is enough), and no replay after a crash can meet the dropped
  state with one of them.
- In the run's order: the finish names the position of the run's last metric
  ``(attempt, step)``; metrics travel on another topic and may be read behind it. Until
  they reach it, the quiet time counts from no earlier than when this worker took the run
  over (``held_since``: its start, or the rebalance that gave it the run's partition), so a
  worker that restarts after an outage longer than the retention reads the run's last
  metrics before it drops it, instead of dropping it and taking them for a new run's. A
  position never reached (metrics the trainer's SDK could not deliver) delays the drop by
  one retention after a takeover, no more.
- An announcement after the finish (a resumed run) makes it a running run again.

After the drop the worker holds nothing of the run, and cannot tell it from a run it never
saw: an input that comes later starts it afresh (the default settings unless it announces
again, an empty reward window, the anomaly detector's warmup, no checkpoints known), and a
finish read again changes nothing (there is nothing left to finish).

Plain Python: the clock is an argument. State round-trips through ``to_state`` and
``from_state`` (JSON-able; None for a running run, which keeps nothing here).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rules import Position
from rules.state import check_version, position_from_state, position_to_state

_STATE_VERSION = 1


@dataclass
class RunLifecycle:
    """Whether a run finished, and since when it has been quiet."""

    finished_at: float | None = None  # the worker's clock when its finish was applied
    last_input_at: float | None = None  # the worker's clock at its newest input since then
    final: Position | None = None  # its last metric, as the finish named it
    reached: Position | None = None  # the newest metric of it read

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    def on_input(self, now: float) -> bool:
        """An input of the run was applied; returns whether the stored state changed (only
        a finished run's does)."""
        if self.finished_at is None:
            return False
        self.last_input_at = now
        return True

    def on_metric(self, position: Position, now: float) -> bool:
        """A metric of the run at ``position`` was applied (an input like any other)."""
        if self.reached is None or position > self.reached:
            self.reached = position
        return self.on_input(now)

    def on_finish(self, now: float, final: Position | None) -> None:
        """The run's finish: quiet from now, its metrics expected up to ``final``."""
        if self.finished_at is None:
            self.finished_at = now
        if final is not None:
            self.final = final
        self.last_input_at = now

    def on_start(self) -> None:
        """An announcement: the run runs (again)."""
        self.finished_at = self.last_input_at = self.final = None

    def expired(self, now: float, retention_s: float, *, held_since: float) -> bool:
        """Whether the run finished and has been quiet for ``retention_s``, its metrics read
        up to its last (or ``retention_s`` passed since ``held_since``)."""
        if self.finished_at is None or self.last_input_at is None:
            return False
        quiet_since = self.last_input_at
        if self.final is not None and (self.reached is None or self.reached < self.final):
            quiet_since = max(quiet_since, held_since)
        return now - quiet_since >= retention_s

    def to_state(self) -> dict[str, Any] | None:
        if self.finished_at is None:
            return None
        return {
            "version": _STATE_VERSION,
            "finished_at": self.finished_at,
            "last_input_at": self.last_input_at,
            "final": position_to_state(self.final),
            "reached": position_to_state(self.reached),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None) -> RunLifecycle:
        if state is None:
            return cls()
        check_version(state, _STATE_VERSION, "run lifecycle")
        return cls(
            finished_at=float(state["finished_at"]),
            last_input_at=float(state["last_input_at"]),
            final=position_from_state(state["final"]),
            reached=position_from_state(state["reached"]),
        )
