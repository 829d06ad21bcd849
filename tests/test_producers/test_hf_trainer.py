"""The transformers callback without a broker: real Trainer runs on a tiny GPT-2 built from a
config (no downloads), commands delivered in process."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

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

from config.settings import KafkaSettings, SdkSettings, Settings
from producers import InMemoryTransport, TrainerClient
from producers.hf_trainer import FragranceOpsCallback
from schemas import Halt, PruneCheckpoints, Retune, Rollback, Topic, encode
from tests.helpers.states import states_equal

COMMON = {"run_id": "run-1", "issued_at": 1.0}
VOCAB = 32


class Deliver(TrainerCallback):
    """Delivers a command into the in-process transport once the operations step passes
    ``at_step``; records the global step then, and the model state at ``observe_at``."""

    def __init__(
        self,
        ops_callback: FragranceOpsCallback,
        transport: InMemoryTransport,
        at_step: int,
        command: Callable[[], bytes],
        observe_at: int | None = None,
    ) -> None:
        self.ops_callback, self.transport = ops_callback, transport
        self.at_step, self.command, self.observe_at = at_step, command, observe_at
        self.delivered_at: int | None = None
        self.observed: dict[str, Any] | None = None

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.delivered_at is None and self.ops_callback.ops.step > self.at_step:
            self.delivered_at = state.global_step
            self.transport.deliver(Topic.COMMANDS, b"run-1", self.command())
        if state.global_step == self.observe_at:
            self.observed = {
                "model": {k: v.clone() for k, v in kwargs["model"].state_dict().items()},
                "lr": kwargs["optimizer"].param_groups[0]["lr"],
                "optimizer": copy.deepcopy(kwargs["optimizer"].state_dict()),
                "scheduler": copy.deepcopy(kwargs["lr_scheduler"].state_dict()),
            }


def run(
    tmp_path: Path,
    transport: InMemoryTransport,
    command: Callable[[], bytes],
    *,
    at_step: int = 5,
    max_steps: int = 20,
    observe_at: int | None = None,
    resume_from: Path | None = None,
) -> tuple[FragranceOpsCallback, Trainer, Deliver]:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    rows = [(start + torch.arange(16)) % VOCAB for start in range(VOCAB)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run-1"), max_steps=max_steps, per_device_train_batch_size=8,
        learning_rate=1e-3, logging_steps=1, logging_nan_inf_filter=False, save_steps=5,
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    client = TrainerClient("run-1", transport=transport)
    callback = FragranceOpsCallback(client)
    deliver = Deliver(callback, transport, at_step, command, observe_at)
    trainer = Trainer(
        model=GPT2LMHeadModel(config),
        args=args,
        train_dataset=[{"input_ids": row, "labels": row} for row in rows],  # type: ignore[arg-type]
        callbacks=[callback, deliver],
    )
    with client:
        trainer.train(resume_from_checkpoint=None if resume_from is None else str(resume_from))
    return callback, trainer, deliver


def acks(transport: InMemoryTransport, command_type: str) -> list[dict[str, Any]]:
    decoded = [orjson.loads(record.value) for record in transport.records(Topic.ACKS)]
    return [ack for ack in decoded if ack["command_type"] == command_type]


def metrics(transport: InMemoryTransport) -> list[dict[str, Any]]:
    return [orjson.loads(record.value) for record in transport.records(Topic.METRICS)]


def test_each_logged_step_is_reported_and_each_checkpoint_directory_announced(
    tmp_path: Path,
) -> None:
    transport = InMemoryTransport()
    halt_never = Halt(command_id="h-0", reason="x", **{**COMMON, "run_id": "other-run"})
    run(tmp_path, transport, lambda: encode(halt_never))
    reported = metrics(transport)
    assert [m["step"] for m in reported] == list(range(20))
    assert all(m["reward"] == -m["loss"] for m in reported)
    assert "entropy_coef" not in reported[0]  # GPT-2 has none
    announced = [orjson.loads(r.value) for r in transport.records(Topic.CHECKPOINTS)]
    assert [a["step"] for a in announced] == [4, 9, 14, 19]
    names = [Path(unquote(urlparse(a["uri"]).path)).name for a in announced]
    assert names == ["checkpoint-5", "checkpoint-10", "checkpoint-15", "checkpoint-20"]


def test_a_retuned_learning_rate_holds_and_the_schedule_continues_from_it(tmp_path: Path) -> None:
    transport = InMemoryTransport()
    retune = Retune(
        command_id="rt-1", changes={"learning_rate": 0.5}, rationale="feedback", window={},
        **COMMON,
    )  # fmt: skip
    _, trainer, deliver = run(tmp_path, transport, lambda: encode(retune))
    (ack,) = acks(transport, "retune")
    assert ack["status"] == "applied"
    assert ack["after"] == {"learning_rate": 0.5}
    # The Trainer's default linear decay to 0 over max_steps: lr = base * (20 - steps) / 20.
    # Applied at the next log (the scheduler stepped once per optimizer step by then), the
    # base is scaled to give 0.5 at once, and the decay goes on from there.
    assert deliver.delivered_at is not None
    applied = deliver.delivered_at + 1
    assert ack["before"] == {"learning_rate": pytest.approx(1e-3 * (20 - applied) / 20)}
    later = [m for m in metrics(transport) if m["step"] > deliver.at_step + 1]
    assert later[0]["learning_rate"] == pytest.approx(0.5 * (20 - applied - 1) / (20 - applied))
    assert trainer.lr_scheduler is not None
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0)  # decayed to the end


def test_halt_stops_training_at_the_step_it_arrives(tmp_path: Path) -> None:
    transport = InMemoryTransport()
    halt = Halt(command_id="h-1", reason="too many rollbacks", **COMMON)
    callback, trainer, deliver = run(tmp_path, transport, lambda: encode(halt), max_steps=50)
    assert callback.ops.halted
    assert deliver.delivered_at is not None
    assert trainer.state.global_step == deliver.delivered_at + 1
    assert [ack["status"] for ack in acks(transport, "halt")] == ["applied"]


def test_a_rollback_restores_weights_optimizer_and_scheduler_from_the_directory(
    tmp_path: Path,
) -> None:
    transport = InMemoryTransport()
    target = tmp_path / "run-1" / "checkpoint-10"
    command = Rollback(
        command_id="rb-1", checkpoint_step=9, checkpoint_uri=target.as_uri(), anomaly_step=12,
        reason="loss spike", **COMMON,
    )  # fmt: skip
    callback, _, deliver = run(
        tmp_path, transport, lambda: encode(command), at_step=11, max_steps=16, observe_at=13
    )
    (ack,) = acks(transport, "rollback")
    assert ack["status"] == "applied", ack
    assert ack["after"] == {"step": 9, "attempt": 1}
    assert deliver.observed is not None
    saved_lr = torch.load(target / "optimizer.pt", weights_only=True)["param_groups"][0]["lr"]
    assert deliver.observed["lr"] == saved_lr
    saved = load_file(target / "model.safetensors")
    assert states_equal({k: deliver.observed["model"][k] for k in saved}, saved)
    for part, name in (("optimizer", "optimizer.pt"), ("scheduler", "scheduler.pt")):
        saved_state = torch.load(target / name, weights_only=True)
        assert states_equal(deliver.observed[part], saved_state), part
    reported = metrics(transport)
    assert [(m["step"], m["attempt"]) for m in reported[-3:]] == [(10, 1), (11, 1), (12, 1)]
    assert callback.ops.step == 13


@pytest.mark.parametrize(
    ("reference", "reason"),
    [
        ("../outside", "outside the run's directory"),
        ("/etc", "outside the run's directory"),
        ("symlink", "outside the run's directory"),
        ("overwritten", "holds step 4, not 7"),
        ("file", "is not a Trainer checkpoint directory"),
    ],
)
def test_unsafe_or_foreign_rollback_targets_are_rejected_and_training_continues(
    tmp_path: Path, reference: str, reason: str
) -> None:
    transport = InMemoryTransport()
    run_dir = tmp_path / "run-1"
    (tmp_path / "outside" / "checkpoint-3").mkdir(parents=True)
    run_dir.mkdir()
    step = 2
    if reference == "symlink":
        (run_dir / "checkpoint-3").symlink_to(tmp_path / "outside" / "checkpoint-3")
        reference = "checkpoint-3"
    elif reference == "overwritten":  # holds another step than the command names
        reference, step = str(run_dir / "checkpoint-5"), 7
    elif reference == "file":
        reference = str(run_dir / "checkpoint-5" / "optimizer.pt")
    command = Rollback(
        command_id="rb-1", checkpoint_step=step, checkpoint_uri=reference, anomaly_step=8,
        reason="loss spike", **COMMON,
    )  # fmt: skip
    callback, trainer, _ = run(tmp_path, transport, lambda: encode(command), at_step=6)
    (ack,) = acks(transport, "rollback")
    assert ack["status"] == "rejected"
    assert reason in ack["detail"], ack["detail"]
    assert trainer.state.global_step == 20
    assert callback.client.attempt == 0


def test_a_run_resumed_from_its_checkpoint_continues_under_a_new_attempt(tmp_path: Path) -> None:
    transport = InMemoryTransport()
    other_run = Halt(command_id="h-0", reason="x", **{**COMMON, "run_id": "other-run"})
    run(tmp_path, transport, lambda: encode(other_run), max_steps=10)
    # A new process: the Trainer resumes from checkpoint-10 (operations step 9).
    callback, _, _ = run(
        tmp_path, transport, lambda: encode(other_run), max_steps=13,
        resume_from=tmp_path / "run-1" / "checkpoint-10",
    )  # fmt: skip
    reported = [(m["step"], m["attempt"]) for m in metrics(transport)]
    assert reported == [(step, 0) for step in range(10)] + [(10, 1), (11, 1), (12, 1)]
    assert callback.client.attempt == 1


def test_an_unreachable_broker_never_stops_training(tmp_path: Path) -> None:
    settings = Settings(
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:9"),
        sdk=SdkSettings(close_timeout_s=0.5),
    )
    config = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    rows = [(start + torch.arange(16)) % VOCAB for start in range(VOCAB)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run-1"), max_steps=12, per_device_train_batch_size=8,
        logging_steps=1, save_steps=5, report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    client = TrainerClient("run-1", settings=settings)
    callback = FragranceOpsCallback(client)
    trainer = Trainer(
        model=GPT2LMHeadModel(config),
        args=args,
        train_dataset=[{"input_ids": row, "labels": row} for row in rows],  # type: ignore[arg-type]
        callbacks=[callback],
    )
    with client:
        trainer.train()
    assert trainer.state.global_step == 12
    assert callback.ops.step == 12


@pytest.mark.parametrize("protected_step", [None, 4])
def test_prune_deletes_the_named_checkpoint_directories_inside_output_dir_only(
    tmp_path: Path, protected_step: int | None
) -> None:
    transport = InMemoryTransport()
    outside = tmp_path / "checkpoint-1"
    outside.mkdir()
    pruned = tmp_path / "run-1" / "checkpoint-5"  # operations step 4
    newest = tmp_path / "run-1" / "checkpoint-10"  # operations step 9, the newest when pruned
    command = PruneCheckpoints(
        command_id="p-1",
        steps=[4, 9, 0],
        uris=[pruned.as_uri(), newest.as_uri(), outside.as_uri()],
        protected_step=protected_step,
        **COMMON,
    )
    run(tmp_path, transport, lambda: encode(command), at_step=10, max_steps=14)
    (ack,) = acks(transport, "prune_checkpoints")
    assert ack["status"] == "applied"
    if protected_step is None:
        assert ack["after"] == {"deleted": [pruned.as_uri()], "kept": [newest.as_uri()]}
        assert not pruned.exists()
    else:
        assert ack["after"] == {"deleted": [], "kept": [pruned.as_uri(), newest.as_uri()]}
        assert (pruned / "model.safetensors").is_file()
    assert outside.is_dir()
    assert (newest / "model.safetensors").is_file()
