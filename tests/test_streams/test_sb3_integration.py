"""Stable-Baselines3 runs against the worker: an injected divergence is rolled back once, for
an on-policy (A2C) and an off-policy (SAC) algorithm."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
import torch
from stable_baselines3.common.callbacks import CallbackList

from config.settings import Settings
from fragrance_ops.worker_process import WorkerProcess
from producers import TrainerClient
from producers.sb3 import FragranceOpsCallback
from schemas import Topic, topic_name
from tests.helpers.kafka import consume_until
from tests.helpers.sb3 import Divergence, small_model
from tests.helpers.states import states_equal

pytestmark = pytest.mark.integration

INTERVAL = 10


# Budgets far beyond the updates needed: the run stops 20 updates after the restore, so the
# budget only bounds how long the worker may take to answer (paced at 10 ms per environment
# step from the injection: 50 s for A2C, 20 s for SAC, plus the updates themselves).
@pytest.mark.parametrize(("name", "budget"), [("a2c", 5 * 1000), ("sac", 100 + 2000)])
def test_an_injected_divergence_is_rolled_back_once_by_the_worker(
    make_worker: Callable[..., WorkerProcess],
    ops_settings: Settings,
    kafka_bootstrap: str,
    tmp_path: Path,
    name: str,
    budget: int,
) -> None:
    settings = ops_settings.model_copy(
        update={
            "checkpoints": ops_settings.checkpoints.model_copy(update={"interval_steps": INTERVAL})
        }
    )
    prefix = settings.kafka.topic_prefix
    run_id = f"sb3-{name}"
    with make_worker(), TrainerClient(run_id, settings=settings) as client:
        callback = FragranceOpsCallback(
            client,
            tmp_path / run_id,
            # the worker's rules judge the run in the trainer's units (updates)
            run_settings={"checkpoints.interval_steps": INTERVAL, "checkpoints.keep": 100},
        )
        divergence = Divergence(callback, at_step=24, pace_s=0.01, stop_after_step=40)
        model = small_model(name, seed=1)
        model.learn(budget, callback=CallbackList([callback, divergence]))
        assert divergence.restored is not None, "no rollback arrived"
        acks = consume_until(
            kafka_bootstrap,
            topic_name(Topic.ACKS, prefix),
            lambda got: any(b'"rollback"' in (m.value() or b"") for m in got),
            30,
        )
        time.sleep(2)  # would a second rollback follow? give the worker time to say so
        commands = consume_until(
            kafka_bootstrap, topic_name(Topic.COMMANDS, prefix), lambda got: len(got) >= 1, 30
        )
    decoded = [orjson.loads(message.value()) for message in commands]
    rollbacks = [command for command in decoded if command["type"] == "rollback"]
    assert len(rollbacks) == 1, rollbacks
    assert rollbacks[0]["checkpoint_step"] == 20
    assert rollbacks[0]["anomaly_step"] == 25  # the first update after the corruption
    assert not [command for command in decoded if command["type"] == "halt"]
    saved = torch.load(callback.ops.store.path_for(20), weights_only=True)
    for part in ("model", "optimizer", "more_optimizers"):
        assert states_equal(divergence.restored[part], saved[part]), part
    rollback_acks = [
        ack
        for ack in (orjson.loads(message.value()) for message in acks)
        if ack["command_id"] == rollbacks[0]["command_id"]
    ]
    assert [ack["status"] for ack in rollback_acks] == ["applied"]
    assert rollback_acks[0]["after"] == {"step": 20, "attempt": 1}
    assert callback.ops.step > 40  # training went on after the restore
