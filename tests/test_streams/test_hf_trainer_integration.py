"""A Hugging Face ``Trainer`` run (a tiny GPT-2 built from a config, integer-id data made
here: no downloads) against the worker: an injected divergence is rolled back once to the
last healthy ``checkpoint-N`` directory, and training goes on with finite losses."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from config.settings import Settings
from fragrance_ops.worker_process import WorkerProcess
from producers import TrainerClient
from producers.hf_trainer import FragranceOpsCallback
from tests.helpers.rollbacks import read_rollback_records
from tests.helpers.states import states_equal

pytestmark = pytest.mark.integration

INTERVAL = 10
# Corrupted after step 28 was reported: step 29 diverges, and the checkpoint saved after it
# (global step 30, operations step 29) holds the diverged weights: the rollback deletes it.
INJECT_AFTER = 28
STOP_AFTER = 45
VOCAB = 32


class Divergence(TrainerCallback):
    """Corrupts the weights (normal noise of std 10) once after step ``INJECT_AFTER`` was
    reported, then paces the loop until the rollback arrives; records what it restored and
    the losses reported after it, and stops the run ``STOP_AFTER`` steps in. Listed after
    the operations callback, so it sees each log after it was reported."""

    def __init__(self, ops_callback: FragranceOpsCallback) -> None:
        self.ops_callback = ops_callback
        self.injected = False
        self.restored: dict[str, Any] | None = None
        self.losses_diverged: list[float] = []
        self.losses_after: list[float] = []

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs or "loss" not in logs:
            return
        ops = self.ops_callback.ops
        if not self.injected and ops.step > INJECT_AFTER:
            self.injected = True
            with torch.no_grad():
                for parameter in kwargs["model"].parameters():
                    parameter.add_(10.0 * torch.randn_like(parameter))
        elif self.injected and self.restored is None:
            if ops.client.attempt == 1:  # rolled back in this log's report
                self.restored = copy.deepcopy(
                    {
                        "model": kwargs["model"].state_dict(),
                        "optimizer": kwargs["optimizer"].state_dict(),
                        "scheduler": kwargs["lr_scheduler"].state_dict(),
                    }
                )
            else:
                self.losses_diverged.append(logs["loss"])
                time.sleep(0.05)  # let the worker catch up with a fast loop
        elif self.restored is not None:
            self.losses_after.append(logs["loss"])
            if ops.step > STOP_AFTER:
                control.should_training_stop = True


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def counting_sequences() -> list[dict[str, torch.Tensor]]:
    """Sequences counting up from every start, modulo the vocabulary: learnable at once."""
    rows = [(start + torch.arange(16)) % VOCAB for start in range(VOCAB)] * 4
    return [{"input_ids": row, "labels": row} for row in rows]


def test_a_divergence_is_rolled_back_once_to_the_last_healthy_trainer_checkpoint(
    make_worker: Callable[..., WorkerProcess],
    ops_settings: Settings,
    kafka_bootstrap: str,
    tmp_path: Path,
) -> None:
    prefix = ops_settings.kafka.topic_prefix
    output_dir = tmp_path / "hf-run"
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=1000,  # a bound on how long the worker may take, not a deadline
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=1,
        logging_nan_inf_filter=False,
        save_strategy="steps",
        save_steps=INTERVAL,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    with make_worker(), TrainerClient("hf-run", settings=ops_settings) as client:
        callback = FragranceOpsCallback(
            client, run_settings={"checkpoints.interval_steps": INTERVAL, "checkpoints.keep": 100}
        )
        divergence = Divergence(callback)
        Trainer(
            model=tiny_gpt2(),
            args=args,
            train_dataset=counting_sequences(),  # type: ignore[arg-type]
            callbacks=[callback, divergence],
        ).train()
        assert divergence.restored is not None, "no rollback arrived"
        records = read_rollback_records(kafka_bootstrap, prefix, announced=b'checkpoint-30"')
    # The Trainer's own directory after 20 updates, announced as operations step 19.
    target = output_dir / "checkpoint-20"
    records.the_rollback(
        checkpoint_uri=target.resolve().as_uri(),
        checkpoint_step=19,
        anomaly_step=INJECT_AFTER + 1,
    )
    saved_weights = load_file(target / "model.safetensors")
    restored = divergence.restored
    assert states_equal({k: restored["model"][k] for k in saved_weights}, saved_weights)
    for part, name in (("optimizer", "optimizer.pt"), ("scheduler", "scheduler.pt")):
        assert states_equal(restored[part], torch.load(target / name, weights_only=True)), part
    # GPT-2 has no entropy coefficient: the worker's schedule is refused with the reason.
    entropy_acks = [ack for ack in records.acks if ack["command_type"] == "set_entropy_coef"]
    assert entropy_acks
    assert {ack["status"] for ack in entropy_acks} == {"rejected"}
    assert "has no entropy_coef" in entropy_acks[0]["detail"]
    # The abandoned trajectory's checkpoints are gone; training went on from step 20.
    diverged = output_dir / "checkpoint-30"
    assert diverged.resolve().as_uri() in records.announced_uris
    assert not diverged.exists()
    for directory in output_dir.glob("checkpoint-*"):
        marker = orjson.loads((directory / "fragrance-ops.json").read_bytes())
        assert marker["attempt"] == 1 or marker["step"] <= 19, (directory.name, marker)
    assert callback.ops.step > STOP_AFTER
    assert len(divergence.losses_after) >= STOP_AFTER - 20
    assert all(math.isfinite(loss) for loss in divergence.losses_after)
    # Against the anomaly step's loss: how far later diverged steps got depends on how long
    # the worker took to answer (the optimizer may bring the loss down meanwhile).
    assert max(divergence.losses_after) < divergence.losses_diverged[0]
