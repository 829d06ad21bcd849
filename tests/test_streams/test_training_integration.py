"""Training operations end to end: a PyTorch trainer, the broker, the worker process."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
import torch

from fragrance_ops.settings import Settings
from fragrance_ops.worker_process import WorkerProcess
from producers import TrainerClient
from producers.torch_ops import TorchRunOps
from schemas import Topic, topic_name
from tests.helpers.kafka import consume_until

pytestmark = pytest.mark.integration

SPIKE_STEP = 130


def make_trainer(settings: Settings, checkpoint_dir: Path) -> TorchRunOps:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    client = TrainerClient("torch-run", settings=settings)
    client.announce({})
    return TorchRunOps(client, model, optimizer, checkpoint_dir)


def train_step(ops: TorchRunOps, data: tuple[torch.Tensor, torch.Tensor], spike: bool) -> None:
    inputs, targets = data
    loss = torch.nn.functional.mse_loss(ops.model(inputs), targets)
    ops.optimizer.zero_grad()
    loss.backward()
    ops.optimizer.step()
    value = loss.item() * (50.0 if spike else 1.0)  # the injected fault
    ops.end_step(loss=value, reward=1.0 / (1.0 + value))


def test_a_loss_spike_is_rolled_back_to_the_last_healthy_checkpoint_once(
    make_worker: Callable[..., WorkerProcess],
    ops_settings: Settings,
    kafka_bootstrap: str,
    tmp_path: Path,
) -> None:
    settings = ops_settings.model_copy(
        update={
            "checkpoints": ops_settings.checkpoints.model_copy(
                update={"interval_steps": 50, "health_lookback_steps": 20}
            )
        }
    )
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(256, 8, generator=generator)
    data = (inputs, inputs @ torch.randn(8, 1, generator=generator))
    with make_worker(CHECKPOINTS__HEALTH_LOOKBACK_STEPS="20"):
        ops = make_trainer(settings, tmp_path / "torch-run")
        spiked = False
        deadline = time.monotonic() + 90
        while ops.client.attempt == 0 and time.monotonic() < deadline:
            spike = ops.step == SPIKE_STEP and not spiked
            spiked = spiked or spike
            train_step(ops, data, spike)
            if ops.step > SPIKE_STEP:
                time.sleep(0.01)  # let the rollback catch up with a fast loop
        assert ops.client.attempt == 1, "no rollback arrived"
        restored = {name: p.detach().clone() for name, p in ops.model.named_parameters()}
        saved = torch.load(ops.store.path_for(100), weights_only=True)["model"]
        for name, parameter in restored.items():
            assert torch.equal(parameter, saved[name]), name
        assert ops.step == 101
        for _ in range(200):  # continue well past the old spike
            train_step(ops, data, spike=False)
        ops.client.flush()
        prefix = settings.kafka.topic_prefix
        acks = consume_until(
            kafka_bootstrap, topic_name(Topic.ACKS, prefix), lambda got: len(got) >= 1, 60
        )
        time.sleep(2)  # would a second rollback follow? give the worker time to say so
        commands = consume_until(
            kafka_bootstrap, topic_name(Topic.COMMANDS, prefix), lambda got: len(got) >= 1, 30
        )
        ops.client.close()
    decoded = [orjson.loads(message.value()) for message in commands]
    rollbacks = [command for command in decoded if command["type"] == "rollback"]
    assert len(rollbacks) == 1
    assert rollbacks[0]["checkpoint_step"] == 100
    assert rollbacks[0]["anomaly_step"] == SPIKE_STEP
    assert "loss spike" in rollbacks[0]["reason"]
    acked = [orjson.loads(message.value()) for message in acks]
    rollback_acks = [ack for ack in acked if ack["command_id"] == rollbacks[0]["command_id"]]
    assert [ack["status"] for ack in rollback_acks] == ["applied"]
    assert rollback_acks[0]["after"] == {"step": 100, "attempt": 1}
    entropy = [command for command in decoded if command["type"] == "set_entropy_coef"]
    assert entropy[0]["entropy_coef"] == pytest.approx(0.01)
    assert any(command["step"] > 100 for command in entropy)  # resumed: sent again at once
