"""Training operations for one run: the rules composed, events in, commands out.

``RunOperations`` ties together the entropy schedule, the anomaly detector, the checkpoint
ledger and the rollback budget (their modules say how each decides) and turns decisions into
contract commands with deterministic ids:

- every metric: ``set_entropy_coef`` when the schedule moved past its tolerance, or the run
  started or resumed (a new ``attempt``);
- an anomaly that acts: ``rollback`` to the newest healthy checkpoint saved before the
  anomalous streak began, or ``halt`` (with the rollback history) when the budget is spent.
  Checkpoints and metrics travel on different topics, so a checkpoint may arrive after the
  anomaly that needs it: the decision waits until the trainer's newest checkpoint named in
  the metric (``checkpoint_step``) has been read, or a newer save that proves it lost, so
  the target never depends on how far one topic was read ahead of the other. Then, with
  no healthy target after ``2 * interval_steps`` of metrics, a run with (unhealthy)
  checkpoints before the streak, with non-finite values, or whose streak is still going,
  is halted, and a young run that had saved none is not: the anomaly is reported and the
  next streak may act (on a non-finite value, this one still does). (A
  trainer that names no checkpoint in its metrics gets the bounded wait alone, and its
  target can depend on the read order.) A run that falls silent while its anomaly waits (a
  trainer that died after it never sends the save it named) is decided on the worker's
  timer (``on_silence``, after ``checkpoints.silent_decision_after_s``), with what was read;
- every checkpoint: ``prune_checkpoints`` when retention drops some. Retention protects
  the newest healthy checkpoint, and health is known from the metrics, so a checkpoint
  read before the run's metrics reached its step is held back and recorded when they do
  (or a newer attempt begins): what is pruned then depends on the run's own order, as the
  trainer produced it, never on how far the worker's reading of one topic ran ahead of
  the other (after a rebalance or a restart, thousands of steps). At most
  ``HELD_BACK_MAX`` wait; beyond that the oldest is recorded at once (a run whose metrics
  never come);
- an ``applied`` ack of the pending rollback: the detector and ledger restart from the
  restored step, once the new attempt's metrics begin: the abandoned attempt's metrics
  and checkpoints, which the trainer sent before its ack, come first however far ahead
  the acks were read;
- an ``applied`` ack of a ``retune`` that set ``entropy_coef``: the schedule continues from
  the retuned level (``set_entropy_coef`` with the composed value);
- an operator's request (``on_request``), validated against what the run's state knows:
  ``halt``; ``resume`` a halted run (protected again, with a fresh rollback budget);
  ``rollback`` to a kept checkpoint (outside the budget, answered by the trainer's ack as
  any rollback); ``set_entropy`` (the schedule continues from that level, as after a
  retune). Refused, with the reason, when the state does not allow it.

Plain Python: no Kafka, no Faust. State round-trips through ``to_state``/``from_state`` so
the agent can keep it in a table; replayed inputs yield the same commands (same ids). The
stored form (``rules.state``, version 1) is a JSON object: the rules' own states, the
pending rollback, the awaiting trigger (its values as the contract's JSON numbers and
markers), the held inputs in the run's order (a checkpoint has a ``uri``, a restore has
none), the acks applied by position and the newest retunes applied.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from config.settings import Settings
from rules import Position
from rules.anomaly import AnomalyDetector, Verdict
from rules.checkpoints import CheckpointLedger, RollbackBudget
from rules.commands import (
    entropy_command_id,
    halt_command_id,
    operator_command_id,
    prune_command_id,
    retuned_entropy_command_id,
    rollback_command_id,
)
from rules.entropy_schedule import EntropyEmitter
from rules.state import check_version
from schemas import (
    CheckpointSaved,
    CommandAck,
    CommandBase,
    Halt,
    OperatorRequest,
    PruneCheckpoints,
    Rollback,
    SetEntropyCoef,
    StepMetric,
)
from schemas.events import NON_FINITE_MARKERS, CommandType, float_to_wire
from schemas.signing import SIGNATURE_REJECTIONS

_STATE_VERSION = 1
APPLIED_RETUNES_KEPT = 32
#: Inputs read ahead of the run's metrics and held back (interval 500: 512,000 steps).
HELD_BACK_MAX = 1024


@dataclass(frozen=True, slots=True)
class PendingRollback:
    """A rollback sent and not acknowledged yet: once applied, the trainer continues from
    checkpoint ``step`` under ``attempt``."""

    command_id: str
    step: int
    attempt: int

    def to_state(self) -> dict[str, Any]:
        return {"command_id": self.command_id, "step": self.step, "attempt": self.attempt}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> PendingRollback:
        return cls(str(state["command_id"]), int(state["step"]), int(state["attempt"]))


@dataclass(frozen=True, slots=True)
class RollbackTrigger:
    """An anomaly that must act and has no rollback target yet: what the rollback (or the
    halt) for it needs from the verdict that called for it."""

    step: int  # the metric that acted
    attempt: int
    streak_start: int  # the target must be saved before it
    reason: str
    non_finite: bool  # the loss or the reward was not finite
    values: dict[str, float]  # the triggering values and baselines (``Rollback.values``)
    # The trainer's newest save named in the metric, even one at or after the streak's
    # start: once it is read, so are the older saves the target is among.
    expected_checkpoint: int | None

    @classmethod
    def from_verdict(cls, verdict: Verdict, expected_checkpoint: int | None) -> RollbackTrigger:
        streak_start = verdict.streak_start if verdict.streak_start is not None else verdict.step
        return cls(
            step=verdict.step,
            attempt=verdict.attempt,
            streak_start=streak_start,
            reason=verdict.reason,
            non_finite=not all(math.isfinite(value) for value in (verdict.loss, verdict.reward)),
            values=verdict.values(),
            expected_checkpoint=expected_checkpoint,
        )

    def to_state(self) -> dict[str, Any]:
        return {
            "expected_checkpoint": self.expected_checkpoint,
            "step": self.step,
            "attempt": self.attempt,
            "streak_start": self.streak_start,
            "reason": self.reason,
            "non_finite": self.non_finite,
            # Non-finite values as the contract's markers: JSON has no literal for them.
            "values": {name: float_to_wire(value) for name, value in self.values.items()},
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RollbackTrigger:
        """A stored trigger; one without ``non_finite`` reads as non-finite (a run with no
        target is then halted, never let go), one without ``expected_checkpoint`` as naming
        no save."""
        expected = state.get("expected_checkpoint")
        return cls(
            step=int(state["step"]),
            attempt=int(state["attempt"]),
            streak_start=int(state["streak_start"]),
            reason=str(state["reason"]),
            non_finite=bool(state.get("non_finite", True)),
            values={str(name): _float_from_wire(value) for name, value in state["values"].items()},
            expected_checkpoint=None if expected is None else int(expected),
        )


@dataclass(frozen=True, slots=True)
class HeldCheckpoint:
    """A checkpoint read before the run's metrics reached it."""

    step: int
    uri: str
    attempt: int  # the attempt that saved it

    @property
    def position(self) -> Position:
        return (self.attempt, self.step)


@dataclass(frozen=True, slots=True)
class HeldRestore:
    """An applied rollback: the trainer continues from checkpoint ``step`` under ``attempt``,
    after everything the abandoned attempt sent."""

    step: int
    attempt: int

    @property
    def position(self) -> Position:
        return (self.attempt, self.step)


HeldInput = HeldCheckpoint | HeldRestore
"""An input read ahead of the run's metrics, applied when they reach it (``held_back``)."""


@dataclass(frozen=True, slots=True)
class RequestAnswer:
    """What an operator's request came to: done (with the command it caused) or refused."""

    accepted: bool
    detail: str
    command: CommandBase | None = None


class RunOperations:
    """The operations layer's view of one training run."""

    def __init__(self, run_id: str, settings: Settings) -> None:
        self.run_id = run_id
        self.settings = settings
        self.entropy = EntropyEmitter(settings.entropy)
        self.detector = AnomalyDetector(settings.anomaly)
        self.ledger = CheckpointLedger(settings.checkpoints)
        self.budget = RollbackBudget(settings.checkpoints)
        self.pending_rollback: PendingRollback | None = None  # sent, not acknowledged yet
        self.awaiting_target: RollbackTrigger | None = None  # must act, no target yet
        self.halted = False
        self.applied_retunes: list[str] = []  # the newest retune ids whose acks were applied
        # Per origin partition of the acks and operator requests, the offset of the newest
        # applied: a replay after a crash (any length) is recognised by position, a
        # duplicate ack by retune id. (Stored as "acks_applied", requests included.)
        self.acks_applied: dict[str, int] = {}
        # Read before the metrics reached them, in the run's order (``_run_order``).
        self.held_back: list[HeldInput] = []
        self._notices: list[str] = []  # not state: reported once, by whoever asks

    def on_metric(self, metric: StepMetric, now: float) -> list[CommandBase]:
        if self.halted:
            return []
        # What the trainer sent before this metric: checkpoints (rollback targets for it)
        # and a restore.
        commands = self._release_held_back(now, before=(metric.attempt, metric.step))
        commands += self._judge_metric(metric, now)
        return commands + self._release_held_back(now)

    def _judge_metric(self, metric: StepMetric, now: float) -> list[CommandBase]:
        commands: list[CommandBase] = []
        coef = self.entropy.observe(metric.step, metric.attempt)
        if coef is not None:
            commands.append(
                SetEntropyCoef(
                    command_id=entropy_command_id(
                        self.run_id, attempt=metric.attempt, step=metric.step
                    ),
                    run_id=self.run_id,
                    issued_at=now,
                    entropy_coef=coef,
                    step=metric.step,
                )
            )
        verdict = self.detector.observe(metric.step, metric.loss, metric.reward, metric.attempt)
        if verdict is None:
            return commands  # a duplicate or an older attempt's metric
        self.ledger.observe_verdict(metric.step, verdict.anomalous, attempt=metric.attempt)
        if verdict.act and self.settings.checkpoints.auto_rollback:
            self.awaiting_target = RollbackTrigger.from_verdict(verdict, metric.checkpoint_step)
        waiting = self.awaiting_target
        if waiting is not None:
            overdue = metric.step - waiting.step >= 2 * self.settings.checkpoints.interval_steps
            decision = self._decide(now)
            if decision is not None:
                commands.append(decision)
            elif overdue and self._expected_read(waiting):
                ongoing = verdict.anomalous and (verdict.attempt, verdict.streak_start) == (
                    waiting.attempt,
                    waiting.streak_start,
                )
                commands += self._no_target(waiting, now, ongoing=ongoing)
        return commands

    def _no_target(
        self, trigger: RollbackTrigger, now: float, *, ongoing: bool
    ) -> list[CommandBase]:
        """No healthy checkpoint came within the wait. A run with checkpoints before the
        streak, all unhealthy, has diverged for long: halt. So has one whose values are not
        finite (nothing left to train), and one whose streak is still going after the wait
        (a divergence: every checkpoint since is of it). A young run with none yet, whose
        finite anomaly is over, is not halted for what it could not be rolled back from
        (halting it is worse than going on): the anomaly is reported (``take_notices``) and
        the next streak may act (a non-finite value in this one still does)."""
        streak_start = trigger.streak_start
        saved_before = any(cp.step < streak_start for cp in self.ledger.checkpoints)
        if saved_before or ongoing or trigger.non_finite:
            return [self._halt(trigger, "no healthy checkpoint", now)]
        self.awaiting_target = None
        self.detector.release(trigger.attempt, streak_start)
        self._notices.append(
            f"run {self.run_id}: anomaly at step {streak_start} ({trigger.reason}) not "
            f"rolled back: no checkpoint saved before it; training goes on"
        )
        return []

    def on_silence(self, now: float) -> list[CommandBase]:
        """The run has sent nothing for ``checkpoints.silent_decision_after_s``: an anomaly
        still waiting for its target is decided with the checkpoints read, the save it waited
        for counted as lost (no metric will make it overdue): a rollback to the newest healthy
        one before the streak, else as when no target came within the wait (``_no_target``).
        """
        trigger = self.awaiting_target
        if trigger is None or self.halted:
            return []
        decision = self._decide(now, waited=True)
        if decision is not None:
            return [decision]
        ongoing = self.detector.in_streak(trigger.attempt, trigger.streak_start)
        return self._no_target(trigger, now, ongoing=ongoing)

    def take_notices(self) -> list[str]:
        """What the run's operations decided not to act on since last asked (for the log)."""
        notices, self._notices = self._notices, []
        return notices

    def _decide(self, now: float, *, waited: bool = False) -> CommandBase | None:
        """Roll back for the awaiting anomaly if a target is known (or halt on the budget).

        While the trainer's newest checkpoint (named in its metrics) has not been read, wait
        for it rather than pick an older one: as long as the run goes on (only then are the
        candidates the same whatever the read order), and no longer once it is silent
        (``waited``).
        """
        trigger = self.awaiting_target
        assert trigger is not None
        if not waited and not self._expected_read(trigger):
            return None
        target = self.ledger.newest_healthy_before(trigger.streak_start)
        if target is None:
            return None
        if not self.budget.allow(trigger.step):
            checkpoints = self.settings.checkpoints
            return self._halt(
                trigger,
                f"rollback budget spent ({checkpoints.max_rollbacks} within "
                f"{checkpoints.rollback_within_steps} steps)",
                now,
            )
        self.awaiting_target = None
        self.budget.record(trigger.step, target.step, trigger.reason, trigger.attempt)
        command_id = rollback_command_id(
            self.run_id, attempt=trigger.attempt, streak_start=trigger.streak_start
        )
        self.pending_rollback = PendingRollback(command_id, target.step, trigger.attempt + 1)
        return Rollback(
            command_id=command_id,
            run_id=self.run_id,
            issued_at=now,
            checkpoint_step=target.step,
            checkpoint_uri=target.uri,
            anomaly_step=trigger.streak_start,
            reason=trigger.reason,
            values=trigger.values,
        )

    def _expected_read(self, trigger: RollbackTrigger) -> bool:
        """Whether the trainer's newest save at the trigger, if it named one, was read, or a
        newer save of the same attempt was (it was lost). Read is enough: the checkpoints
        topic is in order, so every save before it (the targets) was read too, and is
        recorded (or held back) by now."""
        expected = trigger.expected_checkpoint
        if expected is None:
            return True
        read = [(cp.attempt, cp.step) for cp in self.ledger.checkpoints]
        read += [held.position for held in self.held_back if isinstance(held, HeldCheckpoint)]
        return any(
            step == expected or (attempt >= trigger.attempt and step > expected)
            for attempt, step in read
        )

    def _halt(self, trigger: RollbackTrigger, why: str, now: float) -> Halt:
        self.halted = True
        self.awaiting_target = None
        reason = f"{trigger.reason}; {why}"
        if why == "no healthy checkpoint":
            reason += f" before step {trigger.streak_start}"
        return Halt(
            command_id=halt_command_id(self.run_id, attempt=trigger.attempt, step=trigger.step),
            run_id=self.run_id,
            issued_at=now,
            reason=reason,
            history=self.budget.history,
        )

    def on_checkpoint(self, checkpoint: CheckpointSaved, now: float) -> list[CommandBase]:
        position = (checkpoint.attempt, checkpoint.step)
        newest = next(
            (
                held.position
                for held in reversed(self.held_back)
                if isinstance(held, HeldCheckpoint)
            ),
            self.ledger.last_record,
        )
        if newest is not None and position <= newest:
            return []  # a replay
        held = HeldCheckpoint(checkpoint.step, checkpoint.uri, checkpoint.attempt)
        bisect.insort(self.held_back, held, key=_run_order)
        return self._release_held_back(now)

    def _release_held_back(
        self, now: float, *, before: Position | None = None
    ) -> list[CommandBase]:
        """Apply, in the run's order, what was held back and the run's metrics reached (with
        ``before``: what the trainer sent before that metric)."""
        commands: list[CommandBase] = []
        while self.held_back:
            held = self.held_back[0]
            position = held.position
            ready = (
                self.halted
                or len(self.held_back) > HELD_BACK_MAX
                or (
                    position < before
                    if before is not None
                    else self.ledger.metrics_reached(position)
                )
            )
            if not ready:
                break
            self.held_back.pop(0)
            if isinstance(held, HeldCheckpoint):
                commands += self._record_checkpoint(held.step, held.uri, held.attempt, now)
            else:
                self.detector.reset_to(held.step, held.attempt)
                self.ledger.restore(held.step, held.attempt)
        return commands

    def _record_checkpoint(
        self, step: int, uri: str, attempt: int, now: float
    ) -> list[CommandBase]:
        if not self.ledger.record(step, uri, attempt=attempt):
            return []
        commands: list[CommandBase] = []
        if self.awaiting_target is not None and not self.halted:
            decision = self._decide(now)
            if decision is not None:
                commands.append(decision)
        pruned = self.ledger.retention()
        if not pruned:
            return commands
        protected = self.ledger.newest_healthy_before()
        return [
            *commands,
            PruneCheckpoints(
                command_id=prune_command_id(self.run_id, attempt=attempt, checkpoint_step=step),
                run_id=self.run_id,
                issued_at=now,
                steps=[cp.step for cp in pruned],
                uris=[cp.uri for cp in pruned],
                protected_step=protected.step if protected is not None else None,
            ),
        ]

    def is_replayed_input(self, origin: str, offset: int) -> bool:
        """Whether the ack or request at this input position was applied already; if not,
        it is now (the caller goes on with ``on_ack`` or ``on_request``)."""
        applied = self.acks_applied.get(origin)
        if applied is not None and offset <= applied:
            return True
        self.acks_applied[origin] = offset
        return False

    def on_ack(self, ack: CommandAck, now: float) -> list[CommandBase]:
        if ack.command_type == "retune":
            return self._on_retune_ack(ack, now)
        pending = self.pending_rollback
        if pending is None or ack.command_id != pending.command_id:
            return []
        if ack.status == "rejected" and ack.detail in SIGNATURE_REJECTIONS:
            # A forged command reusing the pending id was refused; the genuine one is
            # still on its way and its ack must still count.
            return []
        self.pending_rollback = None
        if ack.status != "applied":
            return []
        # In the run's order the restore comes after everything the abandoned attempt sent
        # and before the new attempt's first metric: it waits for that metric (or applies
        # now if the new attempt's metrics were read already).
        restore = HeldRestore(pending.step, pending.attempt)
        bisect.insort(self.held_back, restore, key=_run_order)
        return self._release_held_back(now)

    def _on_retune_ack(self, ack: CommandAck, now: float) -> list[CommandBase]:
        """An applied retune's entropy_coef rescales the schedule instead of being
        overwritten by its next value (``EntropyEmitter.apply_retune``), once per retune:
        replayed acks, in any order, are recognised by the retune's command id."""
        after = ack.after or {}
        value = after.get("entropy_coef")
        position = self.detector.last_position
        if ack.status != "applied" or not isinstance(value, float | int) or position is None:
            return []
        if ack.command_id in self.applied_retunes:
            return []
        self.applied_retunes = [*self.applied_retunes, ack.command_id][-APPLIED_RETUNES_KEPT:]
        attempt, step = position
        coef = self.entropy.apply_retune(float(value), step, attempt)
        if coef is None:
            return []
        return [
            SetEntropyCoef(
                command_id=retuned_entropy_command_id(
                    self.run_id, retune_command_id=ack.command_id
                ),
                run_id=self.run_id,
                issued_at=now,
                entropy_coef=coef,
                step=step,
            )
        ]

    def on_request(self, request: OperatorRequest, now: float) -> RequestAnswer:
        """An operator's request for this run (``request.run_id``); see the module doc."""
        asked = f"operator {request.requested_by}: {request.reason}"
        if request.action == "resume":
            if not self.halted:
                return RequestAnswer(False, "the run is not halted")
            self.halted = False
            self.awaiting_target = None
            self.budget = RollbackBudget(self.settings.checkpoints)
            self.detector.resume()
            return RequestAnswer(
                True,
                f"resumed: protected again, {self.settings.checkpoints.max_rollbacks} "
                "rollbacks in the budget",
            )
        if self.halted:
            return RequestAnswer(False, "the run is halted: resume it first")
        command_type: dict[str, CommandType] = {
            "halt": "halt",
            "rollback": "rollback",
            "set_entropy": "set_entropy_coef",
        }
        command_id = operator_command_id(
            self.run_id, command_type[request.action], request_id=request.request_id
        )
        position = self.detector.last_position
        attempt, step = position if position is not None else (0, 0)
        if request.action == "halt":
            self.halted = True
            self.awaiting_target = None
            halt = Halt(
                command_id=command_id,
                run_id=self.run_id,
                issued_at=now,
                reason=asked,
                history=self.budget.history,
            )
            return RequestAnswer(True, "halted", halt)
        if request.action == "rollback":
            if self.pending_rollback is not None:
                pending = self.pending_rollback
                return RequestAnswer(
                    False, f"a rollback to step {pending.step} waits for the trainer's ack"
                )
            kept = [cp for cp in self.ledger.checkpoints if not cp.stale]
            target = next((cp for cp in kept if cp.step == request.step), None)
            if target is None:
                steps = ", ".join(str(cp.step) for cp in kept) or "none"
                return RequestAnswer(
                    False, f"no kept checkpoint at step {request.step} (kept: {steps})"
                )
            self.awaiting_target = None
            self.pending_rollback = PendingRollback(command_id, target.step, attempt + 1)
            rollback = Rollback(
                command_id=command_id,
                run_id=self.run_id,
                issued_at=now,
                checkpoint_step=target.step,
                checkpoint_uri=target.uri,
                anomaly_step=step,
                reason=asked,
            )
            return RequestAnswer(True, f"rolling back to step {target.step}", rollback)
        assert request.value is not None  # the contract requires it for set_entropy
        coef = self.entropy.apply_retune(request.value, step, attempt)
        if coef is None:
            return RequestAnswer(
                False, f"the entropy coefficient was set at step {step} already; retry later"
            )
        entropy = SetEntropyCoef(
            command_id=command_id, run_id=self.run_id, issued_at=now, entropy_coef=coef, step=step
        )
        return RequestAnswer(True, f"entropy coefficient {coef:g} from step {step}", entropy)

    def to_state(self) -> dict[str, Any]:
        pending, trigger = self.pending_rollback, self.awaiting_target
        return {
            "version": _STATE_VERSION,
            "entropy": self.entropy.to_state(),
            "detector": self.detector.to_state(),
            "ledger": self.ledger.to_state(),
            "budget": self.budget.to_state(),
            "pending_rollback": pending.to_state() if pending is not None else None,
            "awaiting_target": trigger.to_state() if trigger is not None else None,
            "halted": self.halted,
            "applied_retunes": list(self.applied_retunes),
            "acks_applied": dict(self.acks_applied),
            "held_back": [_held_to_state(held) for held in self.held_back],
        }

    @classmethod
    def from_state(cls, run_id: str, state: Mapping[str, Any], settings: Settings) -> RunOperations:
        """A stored state (``to_state``); one without the acks applied, the retunes applied
        or the held inputs reads as having none."""
        check_version(state, _STATE_VERSION, "run operations")
        ops = cls(run_id, settings)
        ops.entropy = EntropyEmitter.from_state(state["entropy"], settings.entropy)
        ops.detector = AnomalyDetector.from_state(state["detector"], settings.anomaly)
        ops.ledger = CheckpointLedger.from_state(state["ledger"], settings.checkpoints)
        ops.budget = RollbackBudget.from_state(state["budget"], settings.checkpoints)
        pending, trigger = state["pending_rollback"], state["awaiting_target"]
        ops.pending_rollback = PendingRollback.from_state(pending) if pending is not None else None
        ops.awaiting_target = RollbackTrigger.from_state(trigger) if trigger is not None else None
        ops.halted = bool(state["halted"])
        ops.applied_retunes = [str(retune) for retune in state.get("applied_retunes", [])]
        ops.acks_applied = {
            str(origin): int(offset) for origin, offset in state.get("acks_applied", {}).items()
        }
        ops.held_back = [_held_from_state(held) for held in state.get("held_back", [])]
        return ops


def _run_order(held: HeldInput) -> tuple[int, int, int]:
    """Where a held input sits in the run's own order: by position, a restore (new attempt,
    restored step) before a checkpoint the new attempt might save at that step."""
    return (*held.position, 1 if isinstance(held, HeldCheckpoint) else 0)


def _held_to_state(held: HeldInput) -> dict[str, Any]:
    if isinstance(held, HeldCheckpoint):
        return {"step": held.step, "uri": held.uri, "attempt": held.attempt}
    return {"step": held.step, "attempt": held.attempt}


def _held_from_state(stored: Mapping[str, Any]) -> HeldInput:
    """A stored held input: a checkpoint has a ``uri``, a restore has none."""
    if "uri" in stored:
        return HeldCheckpoint(int(stored["step"]), str(stored["uri"]), int(stored["attempt"]))
    return HeldRestore(int(stored["step"]), int(stored["attempt"]))


def _float_from_wire(value: float | str) -> float:
    """A metric value as the contract's JSON holds it: a number or a non-finite marker."""
    return NON_FINITE_MARKERS[value] if isinstance(value, str) else float(value)
