"""Hugging Face transformers integration: the operations layer for a ``Trainer`` run (and
TRL's trainers, which subclass it) in one ``TrainerCallback``.

    args = TrainingArguments("out/lm-run-5", logging_steps=1, save_steps=500,
                             logging_nan_inf_filter=False)
    Trainer(model, args, train_dataset=dataset,
            callbacks=[FragranceOpsCallback(TrainerClient("lm-run-5"))]).train()

One operations *step* is one training log of the Trainer (``on_log`` with a ``"loss"``),
numbered from 0 as the worker expects: with ``logging_steps=1``, one optimizer step, and
until a rollback operations step ``s`` is the update that takes ``state.global_step`` from
``s`` to ``s + 1`` (the directory ``checkpoint-20`` is operations step 19). Keep
``logging_nan_inf_filter=False``: by default the Trainer replaces a NaN or infinite loss
with the mean of the previous ones, hiding a divergence from the worker. At each training
log the callback reports:

- ``loss``: the logged loss (the Trainer's mean over the logging interval);
- ``reward``: the logged value named ``reward_key`` when given (TRL's GRPO logs
  ``"reward"``; a log without it raises ``KeyError``, a configuration error); otherwise
  minus the loss, so that a supervised or language-model run is judged by its loss alone;
- the learning rate and, when the model has an ``entropy_coef`` attribute, that
  coefficient;

then applies the commands that arrived (below). Checkpoints are the Trainer's
``checkpoint-<global_step>`` directories under ``args.output_dir``: each is announced in
``on_save``, once written, with a ``fragrance-ops.json`` beside the Trainer's files that
records its operations step and attempt. A rollback target the Trainer's own rotation
(``save_total_limit``) deleted is refused; leave it unset and let the worker's
``prune_checkpoints`` decide.

- ``rollback`` restores, from the named checkpoint directory (confined to ``output_dir``):
  the model's weights from its safetensors file(s), the optimizer's state and the
  scheduler's, both with ``torch.load(weights_only=True)``, all or nothing; a directory
  without them (``save_only_model``) or holding another step than the command names is
  refused;
- ``set_entropy_coef`` sets the model's ``entropy_coef`` (rejected with the reason when it
  has none, as a language model has not); ``retune`` sets the learning rate (the
  scheduler's base rates scaled alike) and the entropy coefficient;
- ``halt`` sets ``control.should_training_stop``.

A run resumed from one of its checkpoints (``train(resume_from_checkpoint=...)``, in a new
process after a crash) continues after the checkpoint's operations step under a new attempt.

Needs the ``transformers`` extra.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from producers.checkpoints import CheckpointRejected, confine
from producers.framework_ops import FrameworkRunOps
from producers.trainer import TrainerClient

RunSettings = dict[str, bool | int | float | str]

MARKER_NAME = "fragrance-ops.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
CHECKPOINT_PREFIX = "checkpoint-"


class FragranceOpsCallback(TrainerCallback):
    """Reports every training log of a Trainer run and applies commands between steps."""

    def __init__(
        self,
        client: TrainerClient,
        *,
        reward_key: str | None = None,
        run_settings: RunSettings | None = None,
        algorithm: str = "sft",
    ) -> None:
        self.client = client
        self.reward_key = reward_key
        self.run_settings = run_settings or {}
        self.algorithm = algorithm
        self._ops: _TrainerRunOps | None = None

    @property
    def ops(self) -> FrameworkRunOps:
        if self._ops is None:
            raise RuntimeError("the callback has not started: pass it to Trainer(callbacks=...)")
        return self._ops

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        if self._ops is not None:
            return
        self._ops = _TrainerRunOps(
            self.client, _output_dir(args), kwargs["model"], kwargs["optimizer"],
            kwargs["lr_scheduler"], start_step=state.global_step,
        )  # fmt: skip
        marker = _output_dir(args) / f"{CHECKPOINT_PREFIX}{state.global_step}" / MARKER_NAME
        if state.global_step > 0 and marker.is_file():  # train(resume_from_checkpoint=...)
            saved = json.loads(marker.read_text(encoding="utf-8"))
            self._ops.resume(int(saved["step"]), int(saved["attempt"]))
        self.client.announce(self.run_settings, algorithm=self.algorithm)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if self._ops is None or not logs or "loss" not in logs:
            return  # an evaluation's or the run summary's log
        loss = float(logs["loss"])
        if self.reward_key is None:
            reward = -loss
        elif self.reward_key in logs:
            reward = float(logs[self.reward_key])
        else:
            raise KeyError(f"the trainer logs no {self.reward_key!r} (logged: {sorted(logs)})")
        self._ops.report(loss=loss, reward=reward)
        if self._ops.halted:
            control.should_training_stop = True

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        if self._ops is not None and self._ops.halted:
            control.should_training_stop = True

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        if self._ops is None:
            return
        directory = _output_dir(args) / f"{CHECKPOINT_PREFIX}{state.global_step}"
        if not directory.is_dir():
            return  # not saved by this process (another rank's)
        step = self._ops.checkpoint_step
        marker = {"step": step, "attempt": self.client.attempt}
        (directory / MARKER_NAME).write_text(json.dumps(marker), encoding="utf-8")
        self._ops.checkpoint_saved(directory, step)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        self.client.flush()


class _TrainerRunOps(FrameworkRunOps):
    def __init__(
        self,
        client: TrainerClient,
        output_dir: Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        *,
        start_step: int,
    ) -> None:
        super().__init__(client, output_dir, start_step=start_step, entropy_owner=model)
        self._model = model
        self._optimizer = optimizer
        # accelerate may wrap the scheduler; the torch scheduler holds the state and rates.
        self._scheduler = getattr(scheduler, "scheduler", scheduler)

    def optimizers(self) -> Sequence[torch.optim.Optimizer]:
        return [self._optimizer]

    def schedulers(self) -> Sequence[Any]:
        return [] if self._scheduler is None else [self._scheduler]

    def checkpoint_path(self, uri: str) -> Path:
        path = confine(uri, self.directory)
        suffix = path.name.removeprefix(CHECKPOINT_PREFIX)
        is_root = path == self.directory.resolve()  # output_dir itself may be "checkpoint-N"
        if is_root or not path.is_dir() or suffix == path.name or not suffix.isdigit():
            raise CheckpointRejected(f"{uri!r} is not a Trainer checkpoint directory")
        return path

    def restore(self, path: Path, step: int) -> None:
        try:
            marker = json.loads(confine(MARKER_NAME, path).read_text(encoding="utf-8"))
        except (OSError, ValueError, CheckpointRejected) as exc:
            raise CheckpointRejected(f"{path.name} has no readable {MARKER_NAME}: {exc}") from None
        if marker.get("step") != step:
            raise CheckpointRejected(f"{path.name} holds step {marker.get('step')}, not {step}")
        weights = self._load_weights(path)
        optimizer_state = _load_torch(path, OPTIMIZER_NAME)
        scheduler_state = None if self._scheduler is None else _load_torch(path, SCHEDULER_NAME)
        current = self._model.state_dict()
        missing = set(current) - set(weights)
        unexpected = set(weights) - set(current)
        loaded = {current[name].data_ptr() for name in weights if name in current}
        untied = sorted(name for name in missing if current[name].data_ptr() not in loaded)
        if unexpected or untied:
            raise CheckpointRejected(
                f"{path.name} does not fit this model: missing {untied}, "
                f"unexpected {sorted(unexpected)}"
            )
        snapshot = (
            copy.deepcopy(current),
            copy.deepcopy(self._optimizer.state_dict()),
            None if self._scheduler is None else copy.deepcopy(self._scheduler.state_dict()),
        )
        try:
            self._model.load_state_dict(weights, strict=False)  # tied weights are saved once
            self._optimizer.load_state_dict(optimizer_state)
            if self._scheduler is not None:
                self._scheduler.load_state_dict(scheduler_state)
        except Exception as exc:  # a partial load is undone, whatever failed
            self._model.load_state_dict(snapshot[0])
            self._optimizer.load_state_dict(snapshot[1])
            if self._scheduler is not None:
                self._scheduler.load_state_dict(snapshot[2])
            raise CheckpointRejected(f"{path.name} does not fit this run: {exc}") from None

    def _load_weights(self, path: Path) -> dict[str, torch.Tensor]:
        index = path / WEIGHTS_INDEX_NAME
        try:
            if index.is_file():  # sharded: every shard the index names, each confined
                text = confine(WEIGHTS_INDEX_NAME, path).read_text("utf-8")
                shards = sorted(set(json.loads(text)["weight_map"].values()))
                weights: dict[str, torch.Tensor] = {}
                for shard in shards:
                    weights.update(load_file(confine(shard, path), device="cpu"))
                return weights
            return load_file(confine(WEIGHTS_NAME, path), device="cpu")
        except CheckpointRejected:
            raise
        except Exception as exc:  # missing, truncated, not safetensors
            raise CheckpointRejected(
                f"{path.name}: no loadable safetensors weights: {exc}"
            ) from None

    def stop(self) -> None:
        pass  # the callback sets control.should_training_stop at once (on_log, on_step_end)


def _output_dir(args: TrainingArguments) -> Path:
    if args.output_dir is None:  # the Trainer sets a default; a caller may have cleared it
        raise ValueError("TrainingArguments.output_dir is needed: checkpoints are kept there")
    return Path(args.output_dir)


def _load_torch(path: Path, name: str) -> Any:
    try:
        return torch.load(confine(name, path), map_location="cpu", weights_only=True)
    except CheckpointRejected as exc:
        raise CheckpointRejected(f"{path.name}: no {name} ({exc})") from None
    except Exception as exc:  # unpickling refused, truncated file, ...
        raise CheckpointRejected(f"{path.name}/{name} could not be loaded: {exc}") from None
