"""The operations layer for a framework that saves its own checkpoints (Lightning, transformers).

``TorchRunOps`` owns a plain loop's checkpoints; Lightning and the Hugging Face ``Trainer``
write theirs in their own formats, on their own schedule. ``FrameworkRunOps`` is the part
their callbacks share, around the framework's checkpointing:

- ``report(loss=..., reward=...)`` publishes one operations step (with the learning rate
  and, where the run exposes one, the entropy coefficient), applies the commands that
  arrived, and advances ``step``;
- ``checkpoint_saved(path, step)`` announces a checkpoint the framework wrote inside the
  run's checkpoint directory (anything saved elsewhere is never announced: a rollback could
  not load it);
- ``rollback`` loads the named checkpoint through the subclass's ``restore`` only if it
  resolves inside the run's directory (symlinks followed) and records the step the command
  names (a file overwritten since, such as Lightning's ``last.ckpt``, is refused), all or
  nothing; the checkpoints of the abandoned trajectory are deleted, the
  step moves back after the restored one and the run continues under a new ``attempt``;
- ``set_entropy_coef`` sets ``entropy_coef`` on the object the run exposes it on, and is
  rejected with the reason when there is none; ``retune`` sets the learning rate and the
  entropy coefficient (a clip epsilon is refused: neither framework has one);
- the learning rate is set on every param group of every optimizer, and a scheduler that
  computes it from ``base_lrs`` (``LambdaLR``, the transformers schedules, cosine, ...) has
  them scaled by the same factor, so the schedule continues from the new value instead of
  overwriting it at its next step. A retuned learning rate survives a rollback;
- ``prune_checkpoints`` deletes the named checkpoints that are confined to the directory,
  except the one the run last restored, the newest announced one (the next rollback's
  likely target) and the command's ``protected_step``: those are kept and named in the ack;
- ``halt`` sets ``halted`` and calls the subclass's ``stop``.

One process trains the run: under distributed training every rank would report its steps
and only rank 0's checkpoints would be announced, and a rollback would restore one rank;
that is not supported yet.

The framework's own step counter (Lightning's ``global_step``, the Trainer's
``state.global_step``) keeps counting across a rollback, as the budget of updates made, so
new checkpoints never overwrite old names; the operations ``step`` goes back.
"""

from __future__ import annotations

import logging
import shutil
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from producers.checkpoints import CheckpointRejected, confine
from producers.torch_ops import (
    APPLIED_LOG_NAME,
    ATTEMPT_FILE_NAME,
    publish_step,
    read_attempt,
    retune_changes,
    write_attempt,
)
from producers.trainer import CommandRejected, TrainerClient
from schemas import Command, Halt, PruneCheckpoints, Retune, Rollback, SetEntropyCoef

log = logging.getLogger(__name__)

ENTROPY_ATTRIBUTE = "entropy_coef"


class FrameworkRunOps(ABC):
    """One run's operations state between the framework's callbacks and ``TrainerClient``."""

    def __init__(
        self,
        client: TrainerClient,
        checkpoint_dir: Path | str,
        *,
        start_step: int = 0,
        entropy_owner: object | None = None,
    ) -> None:
        self.client = client
        self.directory = Path(checkpoint_dir)
        self.directory.mkdir(parents=True, exist_ok=True)
        client.record_applied_in(self.directory / APPLIED_LOG_NAME)
        self._attempt_file = self.directory / ATTEMPT_FILE_NAME
        self.step = start_step
        self.halted = False
        self.halt_reason: str | None = None
        self.last_checkpoint_step: int | None = None
        self.retuned: dict[str, float] = {}
        # Announced checkpoints of this process: their resolved path and step.
        self.saved: dict[Path, int] = {}
        # The checkpoint the last rollback restored: never pruned.
        self.restored_from: Path | None = None
        self.entropy_owner = entropy_owner
        self.entropy_coef_rejected = (
            None
            if entropy_owner is not None and hasattr(entropy_owner, ENTROPY_ATTRIBUTE)
            else f"{type(entropy_owner).__name__} has no {ENTROPY_ATTRIBUTE} attribute to set"
        )
        client.on_command("set_entropy_coef", self._set_entropy_coef)
        client.on_command("rollback", self._rollback)
        client.on_command("prune_checkpoints", self._prune)
        client.on_command("halt", self._halt)
        client.on_command("retune", self._retune)

    # The framework's part.

    @abstractmethod
    def optimizers(self) -> Sequence[torch.optim.Optimizer]:
        """The run's optimizers, as the framework steps them."""

    @abstractmethod
    def schedulers(self) -> Sequence[Any]:
        """The run's learning-rate schedulers (empty when there are none)."""

    @abstractmethod
    def checkpoint_path(self, uri: str) -> Path:
        """The checkpoint a URI names, confined (use ``confine``) and of the framework's
        form; otherwise ``CheckpointRejected``."""

    @abstractmethod
    def restore(self, path: Path, step: int) -> None:
        """Load the framework's checkpoint at ``path`` into the run, all or nothing: raise
        ``CheckpointRejected`` and leave the run as it was when it cannot be loaded, does
        not fit, or does not hold operations step ``step`` (overwritten since)."""

    @abstractmethod
    def stop(self) -> None:
        """Stop training the framework's way."""

    # Shared.

    @property
    def learning_rate(self) -> float:
        return float(self.optimizers()[0].param_groups[0]["lr"])

    @property
    def entropy_coef(self) -> float | None:
        if self.entropy_coef_rejected is not None:
            return None
        return float(getattr(self.entropy_owner, ENTROPY_ATTRIBUTE))

    def hyperparameters(self) -> dict[str, float]:
        """The values a retune may change, as the run uses them now."""
        values = {"learning_rate": self.learning_rate}
        entropy_coef = self.entropy_coef
        if entropy_coef is not None:
            values["entropy_coef"] = entropy_coef
        return values

    def report(self, *, loss: float, reward: float, **metrics: float) -> None:
        """Publish the finished operations step, apply the commands that arrived, advance."""
        publish_step(self, loss=loss, reward=reward, **metrics)

    @property
    def checkpoint_step(self) -> int:
        """The operations step a checkpoint saved now holds: the last one reported."""
        return max(self.step - 1, 0)

    def checkpoint_saved(self, path: Path | str, step: int) -> bool:
        """Announce a checkpoint the framework wrote; False (not announced) when it lies
        outside the run's directory."""
        try:
            resolved = confine(str(path), self.directory)
        except CheckpointRejected as exc:
            log.warning("checkpoint %s not announced: %s", path, exc)
            return False
        self.saved[resolved] = step
        self.last_checkpoint_step = step
        self.client.checkpoint_saved(step, resolved.as_uri())
        return True

    def resume(self, step: int, attempt: int) -> None:
        """The framework resumed the run from its checkpoint of operations step ``step``
        (saved under ``attempt``): continue after it under a new attempt, never reusing
        one (the stream ignores steps it has already seen for an attempt)."""
        self.step = step + 1
        self.last_checkpoint_step = step
        last = max(attempt, self.client.attempt, read_attempt(self._attempt_file))
        self.begin_attempt(last + 1)

    def begin_attempt(self, attempt: int) -> None:
        self.client.attempt = attempt
        write_attempt(self._attempt_file, attempt)

    def set_learning_rate(self, value: float) -> None:
        """Set every param group's learning rate; scale the schedulers' base rates alike."""
        for optimizer in self.optimizers():
            for index, group in enumerate(optimizer.param_groups):
                old = float(group["lr"])
                group["lr"] = value
                for scheduler in self.schedulers():
                    if _optimizer_of(scheduler) is not _optimizer_of(optimizer):
                        continue
                    base_lrs = getattr(scheduler, "base_lrs", None)
                    if base_lrs is not None and index < len(base_lrs):
                        base_lrs[index] = base_lrs[index] * value / old if old > 0 else float(value)
                    last = getattr(scheduler, "_last_lr", None)
                    if isinstance(last, list) and index < len(last):
                        last[index] = value

    def _set_entropy_coef(self, command: Command) -> dict[str, Any]:
        assert isinstance(command, SetEntropyCoef)
        before = self.entropy_coef
        if self.entropy_coef_rejected is not None:
            raise CommandRejected(self.entropy_coef_rejected)
        setattr(self.entropy_owner, ENTROPY_ATTRIBUTE, command.entropy_coef)
        return {"before": {"entropy_coef": before}, "after": {"entropy_coef": self.entropy_coef}}

    def _rollback(self, command: Command) -> dict[str, Any]:
        assert isinstance(command, Rollback)
        before = {"step": self.step, "attempt": self.client.attempt}
        try:
            path = self.checkpoint_path(command.checkpoint_uri)
            self.restore(path, command.checkpoint_step)
        except CheckpointRejected as exc:
            raise CommandRejected(str(exc)) from None
        restored = command.checkpoint_step
        self.restored_from = path
        if "learning_rate" in self.retuned:  # user feedback, not the abandoned trajectory
            self.set_learning_rate(self.retuned["learning_rate"])
        for saved, step in list(self.saved.items()):
            if step > restored:  # the abandoned trajectory's
                self._delete(saved)
        self.step = restored + 1
        self.last_checkpoint_step = restored
        self.begin_attempt(max(self.client.attempt, read_attempt(self._attempt_file)) + 1)
        log.warning("rolled back to step %d: %s", restored, command.reason)
        return {"before": before, "after": {"step": restored, "attempt": self.client.attempt}}

    def _delete(self, path: Path) -> None:
        """Delete a checkpoint; a failure is logged, never raised (the rollback or prune
        that asked has already changed the run, or must go on with the other paths)."""
        self.saved.pop(path, None)
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("checkpoint %s not deleted: %s", path, exc)

    def _protected(self, protected_step: int | None) -> set[Path]:
        """The checkpoints a prune keeps: the last one restored, the newest announced and
        the one of the step the command itself protects."""
        protected = {self.restored_from} if self.restored_from is not None else set()
        protected.update(
            path
            for path, step in self.saved.items()
            if step in (self.last_checkpoint_step, protected_step)
        )
        return protected

    def _retune(self, command: Command) -> dict[str, Any]:
        assert isinstance(command, Retune)
        before = self.hyperparameters()
        changes = retune_changes(command, before, self.entropy_coef_rejected)
        for name, value in changes.items():
            if name == "learning_rate":
                self.set_learning_rate(value)
            else:
                setattr(self.entropy_owner, ENTROPY_ATTRIBUTE, value)
        self.retuned.update(changes)
        log.warning("retuned %s: %s", command.changes, command.rationale)
        after = self.hyperparameters()
        return {
            "before": {name: before[name] for name in changes},
            "after": {name: after[name] for name in changes},
        }

    def _prune(self, command: Command) -> dict[str, Any]:
        assert isinstance(command, PruneCheckpoints)
        deleted, kept = [], []
        protected = self._protected(command.protected_step)
        for uri in command.uris:
            try:
                path = self.checkpoint_path(uri)
            except CheckpointRejected:
                continue
            if path in protected:
                kept.append(uri)
                continue
            self._delete(path)
            deleted.append(uri)
        after: dict[str, Any] = {"deleted": deleted}
        if kept:
            log.warning("prune kept %s: restored from or newest", kept)
            after["kept"] = kept
        return {"after": after}

    def _halt(self, command: Command) -> None:
        assert isinstance(command, Halt)
        self.halted, self.halt_reason = True, command.reason
        self.stop()
        log.error("run halted by the operations layer: %s", command.reason)


def _optimizer_of(obj: Any) -> Any:
    """The torch optimizer behind an optimizer wrapper (accelerate's, Lightning's) or a
    scheduler; the object itself when it wraps none."""
    inner = getattr(obj, "optimizer", obj)
    return inner if inner is obj else _optimizer_of(inner)
