"""PyTorch Lightning integration: the operations layer for a Lightning run in one callback.

    checkpoint_dir = "checkpoints/lm-run-3"
    trainer = lightning.pytorch.Trainer(
        max_steps=10_000,
        callbacks=[
            FragranceOpsCallback(TrainerClient("lm-run-3"), checkpoint_dir),
            ModelCheckpoint(checkpoint_dir, every_n_train_steps=500, save_top_k=-1),
        ],
    )
    trainer.fit(module, datamodule)

One operations *step* is one optimizer step (with gradient accumulation, the loss is the
mean of the accumulated batches'), numbered from 0 as the worker expects: before any
rollback, operations step ``s`` is the update that takes Lightning's ``global_step`` from
``s`` to ``s + 1``, so the checkpoint ``ModelCheckpoint`` names ``step=20`` is operations
step 19. After each step the callback reports:

- ``loss``: what ``training_step`` returned (the tensor, or the dict's ``"loss"``; a batch
  it returned None for is skipped, as Lightning skips it, and a step made of skipped
  batches only is not reported), or the metric named ``loss_key`` in
  ``trainer.callback_metrics`` (what ``self.log`` recorded);
- ``reward``: the metric named ``reward_key`` in ``trainer.callback_metrics`` when given (an
  RL module logs its return there; a module that never logs it is a configuration error
  and raises ``KeyError`` at the first step); otherwise minus the loss, so that a supervised
  or language-model run, which has no reward, is judged by its loss alone;
- the learning rate (first optimizer, first param group) and, when the module has an
  ``entropy_coef`` attribute, that coefficient.

Checkpoints are Lightning's own: whatever ``ModelCheckpoint`` or ``trainer.save_checkpoint``
writes inside ``checkpoint_dir`` is announced once written (the callback wraps the
strategy's ``CheckpointIO`` for the run; the callback's state in the checkpoint records its
operations step). Keep them with ``save_top_k=-1``: the worker's ``prune_checkpoints``
decides which go, and a rollback target that ``ModelCheckpoint`` deleted is refused.

Between steps the callback applies the commands that arrived:

- ``rollback`` loads the named ``.ckpt`` (confined to ``checkpoint_dir``, loaded through the
  strategy with ``weights_only=True``) and restores the module's weights, every
  optimizer's state and every scheduler's state, all or nothing; a checkpoint that holds
  another step than the command names (``last.ckpt``, overwritten) is refused;
- ``set_entropy_coef`` sets the module's ``entropy_coef`` (rejected with the reason when it
  has none); ``retune`` sets the learning rate (every optimizer, schedules scaled alike)
  and the entropy coefficient;
- ``halt`` sets ``trainer.should_stop``.

A run resumed from one of its checkpoints (``trainer.fit(..., ckpt_path=path)``, in a new
process after a crash) continues after the checkpoint's operations step under a new attempt.

Needs the ``lightning`` extra. The callback is a ``lightning.pytorch`` callback: a module
written against the standalone ``pytorch_lightning`` package (the same code, released
together, kept for old imports) belongs to another class hierarchy, which Lightning refuses
to mix.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO

from producers.checkpoints import CheckpointRejected, confine
from producers.framework_ops import FrameworkRunOps
from producers.trainer import TrainerClient, algorithm_label

RunSettings = dict[str, bool | int | float | str]


class FragranceOpsCallback(pl.Callback):
    """Reports every optimizer step of a Lightning run and applies commands between them."""

    def __init__(
        self,
        client: TrainerClient,
        checkpoint_dir: Path | str,
        *,
        reward_key: str | None = None,
        loss_key: str | None = None,
        run_settings: RunSettings | None = None,
        algorithm: str | None = None,
    ) -> None:
        self.client = client
        self.checkpoint_dir = Path(checkpoint_dir)
        self.reward_key = reward_key
        self.loss_key = loss_key
        self.run_settings = run_settings or {}
        self.algorithm = algorithm
        self._ops: _LightningRunOps | None = None
        self._losses: list[float] = []
        self._global_step_seen = 0
        self._wrapped: CheckpointIO | None = None
        self._resumed_from: dict[str, Any] | None = None

    @property
    def ops(self) -> FrameworkRunOps:
        if self._ops is None:
            raise RuntimeError("the callback has not started: pass it to Trainer(callbacks=...)")
        return self._ops

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._ops is not None:
            return
        self._ops = _LightningRunOps(self, trainer, pl_module)
        self._wrapped = trainer.strategy.checkpoint_io
        trainer.strategy.checkpoint_io = _AnnouncingCheckpointIO(self._wrapped, self)
        algorithm = self.algorithm or algorithm_label(type(pl_module).__name__)
        self.client.announce(self.run_settings, algorithm=algorithm)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._global_step_seen = trainer.global_step
        resumed, self._resumed_from = self._resumed_from, None
        if resumed is not None and "step" in resumed:  # fit(ckpt_path=...) after a restart
            self.ops.resume(int(resumed["step"]), int(resumed.get("attempt", 0)))

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        batch_loss = self._loss(trainer, outputs)
        if batch_loss is not None:
            self._losses.append(batch_loss)
        if trainer.global_step == self._global_step_seen:
            return  # accumulating gradients, or a skipped batch: no optimizer step yet
        self._global_step_seen = trainer.global_step
        if not self._losses:
            if not pl_module.automatic_optimization:  # a configuration error
                raise KeyError("training_step returned no loss: pass loss_key= a metric it logs")
            return  # every batch of this step was skipped: nothing to report
        loss = sum(self._losses) / len(self._losses)
        self._losses.clear()
        self.ops.report(loss=loss, reward=self._reward(trainer, loss))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self._wrapped is not None:
            trainer.strategy.checkpoint_io = self._wrapped
            self._wrapped = None
        self.client.flush()

    def state_dict(self) -> dict[str, Any]:
        """Saved in every Lightning checkpoint: the operations step and attempt it holds."""
        if self._ops is None:
            return {}
        return {"step": self._ops.checkpoint_step, "attempt": self.client.attempt}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning resumes a run from a checkpoint (``fit(ckpt_path=...)``): training goes
        on after its operations step, under a new attempt."""
        self._resumed_from = dict(state_dict)

    def _loss(self, trainer: pl.Trainer, outputs: Any) -> float | None:
        """The batch's loss; None when ``training_step`` returned none (Lightning skips
        such a batch: no optimizer step)."""
        if self.loss_key is not None:
            return _metric(trainer, self.loss_key)
        value = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if value is None:
            return None
        return float(value.detach() if isinstance(value, torch.Tensor) else value)

    def _reward(self, trainer: pl.Trainer, loss: float) -> float:
        if self.reward_key is None:
            return -loss
        return _metric(trainer, self.reward_key)

    def _saved(self, checkpoint: dict[str, Any], path: Path | str) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key, {})
        if self._ops is not None and "step" in state:
            self._ops.checkpoint_saved(path, int(state["step"]))


def _metric(trainer: pl.Trainer, key: str) -> float:
    metrics = trainer.callback_metrics
    if key not in metrics:
        raise KeyError(f"the module logs no {key!r} (logged: {sorted(metrics)})")
    return float(metrics[key])


class _LightningRunOps(FrameworkRunOps):
    def __init__(
        self, callback: FragranceOpsCallback, trainer: pl.Trainer, module: pl.LightningModule
    ) -> None:
        super().__init__(callback.client, callback.checkpoint_dir, entropy_owner=module)
        self._callback = callback
        self._trainer = trainer
        self._module = module

    def optimizers(self) -> Sequence[torch.optim.Optimizer]:
        return self._trainer.optimizers

    def schedulers(self) -> Sequence[Any]:
        return [config.scheduler for config in self._trainer.lr_scheduler_configs]

    def checkpoint_path(self, uri: str) -> Path:
        path = confine(uri, self.directory)
        if not path.is_file() or path.suffix != ".ckpt":
            raise CheckpointRejected(f"{uri!r} is not a Lightning checkpoint file")
        return path

    def restore(self, path: Path, step: int) -> None:
        strategy = self._trainer.strategy
        try:
            checkpoint = strategy.load_checkpoint(path, weights_only=True)
        except Exception as exc:  # unpickling refused, truncated file, ...
            raise CheckpointRejected(f"{path.name} could not be loaded: {exc}") from None
        state = checkpoint.get("callbacks", {}).get(self._callback.state_key, {})
        if state.get("step") != step:
            raise CheckpointRejected(f"{path.name} holds step {state.get('step')}, not {step}")
        optimizers, schedulers = list(self.optimizers()), list(self.schedulers())
        snapshot = (
            copy.deepcopy(self._module.state_dict()),
            [copy.deepcopy(optimizer.state_dict()) for optimizer in optimizers],
            [copy.deepcopy(scheduler.state_dict()) for scheduler in schedulers],
        )
        try:
            saved_optimizers = checkpoint["optimizer_states"]
            saved_schedulers = checkpoint.get("lr_schedulers", [])
            if len(saved_optimizers) != len(optimizers) or len(saved_schedulers) != len(schedulers):
                raise ValueError(
                    f"{len(saved_optimizers)} optimizers and {len(saved_schedulers)} "
                    f"schedulers, this run has {len(optimizers)} and {len(schedulers)}"
                )
            strategy.load_model_state_dict(checkpoint)
            strategy.load_optimizer_state_dict(checkpoint)
            for scheduler, saved in zip(schedulers, saved_schedulers, strict=True):
                scheduler.load_state_dict(saved)
        except Exception as exc:  # a partial load is undone, whatever failed
            self._module.load_state_dict(snapshot[0])
            for optimizer, saved in zip(optimizers, snapshot[1], strict=True):
                optimizer.load_state_dict(saved)
            for scheduler, saved in zip(schedulers, snapshot[2], strict=True):
                scheduler.load_state_dict(saved)
            raise CheckpointRejected(f"{path.name} does not fit this run: {exc}") from None

    def stop(self) -> None:
        self._trainer.should_stop = True


class _AnnouncingCheckpointIO(CheckpointIO):
    """The strategy's ``CheckpointIO``, announcing each checkpoint once it is written."""

    def __init__(self, wrapped: CheckpointIO, callback: FragranceOpsCallback) -> None:
        self.wrapped = wrapped
        self._callback = callback

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        self.wrapped.save_checkpoint(checkpoint, path, storage_options)
        self._callback._saved(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # fit(ckpt_path=...) passes None, which torch.load turns into False when
        # TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set: ask for weights_only unless the caller
        # explicitly chose otherwise.
        weights_only = True if weights_only is None else weights_only
        if map_location is None:
            return self.wrapped.load_checkpoint(path, weights_only=weights_only)
        return self.wrapped.load_checkpoint(path, map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        self.wrapped.remove_checkpoint(path)

    def teardown(self) -> None:
        self.wrapped.teardown()
