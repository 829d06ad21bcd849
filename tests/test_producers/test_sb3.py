"""The Stable-Baselines3 callback on Gymnasium classic-control tasks (CartPole, Pendulum):
PPO, A2C, SAC, TD3 and DQN."""

from __future__ import annotations

import math
from pathlib import Path

import orjson
import pytest
import torch
from stable_baselines3 import A2C, PPO, SAC
from stable_baselines3.common.callbacks import CallbackList

from config.settings import Settings, run_overrides
from producers import InMemoryTransport, TrainerClient
from producers.sb3 import FragranceOpsCallback, algorithm_label
from schemas import Halt, Retune, Rollback, SetEntropyCoef, Topic, encode
from tests.helpers.operations import InMemoryOperations
from tests.helpers.sb3 import ALGORITHMS, Divergence, small_model
from tests.helpers.states import states_equal

N_STEPS = 64


def make_model(seed: int = 0) -> PPO:
    return PPO("MlpPolicy", "CartPole-v1", n_steps=N_STEPS, batch_size=32, n_epochs=2, seed=seed)


def make_callback(tmp_path: Path, transport: InMemoryTransport) -> FragranceOpsCallback:
    settings = run_overrides(Settings(), {"checkpoints.interval_steps": 2})
    client = TrainerClient("sb3-run", settings=settings, transport=transport)
    return FragranceOpsCallback(client, tmp_path / "sb3-run")


def published(transport: InMemoryTransport, topic: Topic) -> list[dict[str, object]]:
    return [orjson.loads(record.value) for record in transport.records(topic)]


def test_every_update_is_reported_and_checkpointed(tmp_path: Path) -> None:
    transport = InMemoryTransport()
    callback = make_callback(tmp_path, transport)
    make_model().learn(N_STEPS * 6, callback=callback)
    metrics = published(transport, Topic.METRICS)
    assert [metric["step"] for metric in metrics] == [0, 1, 2, 3, 4, 5]
    for metric in metrics:  # NaN and infinities travel as strings: not floats, not finite
        for name in ("loss", "policy_loss", "value_loss", "entropy"):
            assert isinstance(metric[name], float), (name, metric)
            assert math.isfinite(metric[name]), (name, metric)
    assert all(metric["reward"] > 0 for metric in metrics[1:])  # CartPole returns are >= 1
    assert {"policy_loss", "value_loss", "entropy", "clip_epsilon"} <= set(metrics[-1])
    assert callback.ops.store.steps() == [2, 4]
    (announced,) = published(transport, Topic.RUNS)
    assert announced["algorithm"] == "ppo"  # the model's class, as the label of its metrics


def test_commands_set_entropy_roll_back_retune_and_halt(tmp_path: Path) -> None:
    transport = InMemoryTransport()
    callback = make_callback(tmp_path, transport)
    model = make_model()
    model.learn(N_STEPS * 5, callback=callback)  # updates 0..4, checkpoints at 2 and 4
    saved = torch.load(callback.ops.store.path_for(2), weights_only=True)["model"]
    common = {"run_id": "sb3-run", "issued_at": 1.0}
    transport.deliver(
        Topic.COMMANDS,
        b"sb3-run",
        encode(SetEntropyCoef(command_id="e", entropy_coef=0.005, step=5, **common)),
    )
    model.learn(N_STEPS, callback=callback, reset_num_timesteps=False)  # update 5
    assert model.ent_coef == 0.005
    for command in (
        Rollback(
            command_id="r",
            checkpoint_step=2,
            checkpoint_uri=callback.ops.store.uri_for(2),
            anomaly_step=4,
            reason="loss spike",
            **common,
        ),
    ):
        transport.deliver(Topic.COMMANDS, b"sb3-run", encode(command))
    callback.ops.client.poll_commands()  # between two learn() calls, as at an update boundary
    for name, parameter in model.policy.state_dict().items():
        assert torch.equal(parameter, saved[name]), name
    assert (callback.ops.step, callback.ops.client.attempt) == (3, 1)
    assert callback.ops.store.steps() == [2]  # 4 was the abandoned trajectory

    transport.deliver(
        Topic.COMMANDS,
        b"sb3-run",
        encode(
            Retune(
                command_id="t",
                changes={"learning_rate": 1e-4, "clip_epsilon": 0.1},
                rationale="ratings",
                window={},
                **common,
            )
        ),
    )
    model.learn(N_STEPS * 2, callback=callback, reset_num_timesteps=False)
    assert model.lr_schedule(0.5) == pytest.approx(1e-4)
    assert model.clip_range(0.5) == pytest.approx(0.1)
    assert model.policy.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)

    transport.deliver(
        Topic.COMMANDS, b"sb3-run", encode(Halt(command_id="h", reason="budget", **common))
    )
    before = model.num_timesteps
    model.learn(N_STEPS * 20, callback=callback, reset_num_timesteps=False)
    assert model.num_timesteps - before <= 2 * N_STEPS  # stopped at the next boundary
    statuses = {ack["command_id"]: ack["status"] for ack in published(transport, Topic.ACKS)}
    assert statuses == {"e": "applied", "r": "applied", "t": "applied", "h": "applied"}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_with_the_default_rules_ppo_on_cartpole_is_never_rolled_back(
    tmp_path: Path, seed: int
) -> None:
    # SB3's PPO loss on CartPole is large and noisy (30 to 70, doubling between updates):
    # under the guide's literal "2x the previous value" these runs were rolled back, and
    # halted. No anomaly overrides: the worker's default rules; a checkpoint every 10
    # updates (with one per update, the default 500 would never come in this test).
    defaults = Settings()
    settings = defaults.model_copy(
        update={"checkpoints": defaults.checkpoints.model_copy(update={"interval_steps": 10})}
    )
    transport = InMemoryTransport()
    operations = InMemoryOperations(transport, settings)
    client = TrainerClient(f"sb3-defaults-{seed}", settings=settings, transport=transport)
    callback = FragranceOpsCallback(client, tmp_path / "run")
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=256, batch_size=64, seed=seed)
    model.learn(256 * 80, callback=callback)
    assert len(published(transport, Topic.METRICS)) >= 80
    assert operations.of_type("rollback") == []
    assert operations.of_type("halt") == []


def test_the_algorithm_label_is_the_model_class_or_ppo_when_the_contract_cannot_carry_it() -> None:
    assert algorithm_label("PPO") == "ppo"
    assert algorithm_label("RecurrentPPO") == "recurrentppo"
    assert algorithm_label("Ppo\u00e9Custom") == "ppocustom"
    assert algorithm_label("X" * 40) == "x" * 32
    assert algorithm_label("_Private") == "private"
    assert algorithm_label("2A2C") == "a2c"  # starts with a letter
    assert algorithm_label("\u00c9\u00e9") == "ppo"  # nothing left: the default


def settings_with(**checkpoints: int) -> Settings:
    defaults = Settings()
    return defaults.model_copy(
        update={"checkpoints": defaults.checkpoints.model_copy(update=checkpoints)}
    )


# The metrics each algorithm reports besides loss and reward (module docstring of sb3.py).
REPORTED = {
    "ppo": {"policy_loss", "value_loss", "entropy", "entropy_coef", "clip_epsilon"},
    "a2c": {"policy_loss", "value_loss", "entropy", "entropy_coef"},
    "sac": {"policy_loss", "value_loss", "entropy_coef"},
    "td3": {"value_loss"},  # policy_loss every policy_delay (2) updates
    "dqn": {"value_loss"},
}


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_algorithm_reports_each_update_with_its_own_finite_losses(
    tmp_path: Path, name: str
) -> None:
    transport = InMemoryTransport()
    settings = run_overrides(Settings(), {"checkpoints.interval_steps": 10})
    client = TrainerClient(f"{name}-run", settings=settings, transport=transport)
    callback = FragranceOpsCallback(client, tmp_path / name)
    model = small_model(name)
    model.learn(64 * 25 if name == "ppo" else 220, callback=callback)
    metrics = published(transport, Topic.METRICS)
    assert len(metrics) >= 20
    assert [metric["step"] for metric in metrics] == list(range(len(metrics)))
    for metric in metrics:
        assert REPORTED[name] <= set(metric), metric
        for key in ("loss", "policy_loss", "value_loss", "entropy", "entropy_coef"):
            if key in metric:  # NaN would travel as a string
                assert isinstance(metric[key], float), (key, metric)
                assert math.isfinite(metric[key]), (key, metric)
        assert "learning_rate" in metric
    if name == "td3":  # the actor's loss, when the delayed actor was updated: every other
        assert sum("policy_loss" in metric for metric in metrics) == len(metrics) // 2
    if name == "a2c":  # A2C's loss, composed as A2C does from the parts SB3 logs
        logged = model.logger.name_to_value
        assert metrics[-1]["loss"] == pytest.approx(
            logged["train/policy_loss"]
            + model.ent_coef * logged["train/entropy_loss"]
            + model.vf_coef * logged["train/value_loss"]
        )
    assert callback.ops.store.steps() == list(range(10, len(metrics), 10))
    (announced,) = published(transport, Topic.RUNS)
    assert announced["algorithm"] == name


# What each algorithm does with set_entropy_coef, then a retune of each hyperparameter.
TAKES = {
    "ppo": ("applied", "applied", "applied"),
    "a2c": ("applied", "applied", "rejected"),
    "sac": ("rejected", "applied", "rejected"),  # ent_coef="auto": SAC learns it
    "td3": ("rejected", "applied", "rejected"),
    "dqn": ("rejected", "applied", "rejected"),
}


@pytest.mark.parametrize("name", ALGORITHMS)
def test_each_algorithm_takes_the_hyperparameters_it_has_and_refuses_the_others(
    tmp_path: Path, name: str
) -> None:
    transport = InMemoryTransport()
    client = TrainerClient(f"{name}-run", transport=transport)
    callback = FragranceOpsCallback(client, tmp_path / name)
    model = small_model(name)
    budget = 64 * 2 if name == "ppo" else 120
    model.learn(budget, callback=callback)
    common = {"run_id": f"{name}-run", "issued_at": 1.0}
    commands = [
        SetEntropyCoef(command_id="e", entropy_coef=0.005, step=1, **common),
        Retune(command_id="l", changes={"learning_rate": 1e-5}, rationale="", window={}, **common),
        Retune(command_id="c", changes={"clip_epsilon": 0.1}, rationale="", window={}, **common),
    ]
    for command in commands:
        transport.deliver(Topic.COMMANDS, f"{name}-run".encode(), encode(command))
    model.learn(budget, callback=callback, reset_num_timesteps=False)
    acks = {ack["command_id"]: ack for ack in published(transport, Topic.ACKS)}
    assert tuple(acks[c]["status"] for c in "elc") == TAKES[name], acks
    if acks["e"]["status"] == "rejected":
        assert "entropy coefficient" in acks["e"]["detail"]
    else:
        assert model.ent_coef == 0.005  # type: ignore[attr-defined]
    # SB3 sets every optimizer's rate from its schedule before each update: the retuned
    # value replaced the schedule, and every optimizer (SAC: actor, critic, entropy) has it.
    optimizers = [callback.ops.optimizer, *callback.ops.more_optimizers]
    assert len(optimizers) == {"sac": 3, "td3": 2}.get(name, 1)
    for optimizer in optimizers:
        assert [group["lr"] for group in optimizer.param_groups] == [1e-5]
    last = published(transport, Topic.METRICS)[-1]
    assert last["learning_rate"] == 1e-5


def test_sac_with_a_fixed_entropy_coefficient_takes_the_schedule(tmp_path: Path) -> None:
    transport = InMemoryTransport()
    client = TrainerClient("sac-fixed", transport=transport)
    callback = FragranceOpsCallback(client, tmp_path / "sac")
    model = small_model("sac", ent_coef=0.1)
    assert isinstance(model, SAC)
    model.learn(110, callback=callback)
    assert published(transport, Topic.METRICS)[-1]["entropy_coef"] == pytest.approx(0.1)
    command = SetEntropyCoef(
        command_id="e", entropy_coef=0.005, step=1, run_id="sac-fixed", issued_at=1.0
    )
    transport.deliver(Topic.COMMANDS, b"sac-fixed", encode(command))
    model.learn(20, callback=callback, reset_num_timesteps=False)
    assert model.logger.name_to_value["train/ent_coef"] == pytest.approx(0.005)  # SAC used it
    assert published(transport, Topic.ACKS)[0]["status"] == "applied"


@pytest.mark.parametrize("name", ALGORITHMS)
def test_an_injected_divergence_is_rolled_back_to_the_last_healthy_checkpoint(
    tmp_path: Path, name: str
) -> None:
    # The worker's default rules (with the callback's per-algorithm overrides) in process.
    settings = settings_with(interval_steps=10, keep=100)  # checkpoint 20 kept to compare
    transport = InMemoryTransport()
    operations = InMemoryOperations(transport, settings)
    client = TrainerClient(f"{name}-run", settings=settings, transport=transport)
    callback = FragranceOpsCallback(client, tmp_path / name)
    divergence = Divergence(callback, at_step=24)
    model = small_model(name, seed=1)
    model.learn(64 * 60 if name == "ppo" else 400, callback=CallbackList([callback, divergence]))
    (rollback,) = operations.of_type("rollback")
    assert isinstance(rollback, Rollback)
    assert rollback.checkpoint_step == 20
    assert rollback.anomaly_step == 25  # the first update after the corruption
    assert operations.of_type("halt") == []
    saved = torch.load(callback.ops.store.path_for(20), weights_only=True)
    assert divergence.restored is not None
    assert states_equal(divergence.restored["model"], saved["model"])
    assert states_equal(divergence.restored["optimizer"], saved["optimizer"])
    assert states_equal(divergence.restored["more_optimizers"], saved["more_optimizers"])
    if name == "sac":  # the learned entropy coefficient is part of what is restored
        assert "log_ent_coef" in saved["model"]
    acks = [ack for ack in published(transport, Topic.ACKS) if ack["command_type"] == "rollback"]
    assert [(ack["status"], ack["after"]) for ack in acks] == [
        ("applied", {"step": 20, "attempt": 1})
    ]
    assert len(published(transport, Topic.METRICS)) > 40  # and training went on


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_with_the_default_rules_a2c_on_cartpole_is_never_rolled_back(
    tmp_path: Path, seed: int
) -> None:
    # A2C's loss moves 3 to 5 times between clean updates: the callback announces a median
    # baseline and a patience of 3 for it (ALGORITHM_RUN_SETTINGS); the rest are defaults.
    settings = settings_with(interval_steps=10)
    transport = InMemoryTransport()
    operations = InMemoryOperations(transport, settings)
    client = TrainerClient(f"a2c-defaults-{seed}", settings=settings, transport=transport)
    callback = FragranceOpsCallback(client, tmp_path / "run")
    model = small_model("a2c", seed=seed)
    assert isinstance(model, A2C)
    model.learn(5 * 600, callback=callback)
    assert len(published(transport, Topic.METRICS)) == 600
    (announced,) = published(transport, Topic.RUNS)
    assert announced["settings"] == {"anomaly.baseline": "median", "anomaly.patience": 3}
    assert operations.of_type("rollback") == []
    assert operations.of_type("halt") == []


def test_with_the_guides_anomaly_rule_a_clean_a2c_run_is_rolled_back(tmp_path: Path) -> None:
    # Why A2C gets its overrides: with the guide's rule (the previous loss as the baseline,
    # acting on the first spike) a clean run's noisy loss is taken for a divergence (seeds
    # 2 and 3 of 1-3 within 400 updates; seed 3 at update 296, a 4.6x "spike").
    settings = settings_with(interval_steps=10)
    transport = InMemoryTransport()
    operations = InMemoryOperations(transport, settings)
    client = TrainerClient("a2c-guide-rule", settings=settings, transport=transport)
    guide_rule = {"anomaly.baseline": "previous", "anomaly.patience": 1}  # the defaults
    callback = FragranceOpsCallback(client, tmp_path / "run", run_settings=guide_rule)
    small_model("a2c", seed=3).learn(5 * 300, callback=callback)
    (announced,) = published(transport, Topic.RUNS)
    assert announced["settings"] == guide_rule
    rollbacks = operations.of_type("rollback")
    assert rollbacks, "the guide's rule took no clean update for a divergence"
    first = rollbacks[0]
    assert isinstance(first, Rollback)
    assert "loss spike" in first.reason
