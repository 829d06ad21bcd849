"""The Lightning callback without a broker: real Lightning runs, commands delivered in process."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import lightning.pytorch as pl
import orjson
import pytest
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from config.settings import KafkaSettings, SdkSettings, Settings
from producers import InMemoryTransport, TrainerClient
from producers.lightning import FragranceOpsCallback, _AnnouncingCheckpointIO
from schemas import Halt, PruneCheckpoints, Retune, Rollback, SetEntropyCoef, Topic, encode
from tests.helpers.states import states_equal

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),  # Lightning on torch 2.15
]

COMMON = {"run_id": "run-1", "issued_at": 1.0}


class Regression(pl.LightningModule):
    def __init__(self, *, with_entropy: bool = True) -> None:
        super().__init__()
        self.net = torch.nn.Linear(8, 1)
        if with_entropy:
            self.entropy_coef = 0.0

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        loss = torch.nn.functional.mse_loss(self.net(inputs), targets)
        self.log("episode_return", -2 * loss.detach())
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + 0.1 * step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class Deliver(pl.Callback):
    """Delivers a command into the in-process transport once the operations step passes
    ``at_step``, then calls ``after`` at each later batch end."""

    def __init__(
        self,
        ops_callback: FragranceOpsCallback,
        transport: InMemoryTransport,
        at_step: int,
        command: Callable[[], bytes],
    ) -> None:
        self.ops_callback, self.transport = ops_callback, transport
        self.at_step, self.command = at_step, command
        self.delivered_at: dict[str, float] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if not self.delivered_at and self.ops_callback.ops.step > self.at_step:
            self.delivered_at = {
                "lr": trainer.optimizers[0].param_groups[0]["lr"],
                "global_step": trainer.global_step,
            }
            self.transport.deliver(Topic.COMMANDS, b"run-1", self.command())


def run(
    tmp_path: Path,
    transport: InMemoryTransport,
    *,
    command: Callable[[], bytes] | None = None,
    at_step: int = 5,
    max_steps: int = 20,
    module: pl.LightningModule | None = None,
    settings: Settings | None = None,
    ckpt_path: Path | None = None,
    **options: Any,
) -> tuple[FragranceOpsCallback, pl.Trainer, Deliver | None]:
    torch.manual_seed(0)
    client = TrainerClient("run-1", settings=settings or Settings(), transport=transport)
    callback = FragranceOpsCallback(client, tmp_path / "run-1", **options)
    callbacks: list[pl.Callback] = [
        callback,
        ModelCheckpoint(tmp_path / "run-1", every_n_train_steps=5, save_top_k=-1),
    ]
    deliver = None
    if command is not None:
        deliver = Deliver(callback, transport, at_step, command)
        callbacks.insert(1, deliver)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(64, 8, generator=generator)
    data = DataLoader(TensorDataset(inputs, inputs.sum(dim=1, keepdim=True)), batch_size=8)
    trainer = pl.Trainer(
        max_steps=max_steps, callbacks=callbacks, accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with client:
        trainer.fit(module or Regression(), data, ckpt_path=ckpt_path)
    return callback, trainer, deliver


def acks(transport: InMemoryTransport) -> list[dict[str, Any]]:
    return [orjson.loads(record.value) for record in transport.records(Topic.ACKS)]


def metrics(transport: InMemoryTransport) -> list[dict[str, Any]]:
    return [orjson.loads(record.value) for record in transport.records(Topic.METRICS)]


def test_every_optimizer_step_is_reported_and_every_checkpoint_announced(tmp_path: Path) -> None:
    transport = InMemoryTransport()
    run(tmp_path, transport, reward_key="episode_return")
    reported = metrics(transport)
    assert [m["step"] for m in reported] == list(range(20))
    assert all(m["reward"] == pytest.approx(-2 * m["loss"], rel=1e-6) for m in reported)
    assert all(m["entropy_coef"] == 0.0 for m in reported)
    announced = [orjson.loads(r.value) for r in transport.records(Topic.CHECKPOINTS)]
    assert [a["step"] for a in announced] == [4, 9, 14, 19]
    assert [Path(unquote(urlparse(a["uri"]).path)).name for a in announced] == [
        f"epoch={s // 8}-step={s + 1}.ckpt" for s in (4, 9, 14, 19)
    ]


def test_without_a_reward_key_the_reward_is_minus_the_loss(tmp_path: Path) -> None:
    transport = InMemoryTransport()
    run(tmp_path, transport, max_steps=3)
    assert all(m["reward"] == -m["loss"] for m in metrics(transport))


def test_a_retuned_learning_rate_holds_and_the_schedule_continues_from_it(tmp_path: Path) -> None:
    transport = InMemoryTransport()
    retune = Retune(
        command_id="rt-1",
        changes={"learning_rate": 0.5},
        rationale="feedback",
        window={},
        **COMMON,
    )
    _, trainer, deliver = run(tmp_path, transport, command=lambda: encode(retune))
    assert deliver is not None
    (ack,) = acks(transport)
    assert ack["status"] == "applied"
    # LambdaLR: lr = base / (1 + 0.1 * scheduler steps). Applied at the next step's report,
    # when the scheduler has stepped once per optimizer step; the base is scaled to give 0.5
    # at once, and the schedule goes on from there.
    applied, end = deliver.delivered_at["global_step"] + 1, trainer.global_step
    assert ack["before"] == {"learning_rate": pytest.approx(0.01 / (1 + 0.1 * applied))}
    assert ack["after"] == {"learning_rate": 0.5}
    expected = 0.5 * (1 + 0.1 * applied) / (1 + 0.1 * end)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected)
    later = [m for m in metrics(transport) if m["step"] > deliver.at_step + 1]
    assert later[0]["learning_rate"] == pytest.approx(
        0.5 * (1 + 0.1 * applied) / (1 + 0.1 * (applied + 1))
    )


def test_halt_stops_training_at_the_step_it_arrives(tmp_path: Path) -> None:
    transport = InMemoryTransport()
    halt = Halt(command_id="h-1", reason="too many rollbacks", **COMMON)
    callback, trainer, _ = run(tmp_path, transport, command=lambda: encode(halt), max_steps=50)
    assert callback.ops.halted
    assert trainer.global_step == 7  # delivered after step 5, applied in step 6's report
    assert [ack["status"] for ack in acks(transport)] == ["applied"]


@pytest.mark.parametrize(("with_entropy", "status"), [(True, "applied"), (False, "rejected")])
def test_the_entropy_coefficient_is_set_where_the_module_has_one(
    tmp_path: Path, with_entropy: bool, status: str
) -> None:
    transport = InMemoryTransport()
    command = SetEntropyCoef(command_id="e-1", entropy_coef=0.02, step=5, **COMMON)
    module = Regression(with_entropy=with_entropy)
    run(tmp_path, transport, command=lambda: encode(command), module=module)
    (ack,) = acks(transport)
    assert ack["status"] == status
    if with_entropy:
        assert module.entropy_coef == 0.02
        assert metrics(transport)[-1]["entropy_coef"] == 0.02
    else:
        assert ack["detail"] == "Regression has no entropy_coef attribute to set"
        assert "entropy_coef" not in metrics(transport)[-1]


def test_a_rollback_restores_the_checkpoint_and_continues_under_a_new_attempt(
    tmp_path: Path,
) -> None:
    transport = InMemoryTransport()
    target = tmp_path / "run-1" / "epoch=1-step=10.ckpt"
    command = Rollback(
        command_id="rb-1", checkpoint_step=9, checkpoint_uri=target.as_uri(), anomaly_step=12,
        reason="loss spike", **COMMON,
    )  # fmt: skip
    restored: dict[str, Any] = {}

    class Observe(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, module: Any, *args: Any) -> None:
            if trainer.global_step == 13:  # the rollback was applied in this step's report
                restored["net"] = {k: v.clone() for k, v in module.state_dict().items()}
                restored["lr"] = trainer.optimizers[0].param_groups[0]["lr"]
                restored["optimizer"] = copy.deepcopy(trainer.optimizers[0].state_dict())
                scheduler = trainer.lr_scheduler_configs[0].scheduler
                restored["scheduler"] = copy.deepcopy(scheduler.state_dict())

    torch.manual_seed(0)
    client = TrainerClient("run-1", transport=transport)
    callback = FragranceOpsCallback(client, tmp_path / "run-1")
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(64, 8, generator=generator)
    deliver = Deliver(callback, transport, 11, lambda: encode(command))
    trainer = pl.Trainer(
        max_steps=16,
        callbacks=[
            callback, deliver, Observe(),
            ModelCheckpoint(tmp_path / "run-1", every_n_train_steps=5, save_top_k=-1),
        ],
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    data = DataLoader(TensorDataset(inputs, inputs.sum(dim=1, keepdim=True)), batch_size=8)
    with client:
        trainer.fit(Regression(), data)
    saved = torch.load(target, weights_only=True)
    assert states_equal(saved["state_dict"], restored["net"])
    assert restored["lr"] == saved["optimizer_states"][0]["param_groups"][0]["lr"]
    assert states_equal(saved["optimizer_states"][0], restored["optimizer"])
    assert states_equal(saved["lr_schedulers"][0], restored["scheduler"])
    (ack,) = acks(transport)
    assert ack["status"] == "applied", ack
    assert ack["after"] == {"step": 9, "attempt": 1}
    reported = metrics(transport)
    assert [(m["step"], m["attempt"]) for m in reported[-3:]] == [(10, 1), (11, 1), (12, 1)]


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.parametrize(
    ("reference", "reason"),
    [
        ("../outside.ckpt", "outside the run's directory"),
        ("/etc/passwd", "outside the run's directory"),
        ("symlink", "outside the run's directory"),
        ("last", "holds step 4, not 2"),
    ],
)
def test_unsafe_or_overwritten_rollback_targets_are_rejected_and_training_continues(
    tmp_path: Path, reference: str, reason: str
) -> None:
    transport = InMemoryTransport()
    run_dir = tmp_path / "run-1"
    run_dir.mkdir()
    outside = tmp_path / "outside.ckpt"
    torch.save({"state_dict": {}}, outside)
    if reference == "symlink":
        (run_dir / "inside.ckpt").symlink_to(outside)
        reference = "inside.ckpt"
    elif reference == "last":  # a file that now holds a later step than the command names
        reference = str(run_dir / "epoch=0-step=5.ckpt")
    command = Rollback(
        command_id="rb-1", checkpoint_step=2, checkpoint_uri=reference, anomaly_step=6,
        reason="loss spike", **COMMON,
    )  # fmt: skip
    callback, trainer, _ = run(tmp_path, transport, command=lambda: encode(command), at_step=6)
    (ack,) = acks(transport)
    assert ack["status"] == "rejected"
    assert reason in ack["detail"], ack["detail"]
    assert trainer.global_step == 20
    assert callback.client.attempt == 0


def test_an_unreachable_broker_never_stops_training(tmp_path: Path) -> None:
    settings = Settings(
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:9"),
        sdk=SdkSettings(close_timeout_s=0.5),
    )
    client = TrainerClient("run-1", settings=settings)
    callback = FragranceOpsCallback(client, tmp_path / "run-1")
    trainer = pl.Trainer(
        max_steps=12, callbacks=[callback, ModelCheckpoint(tmp_path / "run-1",
        every_n_train_steps=5, save_top_k=-1)], accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    inputs = torch.randn(64, 8)
    data = DataLoader(TensorDataset(inputs, inputs.sum(dim=1, keepdim=True)), batch_size=8)
    with client:
        trainer.fit(Regression(), data)
    assert trainer.global_step == 12
    assert callback.ops.step == 12


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.filterwarnings("ignore:.*resuming from a checkpoint that ended before the epoch")
def test_a_run_resumed_from_its_checkpoint_continues_under_a_new_attempt(tmp_path: Path) -> None:
    transport = InMemoryTransport()
    run(tmp_path, transport, max_steps=10)
    # A new process: Lightning restores the checkpoint of global step 10 (operations step 9).
    callback, _, _ = run(
        tmp_path, transport, max_steps=13, ckpt_path=tmp_path / "run-1" / "epoch=1-step=10.ckpt"
    )
    reported = [(m["step"], m["attempt"]) for m in metrics(transport)]
    assert reported == [(step, 0) for step in range(10)] + [(10, 1), (11, 1), (12, 1)]
    assert callback.client.attempt == 1


def test_prune_deletes_the_named_checkpoints_inside_the_run_directory_only(tmp_path: Path) -> None:
    transport = InMemoryTransport()
    run_dir = tmp_path / "run-1"
    outside = tmp_path / "outside.ckpt"
    outside.write_bytes(b"not ours")
    pruned = run_dir / "epoch=0-step=5.ckpt"
    newest = run_dir / "epoch=1-step=10.ckpt"  # operations step 9, the newest when pruned
    command = PruneCheckpoints(
        command_id="p-1",
        steps=[4, 9, 0, 0],
        uris=[pruned.as_uri(), newest.as_uri(), outside.as_uri(), "../outside.ckpt"],
        **COMMON,
    )
    run(tmp_path, transport, command=lambda: encode(command), at_step=10, max_steps=14)
    (ack,) = acks(transport)
    assert ack["status"] == "applied"
    assert ack["after"] == {"deleted": [pruned.as_uri()], "kept": [newest.as_uri()]}
    assert not pruned.exists()
    assert outside.read_bytes() == b"not ours"
    assert newest.exists()


def test_checkpoints_lightning_loads_itself_are_loaded_weights_only(tmp_path: Path) -> None:
    """fit(ckpt_path=...) passes weights_only=None, which an environment variable can turn
    into a full unpickling: the announcing CheckpointIO asks for weights_only=True."""
    calls: list[Any] = []

    class Recording(TorchCheckpointIO):
        def load_checkpoint(
            self, path: Any, map_location: Any = None, weights_only: bool | None = None
        ) -> dict[str, Any]:
            calls.append(weights_only)
            return {}

    client = TrainerClient("run-1", transport=InMemoryTransport())
    wrapper = _AnnouncingCheckpointIO(Recording(), FragranceOpsCallback(client, tmp_path))
    wrapper.load_checkpoint(tmp_path / "a.ckpt")
    wrapper.load_checkpoint(tmp_path / "a.ckpt", "cpu", weights_only=None)
    assert calls == [True, True]


class SkipsBatches(Regression):
    """Returns None for every third batch: Lightning skips it (no optimizer step)."""

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> Any:
        return None if batch_idx % 3 == 2 else super().training_step(batch, batch_idx)


@pytest.mark.filterwarnings("ignore:`training_step` returned `None`:UserWarning")
def test_a_batch_training_step_skips_is_not_an_error(tmp_path: Path) -> None:
    transport = InMemoryTransport()
    callback, trainer, _ = run(tmp_path, transport, max_steps=10, module=SkipsBatches())
    assert trainer.global_step == 10
    # Lightning still counts a skipped batch as a step; 8 batches an epoch, 2 of them skipped:
    # 6 reported in the first epoch and 2 in the second.
    assert [m["step"] for m in metrics(transport)] == list(range(8))
    assert callback.ops.step == 8
