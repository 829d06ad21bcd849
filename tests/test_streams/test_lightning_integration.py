"""A PyTorch Lightning run against the worker: an injected divergence is rolled back once to
the last healthy Lightning checkpoint, and training goes on with finite losses."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from config.settings import Settings
from fragrance_ops.worker_process import WorkerProcess
from producers import TrainerClient
from producers.lightning import FragranceOpsCallback
from tests.helpers.rollbacks import read_rollback_records
from tests.helpers.states import states_equal

pytestmark = [
    pytest.mark.integration,
    # Lightning's advice for a real run (more dataloader workers, a logger), not errors.
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),  # Lightning on torch 2.15
]

INTERVAL = 10
# Corrupted after step 28 was reported: step 29 diverges, and the checkpoint saved after it
# (global step 30, operations step 29) holds the diverged weights: the rollback deletes it.
INJECT_AFTER = 28
STOP_AFTER = 45


class Regression(pl.LightningModule):
    """A linear regression with an entropy coefficient the operations layer may set, Adam
    and a per-step schedule (both restored by a rollback)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(8, 1)
        self.entropy_coef = 0.0

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        return torch.nn.functional.mse_loss(self.net(inputs), targets)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + 0.01 * step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class Divergence(pl.Callback):
    """Corrupts the weights (normal noise of std 10) once after step ``INJECT_AFTER`` was
    reported, then paces the loop until the rollback arrives; records what it restored and
    the losses reported after it, and stops the run ``STOP_AFTER`` steps in."""

    def __init__(self, ops_callback: FragranceOpsCallback) -> None:
        self.ops_callback = ops_callback
        self.injected = False
        self.restored: dict[str, Any] | None = None
        self.losses_diverged: list[float] = []
        self.losses_after: list[float] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        ops = self.ops_callback.ops
        if not self.injected and ops.step > INJECT_AFTER:
            self.injected = True
            with torch.no_grad():
                for parameter in module.parameters():
                    parameter.add_(10.0 * torch.randn_like(parameter))
        elif self.injected and self.restored is None:
            if ops.client.attempt == 1:  # rolled back in this step's report
                self.restored = copy.deepcopy(
                    {
                        "state_dict": module.state_dict(),
                        "optimizer": trainer.optimizers[0].state_dict(),
                        "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
                    }
                )
            else:
                self.losses_diverged.append(float(outputs["loss"]))
                time.sleep(0.05)  # let the worker catch up with a fast loop
        elif self.restored is not None:
            self.losses_after.append(float(outputs["loss"]))
            if ops.step > STOP_AFTER:
                trainer.should_stop = True


def regression_data() -> DataLoader[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(256, 8, generator=generator)
    targets = inputs @ torch.randn(8, 1, generator=generator)
    return DataLoader(TensorDataset(inputs, targets), batch_size=16, shuffle=False)


def test_a_divergence_is_rolled_back_once_to_the_last_healthy_lightning_checkpoint(
    make_worker: Callable[..., WorkerProcess],
    ops_settings: Settings,
    kafka_bootstrap: str,
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    prefix = ops_settings.kafka.topic_prefix
    checkpoint_dir = tmp_path / "lightning-run"
    with make_worker(), TrainerClient("lightning-run", settings=ops_settings) as client:
        callback = FragranceOpsCallback(
            client,
            checkpoint_dir,
            # the worker judges the run in the trainer's units (optimizer steps)
            run_settings={"checkpoints.interval_steps": INTERVAL, "checkpoints.keep": 100},
        )
        divergence = Divergence(callback)
        module = Regression()
        trainer = pl.Trainer(
            max_steps=1000,  # a bound on how long the worker may take, not a deadline
            callbacks=[
                callback,
                divergence,
                ModelCheckpoint(checkpoint_dir, every_n_train_steps=INTERVAL, save_top_k=-1),
            ],
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, regression_data())
        assert divergence.restored is not None, "no rollback arrived"
        records = read_rollback_records(kafka_bootstrap, prefix, announced=b"step%3D30.ckpt")
    # Lightning's own checkpoint after 20 updates, announced as operations step 19.
    target = checkpoint_dir / "epoch=1-step=20.ckpt"
    records.the_rollback(
        checkpoint_uri=target.resolve().as_uri(),
        checkpoint_step=19,
        anomaly_step=INJECT_AFTER + 1,
    )
    saved = torch.load(target, weights_only=True)
    assert states_equal(divergence.restored["state_dict"], saved["state_dict"])
    assert states_equal(divergence.restored["optimizer"], saved["optimizer_states"][0])
    assert states_equal(divergence.restored["scheduler"], saved["lr_schedulers"][0])
    # The abandoned trajectory's checkpoints are gone; training went on from step 20.
    diverged = checkpoint_dir / "epoch=1-step=30.ckpt"
    assert diverged.resolve().as_uri() in records.announced_uris
    assert not diverged.exists()
    for path in checkpoint_dir.glob("*.ckpt"):
        ops_state = torch.load(path, weights_only=True)["callbacks"][callback.state_key]
        assert ops_state["attempt"] == 1 or ops_state["step"] <= 19, (path.name, ops_state)
    assert callback.ops.step > STOP_AFTER
    assert len(divergence.losses_after) >= STOP_AFTER - 20
    assert all(math.isfinite(loss) for loss in divergence.losses_after)
    # Against the anomaly step's loss: how far later diverged steps got depends on how long
    # the worker took to answer (the optimizer may bring the loss down meanwhile).
    assert max(divergence.losses_after) < divergence.losses_diverged[0]
    # The worker's entropy schedule reached the module's coefficient (0.0 before): near the
    # start of its 10,000 steps, how near depending on the step of the last command sent.
    assert 0.0099 < module.entropy_coef <= 0.01
