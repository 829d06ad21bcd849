"""Training operations end to end: a PyTorch trainer, the broker, the worker process."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import torch
from confluent_kafka import Message

from config.settings import Settings
from fragrance_ops.worker_process import WorkerProcess
from producers import TrainerClient
from producers.reference import PPOConfig, ReferencePPOTrainer
from producers.reference.ppo import StepReport
from producers.torch_ops import TorchRunOps
from schemas import CheckpointSaved, StepMetric, Topic, encode, topic_name
from tests.helpers.kafka import consume_until, produce_records

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
    # The injected fault: a diverged update, its loss far above the run's noise (a converged
    # loss multiplied, 1e-8 to 5e-7, is below the anomaly rule's spread floor).
    value = loss.item() + (50.0 if spike else 0.0)
    ops.end_step(loss=value, reward=1.0 / (1.0 + value))


def short_checkpoints(settings: Settings) -> Settings:
    """A checkpoint every 50 steps, healthy after 20 normal ones (the worker gets the
    lookback through its environment, as CHECKPOINTS__HEALTH_LOOKBACK_STEPS)."""
    checkpoints = settings.checkpoints.model_copy(
        update={"interval_steps": 50, "health_lookback_steps": 20}
    )
    return settings.model_copy(update={"checkpoints": checkpoints})


def regression_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(256, 8, generator=generator)
    return inputs, inputs @ torch.randn(8, 1, generator=generator)


def test_a_loss_spike_is_rolled_back_to_the_last_healthy_checkpoint_once(
    make_worker: Callable[..., WorkerProcess],
    ops_settings: Settings,
    kafka_bootstrap: str,
    tmp_path: Path,
) -> None:
    settings, data = short_checkpoints(ops_settings), regression_data()
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


def rollbacks_and_acks(
    kafka_bootstrap: str, prefix: str, expected: int
) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    commands = consume_until(
        kafka_bootstrap,
        topic_name(Topic.COMMANDS, prefix),
        lambda got: sum(b'"rollback"' in (m.value() or b"") for m in got) >= expected,
        30,
    )
    acks = consume_until(
        kafka_bootstrap, topic_name(Topic.ACKS, prefix), lambda got: len(got) >= expected, 30
    )
    decoded = [orjson.loads(message.value()) for message in commands]
    return [c for c in decoded if c["type"] == "rollback"], [
        orjson.loads(message.value()) for message in acks
    ]


def test_the_reference_ppo_trainer_is_rolled_back_after_an_injected_divergence(
    make_worker: Callable[..., WorkerProcess],
    ops_settings: Settings,
    kafka_bootstrap: str,
    tmp_path: Path,
) -> None:
    settings = ops_settings.model_copy(
        update={"checkpoints": ops_settings.checkpoints.model_copy(update={"interval_steps": 100})}
    )
    with make_worker():
        trainer = ReferencePPOTrainer(
            TrainerClient("ppo-run", settings=settings),
            tmp_path / "ppo-run",
            config=PPOConfig(rollout_steps=512),
            seed=3,
        )
        trainer.inject_fault(230)
        restored: dict[str, torch.Tensor] = {}

        def observe(report: StepReport) -> None:
            if trainer.ops.client.attempt == 1 and not restored:  # the rollback just applied
                restored.update(
                    {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
                )
            time.sleep(0.005)  # a real trainer's pace, so the rollback lands mid-run

        trainer.train(600, on_step=observe)
        assert trainer.ops.client.attempt == 1, "no rollback arrived (or more than one)"
        saved = torch.load(trainer.ops.store.path_for(200), weights_only=True)["model"]
        for name, parameter in restored.items():
            assert torch.equal(parameter, saved[name]), name
        time.sleep(2)  # would a second rollback follow? give the worker time to say so
        rollbacks, acks = rollbacks_and_acks(
            kafka_bootstrap, settings.kafka.topic_prefix, expected=1
        )
        trainer.ops.client.close()
    assert [(r["anomaly_step"], r["checkpoint_step"]) for r in rollbacks] == [(230, 200)]
    assert "loss rise to" in str(rollbacks[0]["reason"])  # PPO's loss is negative here
    (ack,) = [ack for ack in acks if ack["command_id"] == rollbacks[0]["command_id"]]
    assert (ack["status"], ack["after"]) == ("applied", {"step": 200, "attempt": 1})


SPIKES = {0: 130, 1: 260, 2: 390}
"""attempt -> the step whose loss is spiked in that attempt."""
KILLS = {(0, 131), (1, 180), (1, 261), (2, 300)}
"""(attempt, step) after which the worker is SIGKILLed; it restarts 15 steps later."""


def test_sigkill_of_the_worker_mid_run_misses_no_anomaly_and_duplicates_no_rollback(
    make_worker: Callable[..., WorkerProcess],
    ops_settings: Settings,
    kafka_bootstrap: str,
    tmp_path: Path,
) -> None:
    settings, data = short_checkpoints(ops_settings), regression_data()
    worker = make_worker(CHECKPOINTS__HEALTH_LOOKBACK_STEPS="20")
    worker.start()
    ops = make_trainer(settings, tmp_path / "torch-run")
    applied_rollbacks: list[int] = []
    ops.client.on_command(
        "rollback",
        lambda command, apply=ops._rollback: applied_rollbacks.append(1) or apply(command),
    )
    restart_at: int | None = None
    deadline = time.monotonic() + 180
    while (ops.client.attempt, ops.step) < (3, 450) and time.monotonic() < deadline:
        attempt, step = ops.client.attempt, ops.step
        train_step(ops, data, spike=SPIKES.get(attempt) == step)
        if (attempt, step) in KILLS:
            worker.kill()
            restart_at = step + 15
        elif restart_at is not None and ops.step >= restart_at:
            worker.start()
            restart_at = None
        time.sleep(0.01)
    if restart_at is not None:
        worker.start()
    ops.client.flush()
    time.sleep(2)  # would a further rollback follow? give the worker time to say so
    rollbacks, acks = rollbacks_and_acks(kafka_bootstrap, settings.kafka.topic_prefix, 3)
    ops.client.close()
    worker.stop()
    assert worker.starts == len(KILLS) + 1
    distinct = {r["command_id"]: r for r in rollbacks}  # a replay may repeat an id, never more
    assert sorted((r["anomaly_step"], r["checkpoint_step"]) for r in distinct.values()) == [
        (130, 100),
        (260, 250),
        (390, 350),
    ]
    assert len(applied_rollbacks) == 3
    assert ops.client.attempt == 3
    applied = [ack for ack in acks if ack["detail"] == "rollback applied"]
    assert sorted(ack["command_id"] for ack in applied) == sorted(distinct)


def test_a_rollback_waiting_on_a_run_that_fell_silent_is_sent_on_the_timer(
    make_worker: Callable[..., WorkerProcess], ops_settings: Settings, kafka_bootstrap: str
) -> None:
    """The trainer died after its anomaly: the save of step 130 its metrics named never
    arrives, and no metric follows. The running worker rolls the run back to the newest
    healthy checkpoint it read once the run has been silent for the setting."""
    prefix, run = ops_settings.kafka.topic_prefix, "silent-run"

    def step(number: int, loss: float = 1.0) -> StepMetric:
        named = 130 if number > 130 else 100 if number > 100 else None
        value = loss + 0.01 * (number % 3)
        return StepMetric(
            run_id=run, step=number, loss=value, reward=0.5, ts=time.time(), checkpoint_step=named
        )

    with make_worker(CHECKPOINTS__SILENT_DECISION_AFTER_S="2"):
        saved = CheckpointSaved(run_id=run, step=100, uri="file:///ckpt/100.pt", ts=time.time())
        produce_records(
            kafka_bootstrap, topic_name(Topic.CHECKPOINTS, prefix), [(run, encode(saved))]
        )
        metrics = [step(number) for number in range(140)] + [step(140, loss=math.nan)]
        produce_records(
            kafka_bootstrap,
            topic_name(Topic.METRICS, prefix),
            [(run, encode(metric)) for metric in metrics],
        )

        def rollbacks(messages: list[Message]) -> list[dict[str, Any]]:
            commands = [orjson.loads(m.value()) for m in messages if m.key() == run.encode()]
            return [c for c in commands if c["type"] == "rollback"]

        got = consume_until(
            kafka_bootstrap,
            topic_name(Topic.COMMANDS, prefix),
            lambda messages: bool(rollbacks(messages)),
            to_end=True,
        )
    (rollback,) = rollbacks(got)
    assert (rollback["checkpoint_step"], rollback["anomaly_step"]) == (100, 140)
