"""The operations layer inside a PyTorch training loop: one object, one call per step.

    ops = TorchRunOps(client, model, optimizer, checkpoint_dir="checkpoints/run-42")
    while ops.step < total_steps and not ops.halted:
        loss, reward = ppo_update(entropy_coef=ops.entropy_coef)
        ops.end_step(loss=loss, reward=reward)

``end_step`` publishes the step's metrics, saves a checkpoint every
``checkpoints.interval_steps`` (model, optimizer, step, entropy coefficient, RNG states;
written atomically and announced on ``trainer.checkpoints``), applies the commands that
arrived, and advances ``step``. A ``rollback`` restores everything from the named checkpoint
(loaded confined to the run's directory, weights only), so ``step`` moves back and the run
continues under a new ``attempt``. ``prune_checkpoints`` deletes the files the stream says
to; ``halt`` sets ``halted``. Every command is acknowledged with what changed.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from producers.checkpoints import CheckpointRejected, CheckpointStore
from producers.trainer import CommandRejected, TrainerClient
from schemas import Command, Halt, PruneCheckpoints, Rollback, SetEntropyCoef

log = logging.getLogger(__name__)


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
    ) -> None:
        self.client = client
        self.model = model
        self.optimizer = optimizer
        self.store = CheckpointStore(checkpoint_dir)
        settings = client.settings
        self.interval = settings.checkpoints.interval_steps
        self.entropy_coef = settings.entropy.start
        self.step = start_step
        self.halted = False
        self.last_checkpoint_step: int | None = None
        self.halt_reason: str | None = None
        client.on_command("set_entropy_coef", self._set_entropy_coef)
        client.on_command("rollback", self._rollback)
        client.on_command("prune_checkpoints", self._prune)
        client.on_command("halt", self._halt)

    def end_step(self, *, loss: float, reward: float, **metrics: float) -> None:
        """Report the finished step, checkpoint if due, apply commands, advance."""
        step = self.step
        if step > 0 and step % self.interval == 0:
            self.save_checkpoint()
        self.client.log_step(
            step,
            loss=loss,
            reward=reward,
            checkpoint_step=self.last_checkpoint_step,
            entropy_coef=self.entropy_coef,
            **metrics,
        )
        if self.step == step:  # not rolled back by a command applied in log_step
            self.step = step + 1

    def save_checkpoint(self) -> str:
        uri = self.store.save(
            self.step,
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "step": self.step,
                "attempt": self.client.attempt,
                "entropy_coef": self.entropy_coef,
                "rng": capture_rng(),
            },
        )
        self.client.checkpoint_saved(self.step, uri)
        self.last_checkpoint_step = self.step
        return uri

    def _set_entropy_coef(self, command: Command) -> dict[str, Any]:
        assert isinstance(command, SetEntropyCoef)
        before, self.entropy_coef = self.entropy_coef, command.entropy_coef
        return {"before": {"entropy_coef": before}, "after": {"entropy_coef": self.entropy_coef}}

    def _rollback(self, command: Command) -> dict[str, Any]:
        assert isinstance(command, Rollback)
        try:
            state = self.store.load(command.checkpoint_uri)
        except CheckpointRejected as exc:
            raise CommandRejected(str(exc)) from None
        before = {"step": self.step, "attempt": self.client.attempt}
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        restore_rng(state["rng"])
        self.entropy_coef = float(state["entropy_coef"])
        # Continue after the restored step, as a new attempt: the stream tells replayed
        # steps from the abandoned trajectory by it.
        self.step = int(state["step"]) + 1
        self.last_checkpoint_step = int(state["step"])
        self.client.attempt += 1
        log.warning("rolled back to step %d: %s", state["step"], command.reason)
        return {
            "before": before,
            "after": {"step": int(state["step"]), "attempt": self.client.attempt},
        }

    def _prune(self, command: Command) -> dict[str, Any]:
        assert isinstance(command, PruneCheckpoints)
        deleted = [uri for uri in command.uris if self.store.delete(uri)]
        return {"after": {"deleted": deleted, "kept_steps": self.store.steps()}}

    def _halt(self, command: Command) -> None:
        assert isinstance(command, Halt)
        self.halted, self.halt_reason = True, command.reason
        log.error("run halted by the operations layer: %s", command.reason)
