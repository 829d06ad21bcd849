"""The operations layer inside a PyTorch training loop: one object, one call per step.

    ops = TorchRunOps(client, model, optimizer, checkpoint_dir="checkpoints/run-42")
    while ops.step < total_steps and not ops.halted:
        loss, reward = ppo_update(entropy_coef=ops.entropy_coef)
        ops.end_step(loss=loss, reward=reward)

``end_step`` publishes the step's metrics, saves a checkpoint every
``checkpoints.interval_steps`` (model, optimizer, step, entropy coefficient, RNG states;
written atomically and announced on ``trainer.checkpoints``), applies the commands that
arrived, and advances ``step``. A ``rollback`` restores everything from the named checkpoint
(loaded confined to the run's directory, weights only), deletes the checkpoints saved after
it (the abandoned trajectory), so ``step`` moves back and the run continues under a new
``attempt``. ``retune`` sets the learning rate (every optimizer
param group), the clip epsilon and the entropy coefficient, unless ``approve_retune``
refuses it (then the ack says ``rejected``). ``prune_checkpoints`` deletes the files the stream says
to; ``halt`` sets ``halted``. Every command is acknowledged with what changed.

A loop with several optimizers (an actor's and a critic's) passes the others as
``more_optimizers``: checkpointed, restored and retuned with the first. A loop without an
entropy coefficient the operations layer may set (no entropy term, or one it learns) says
why in ``entropy_coef_rejected``: ``set_entropy_coef`` and retunes of it are then rejected
with that reason, and no ``entropy_coef`` is reported.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from producers.checkpoints import CheckpointRejected, CheckpointStore
from producers.trainer import CommandRejected, TrainerClient
from schemas import Command, Halt, PruneCheckpoints, Retune, Rollback, SetEntropyCoef

log = logging.getLogger(__name__)

APPLIED_LOG_NAME = "applied-commands.log"
ATTEMPT_FILE_NAME = "attempt"


def capture_rng() -> dict[str, Any]:
    """RNG states as tensors and ints, so ``weights_only`` loading accepts them."""
    _kind, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached"],
        )
    )
    python_state = state["python"]
    random.setstate(
        (python_state["version"], tuple(python_state["internal"]), python_state["gauss"])
    )


def read_attempt(path: Path) -> int:
    """The newest attempt written to ``path`` (0 when none was)."""
    try:
        return int(path.read_text(encoding="ascii"))
    except (FileNotFoundError, ValueError):
        return 0


def write_attempt(path: Path, attempt: int) -> None:
    """Attempts must never repeat (the stream ignores steps it has seen for an attempt), so
    the newest one is written down (atomically, fsynced) before any metric of it is
    published."""
    temp = path.with_suffix(".tmp")
    with temp.open("w", encoding="ascii") as file:
        file.write(str(attempt))
        file.flush()
        os.fsync(file.fileno())
    temp.replace(path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


class StepReporter(Protocol):
    """What ``publish_step`` needs of a run's operations state."""

    client: TrainerClient
    step: int
    last_checkpoint_step: int | None

    def hyperparameters(self) -> dict[str, float]: ...


def publish_step(ops: StepReporter, *, loss: float, reward: float, **metrics: float) -> None:
    """Publish the finished operations step ``ops.step`` (with the newest checkpoint's step
    and the hyperparameters in use), apply the commands that arrived, and advance the step
    unless one of them (a rollback) moved it."""
    step = ops.step
    ops.client.log_step(
        step,
        loss=loss,
        reward=reward,
        checkpoint_step=ops.last_checkpoint_step,
        **ops.hyperparameters(),
        **metrics,
    )
    if ops.step == step:  # not rolled back by a command applied in log_step
        ops.step = step + 1


def retune_changes(
    command: Retune, current: dict[str, float], entropy_coef_rejected: str | None
) -> dict[str, float]:
    """The new values a retune asks for, or ``CommandRejected`` with the reason: a
    hyperparameter the run does not have (``current`` holds those it has), an entropy
    coefficient it cannot set, a value that is not finite."""
    if "entropy_coef" in command.changes and entropy_coef_rejected is not None:
        raise CommandRejected(entropy_coef_rejected)
    unknown = set(command.changes) - set(current)
    if unknown:
        raise CommandRejected(f"this trainer has no {', '.join(sorted(unknown))}")
    changes = {str(name): float(value) for name, value in command.changes.items()}
    if not all(math.isfinite(value) for value in changes.values()):
        raise CommandRejected(f"non-finite values in {changes}")
    return changes


class TorchRunOps:
    """Ties a ``TrainerClient`` to a model and optimizer."""

    def __init__(
        self,
        client: TrainerClient,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        checkpoint_dir: Path | str,
        *,
        start_step: int = 0,
        clip_epsilon: float | None = None,
        approve_retune: Callable[[Retune], bool] | None = None,
        more_optimizers: Sequence[torch.optim.Optimizer] = (),
        entropy_coef_rejected: str | None = None,
    ) -> None:
        self.client = client
        self.model = model
        self.optimizer = optimizer
        self.more_optimizers = list(more_optimizers)
        self.entropy_coef_rejected = entropy_coef_rejected
        self.store = CheckpointStore(checkpoint_dir)
        # Applied command ids survive a trainer restart next to the checkpoints they refer to.
        client.record_applied_in(self.store.directory / APPLIED_LOG_NAME)
        self._attempt_file = self.store.directory / ATTEMPT_FILE_NAME
        settings = client.settings
        self.interval = settings.checkpoints.interval_steps
        self.entropy_coef = settings.entropy.start
        self.clip_epsilon = clip_epsilon  # None: the loop has no clip range (not PPO)
        self.approve_retune = approve_retune
        # Every retuned value, newest per parameter: kept across rollbacks.
        self.retuned: dict[str, float] = {}
        self.step = start_step
        self.halted = False
        self.last_checkpoint_step: int | None = None
        self.halt_reason: str | None = None
        client.on_command("set_entropy_coef", self._set_entropy_coef)
        client.on_command("rollback", self._rollback)
        client.on_command("prune_checkpoints", self._prune)
        client.on_command("halt", self._halt)
        client.on_command("retune", self._retune)

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def end_step(self, *, loss: float, reward: float, **metrics: float) -> None:
        """Report the finished step, checkpoint if due, apply commands, advance."""
        step = self.step
        if step > 0 and step % self.interval == 0:
            self.save_checkpoint()
        publish_step(self, loss=loss, reward=reward, **metrics)

    def resume_latest(self) -> int | None:
        """After a trainer restart: load the newest checkpoint and continue from it.

        Returns the restored step (None when there is no checkpoint). The newest checkpoint
        may have been saved during an anomaly the stream had not yet judged; the stream
        judges what follows and rolls back again if needed. The run continues
        under a new attempt, so the stream treats what follows as a resume and sends the
        entropy coefficient again. The caller should ``announce`` the run again first.
        """
        steps = self.store.steps()
        if not steps:
            return None
        state = self.store.load(self.store.uri_for(steps[-1]))
        self._restore(state)
        self._begin_attempt(max(int(state["attempt"]), self._last_attempt()) + 1)
        return int(state["step"])

    def _last_attempt(self) -> int:
        return read_attempt(self._attempt_file)

    def _begin_attempt(self, attempt: int) -> None:
        self.client.attempt = attempt
        write_attempt(self._attempt_file, attempt)

    def _restore(self, state: dict[str, Any]) -> None:
        """Load a checkpoint into the run, all or nothing: a checkpoint that does not fit
        (another model's shapes, missing keys) leaves the run exactly as it was."""
        optimizers = [self.optimizer, *self.more_optimizers]
        snapshot = (
            copy.deepcopy(self.model.state_dict()),
            [copy.deepcopy(optimizer.state_dict()) for optimizer in optimizers],
            capture_rng(),
        )
        try:
            saved_optimizers = [state["optimizer"], *state.get("more_optimizers", [])]
            if len(saved_optimizers) != len(optimizers):
                raise ValueError(
                    f"{len(saved_optimizers)} optimizers, this run has {len(optimizers)}"
                )
            self.model.load_state_dict(state["model"])
            for optimizer, saved in zip(optimizers, saved_optimizers, strict=True):
                optimizer.load_state_dict(saved)
            restore_rng(state["rng"])
            step = int(state["step"])
            entropy_coef = float(state["entropy_coef"]) if "entropy_coef" in state else None
            clip_epsilon = float(state["clip_epsilon"]) if "clip_epsilon" in state else None
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            self.model.load_state_dict(snapshot[0])
            for optimizer, saved in zip(optimizers, snapshot[1], strict=True):
                optimizer.load_state_dict(saved)
            restore_rng(snapshot[2])
            raise CheckpointRejected(f"the checkpoint does not fit this run: {exc}") from None
        if entropy_coef is not None:
            self.entropy_coef = entropy_coef
        if clip_epsilon is not None:
            self.clip_epsilon = clip_epsilon
        # Retunes reflect user feedback, not the abandoned trajectory: they survive.
        self._set_hyperparameters({k: v for k, v in self.retuned.items() if k != "entropy_coef"})
        # Continue after the restored step: the stream tells replayed steps from the
        # abandoned trajectory by the new attempt.
        self.step = step + 1
        self.last_checkpoint_step = step

    def save_checkpoint(self) -> str:
        uri = self.store.save(
            self.step,
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "more_optimizers": [optimizer.state_dict() for optimizer in self.more_optimizers],
                "step": self.step,
                "attempt": self.client.attempt,
                **self.hyperparameters(),
                "rng": capture_rng(),
            },
        )
        self.client.checkpoint_saved(self.step, uri)
        self.last_checkpoint_step = self.step
        return uri

    def hyperparameters(self) -> dict[str, float]:
        """The values a retune may change, as the loop uses them now."""
        values = {"learning_rate": self.learning_rate}
        if self.entropy_coef_rejected is None:
            values["entropy_coef"] = self.entropy_coef
        if self.clip_epsilon is not None:
            values["clip_epsilon"] = self.clip_epsilon
        return values

    def _set_hyperparameters(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            if name == "learning_rate":
                for optimizer in (self.optimizer, *self.more_optimizers):
                    for group in optimizer.param_groups:
                        group["lr"] = value
            elif name == "clip_epsilon":
                self.clip_epsilon = value
            else:
                self.entropy_coef = value

    def _set_entropy_coef(self, command: Command) -> dict[str, Any]:
        assert isinstance(command, SetEntropyCoef)
        if self.entropy_coef_rejected is not None:
            raise CommandRejected(self.entropy_coef_rejected)
        before, self.entropy_coef = self.entropy_coef, command.entropy_coef
        return {"before": {"entropy_coef": before}, "after": {"entropy_coef": self.entropy_coef}}

    def _rollback(self, command: Command) -> dict[str, Any]:
        assert isinstance(command, Rollback)
        before = {"step": self.step, "attempt": self.client.attempt}
        try:
            state = self.store.load(command.checkpoint_uri)
            self._restore(state)
        except CheckpointRejected as exc:
            raise CommandRejected(str(exc)) from None
        # Checkpoints after the restored one belong to the abandoned trajectory: gone, so
        # that a trainer restarted at any point from here resumes from the restored one.
        restored = int(state["step"])
        for step in self.store.steps():
            if step > restored:
                self.store.path_for(step).unlink(missing_ok=True)
        self._begin_attempt(self.client.attempt + 1)
        log.warning("rolled back to step %d: %s", state["step"], command.reason)
        return {
            "before": before,
            "after": {"step": int(state["step"]), "attempt": self.client.attempt},
        }

    def _retune(self, command: Command) -> dict[str, Any]:
        """Apply a retune proposal (or refuse it when ``approve_retune`` says no)."""
        assert isinstance(command, Retune)
        before = self.hyperparameters()
        changes = retune_changes(command, before, self.entropy_coef_rejected)
        if self.approve_retune is not None and not self.approve_retune(command):
            raise CommandRejected("retune not approved: " + command.rationale)
        self._set_hyperparameters(changes)
        self.retuned.update(changes)
        log.warning("retuned %s: %s", command.changes, command.rationale)
        return {
            "before": {name: before[name] for name in command.changes},
            "after": {name: self.hyperparameters()[name] for name in command.changes},
        }

    def _prune(self, command: Command) -> dict[str, Any]:
        assert isinstance(command, PruneCheckpoints)
        deleted = [uri for uri in command.uris if self.store.delete(uri)]
        return {"after": {"deleted": deleted, "kept_steps": self.store.steps()}}

    def _halt(self, command: Command) -> None:
        assert isinstance(command, Halt)
        self.halted, self.halt_reason = True, command.reason
        log.error("run halted by the operations layer: %s", command.reason)
