"""Training operations for one run: the rules composed, events in, commands out.

``RunOperations`` ties together the entropy schedule, the anomaly detector, the checkpoint
ledger and the rollback budget (their modules say how each decides) and turns decisions into
contract commands with deterministic ids:

- every metric: ``set_entropy_coef`` when the schedule moved past its tolerance, or the run
  started or resumed (a new ``attempt``);
- an anomaly that acts: ``rollback`` to the newest healthy checkpoint saved before the
  anomalous streak began, or ``halt`` (with the rollback history) when the budget is spent
  or no healthy checkpoint exists;
- every checkpoint: ``prune_checkpoints`` when retention drops some;
- an ``applied`` ack of the pending rollback: the detector and ledger restart from the
  restored step.

Plain Python: no Kafka, no Faust. State round-trips through ``to_state``/``from_state`` so
the agent can keep it in a table; replayed inputs yield the same commands (same ids).
"""

from __future__ import annotations

from typing import Any

from fragrance_ops.settings import Settings
from schemas import (
    CheckpointSaved,
    CommandAck,
    CommandBase,
    Halt,
    PruneCheckpoints,
    Rollback,
    SetEntropyCoef,
    StepMetric,
)
from streams.rules.anomaly import AnomalyDetector, Verdict
from streams.rules.checkpoints import CheckpointLedger, RollbackBudget
from streams.rules.commands import (
    entropy_command_id,
    halt_command_id,
    prune_command_id,
    rollback_command_id,
)
from streams.rules.entropy_schedule import EntropyEmitter

_STATE_VERSION = 1


class RunOperations:
    """The operations layer's view of one training run."""

    def __init__(self, run_id: str, settings: Settings) -> None:
        self.run_id = run_id
        self.settings = settings
        self.entropy = EntropyEmitter.from_settings(settings.entropy)
        self.detector = AnomalyDetector.from_settings(settings.anomaly)
        self.ledger = CheckpointLedger.from_settings(settings.checkpoints)
        self.budget = RollbackBudget.from_settings(settings.checkpoints)
        # The rollback the trainer has not acknowledged yet: {command_id, step, attempt}.
        self.pending_rollback: dict[str, Any] | None = None
        self.halted = False

    def on_metric(self, metric: StepMetric, now: float) -> list[CommandBase]:
        commands: list[CommandBase] = []
        if self.halted:
            return commands
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
        self.ledger.observe_verdict(
            metric.step, verdict.anomalous, attempt=metric.attempt, ts=metric.ts
        )
        if verdict.act and self.settings.checkpoints.auto_rollback:
            commands.append(self._rollback_or_halt(verdict, now))
        return commands

    def _rollback_or_halt(self, verdict: Verdict, now: float) -> CommandBase:
        streak_start = verdict.streak_start if verdict.streak_start is not None else verdict.step
        target = self.ledger.newest_healthy_before(streak_start)
        if target is None or not self.budget.allow(verdict.step):
            self.halted = True
            reason = (
                f"{verdict.reason}; rollback budget spent "
                f"({self.settings.checkpoints.max_rollbacks} within "
                f"{self.settings.checkpoints.rollback_within_steps} steps)"
                if target is not None
                else f"{verdict.reason}; no healthy checkpoint before step {streak_start}"
            )
            return Halt(
                command_id=halt_command_id(self.run_id, attempt=verdict.attempt, step=verdict.step),
                run_id=self.run_id,
                issued_at=now,
                reason=reason,
                history=self.budget.history,
            )
        self.budget.record(verdict.step, target.step, verdict.reason, verdict.attempt)
        command_id = rollback_command_id(
            self.run_id, attempt=verdict.attempt, streak_start=streak_start
        )
        self.pending_rollback = {
            "command_id": command_id,
            "step": target.step,
            "attempt": verdict.attempt + 1,
        }
        return Rollback(
            command_id=command_id,
            run_id=self.run_id,
            issued_at=now,
            checkpoint_step=target.step,
            checkpoint_uri=target.uri,
            anomaly_step=streak_start,
            reason=verdict.reason,
            values=verdict.values(),
        )

    def on_checkpoint(self, checkpoint: CheckpointSaved, now: float) -> list[CommandBase]:
        if not self.ledger.record(checkpoint.step, checkpoint.uri, ts=checkpoint.ts):
            return []
        pruned = self.ledger.retention()
        if not pruned:
            return []
        protected = self.ledger.newest_healthy_before()
        return [
            PruneCheckpoints(
                command_id=prune_command_id(self.run_id, checkpoint_step=checkpoint.step),
                run_id=self.run_id,
                issued_at=now,
                steps=[cp.step for cp in pruned],
                uris=[cp.uri for cp in pruned],
                protected_step=protected.step if protected is not None else None,
            )
        ]

    def on_ack(self, ack: CommandAck) -> None:
        pending = self.pending_rollback
        if pending is None or ack.command_id != pending["command_id"]:
            return
        self.pending_rollback = None
        if ack.status == "applied":
            self.detector.reset_to(pending["step"], pending["attempt"])
            self.ledger.restore(pending["step"], pending["attempt"], ts=ack.ts)

    def to_state(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "entropy": self.entropy.to_state(),
            "detector": self.detector.to_state(),
            "ledger": self.ledger.to_state(),
            "budget": self.budget.to_state(),
            "pending_rollback": self.pending_rollback,
            "halted": self.halted,
        }

    @classmethod
    def from_state(cls, run_id: str, state: dict[str, Any], settings: Settings) -> RunOperations:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unknown run operations state version {state.get('version')}")
        ops = cls(run_id, settings)
        ops.entropy = EntropyEmitter.from_state(state["entropy"], settings.entropy)
        ops.detector = AnomalyDetector.from_state(state["detector"], settings.anomaly)
        ops.ledger = CheckpointLedger.from_state(state["ledger"], settings.checkpoints)
        ops.budget = RollbackBudget.from_state(state["budget"], settings.checkpoints)
        ops.pending_rollback = state["pending_rollback"]
        ops.halted = state["halted"]
        return ops
