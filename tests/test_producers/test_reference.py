"""The reference PPO trainer and its environment, without a broker."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from config.settings import Settings
from producers import InMemoryTransport, TrainerClient
from producers.reference import FragranceFormulaEnv, PPOConfig, ReferencePPOTrainer
from producers.reference.ppo import FaultKind, Rollout, StepReport, episode_reward
from schemas import Rollback, Topic
from tests.helpers.operations import InMemoryOperations


def test_the_environment_follows_the_gymnasium_api_and_returns_a_similarity() -> None:
    env = FragranceFormulaEnv()
    check_env(env, skip_render_check=True)
    observation, _ = env.reset(seed=3)
    assert observation.shape == (40,)
    assert env.action_space.n == 60
    total, terminated, steps = 0.0, False, 0
    while not terminated:
        observation, reward, terminated, truncated, info = env.step(np.int64(steps % 60))
        total += float(reward)
        steps += 1
        assert not truncated
    assert steps == env.formula_units
    assert total == pytest.approx(info["similarity"])
    assert 0.0 <= total <= 1.0
    with pytest.raises(ValueError, match="ingredient"):
        env.step(np.int64(60))


def test_the_reference_trainer_learns_checkpoints_and_reports_every_update(
    tmp_path: Path,
) -> None:
    transport = InMemoryTransport()
    trainer = ReferencePPOTrainer(
        TrainerClient("ppo-1", settings=Settings(), transport=transport), tmp_path / "ppo-1"
    )
    assert PPOConfig() == PPOConfig(
        state_dim=40, action_dim=60, rollout_steps=2048, epochs=10, batch_size=64
    )
    reports: list[StepReport] = []
    trainer.train(1100, on_step=reports.append)
    assert [report.step for report in reports] == list(range(1100))
    assert trainer.ops.store.steps() == [500, 1000]
    # 320 minibatch updates per rollout (2,048 / 64 x 10 epochs), each reporting the mean
    # return of its own minibatch's episodes: a 1,000-step window holds 1,000 values, each
    # near its rollout's mean.
    first = reports[:320]
    assert len({report.reward for report in first}) > 300
    mean = sum(report.reward for report in first) / len(first)
    assert all(abs(report.reward - mean) < 0.25 for report in first)
    last = reports[960:]  # the fourth rollout's updates
    assert sum(report.reward for report in last) / len(last) > mean  # it learns
    metrics = [orjson.loads(record.value) for record in transport.records(Topic.METRICS)]
    assert metrics[-1]["learning_rate"] == pytest.approx(1e-3)
    assert metrics[-1]["clip_epsilon"] == pytest.approx(0.2)
    assert {"policy_loss", "value_loss", "entropy", "entropy_coef"} <= set(metrics[-1])
    (announced,) = [orjson.loads(record.value) for record in transport.records(Topic.RUNS)]
    assert announced["settings"] == {"anomaly.baseline": "median", "anomaly.patience": 3}


def test_an_updates_reward_is_the_mean_return_of_its_minibatchs_ended_episodes() -> None:
    empty = torch.zeros(5)
    rollout = Rollout(
        observations=empty,
        actions=empty,
        log_probs=empty,
        advantages=empty,
        returns=empty,
        episode_returns=torch.tensor([0.2, 0.2, 0.8, 0.8, math.nan]),
        mean_episode_return=0.5,
    )
    # Weighted by transitions; the running episode's (NaN) left out.
    assert episode_reward(rollout, torch.tensor([0, 2, 3, 4])) == pytest.approx(0.6)
    assert episode_reward(rollout, torch.tensor([4])) == 0.5  # none ended: the rollout's


def test_an_injected_fault_makes_the_loss_spike(tmp_path: Path) -> None:
    trainer = ReferencePPOTrainer(
        TrainerClient("ppo-2", settings=Settings(), transport=InMemoryTransport()),
        tmp_path / "ppo-2",
        config=PPOConfig(rollout_steps=256),
    )
    trainer.inject_fault(50)
    reports: list[StepReport] = []
    trainer.train(60, on_step=reports.append)
    before = max(abs(report.loss) for report in reports[40:50])
    assert min(report.loss for report in reports[50:53]) > 10 * before


def run_with_default_operations(
    tmp_path: Path,
    *,
    seed: int,
    steps: int,
    fault_at: int | None = None,
    kind: FaultKind = "parameters",
) -> tuple[InMemoryOperations, ReferencePPOTrainer]:
    """The reference trainer announced with no overrides (the worker's defaults apply),
    its records through the training rules as the worker would take them."""
    transport = InMemoryTransport()
    operations = InMemoryOperations(transport)
    client = TrainerClient(f"defaults-{seed}", settings=Settings(), transport=transport)
    trainer = ReferencePPOTrainer(client, tmp_path / f"run-{seed}", seed=seed, run_settings={})
    if fault_at is not None:
        trainer.inject_fault(fault_at, kind)
    trainer.train(steps)
    return operations, trainer


def test_with_the_default_rules_a_clean_run_is_never_rolled_back(tmp_path: Path) -> None:
    # Issue 15: with the guide's literal "2x the previous value", PPO's total loss (around
    # zero, changing sign) rolled back every clean run, and halted some.
    operations, trainer = run_with_default_operations(tmp_path, seed=6, steps=4000)
    assert operations.of_type("rollback") == []
    assert operations.of_type("halt") == []
    assert operations.notices == []
    assert trainer.ops.step == 4000


@pytest.mark.parametrize("kind", ["parameters", "learning_rate"])
def test_with_the_default_rules_a_diverged_update_is_rolled_back_once(
    tmp_path: Path, kind: FaultKind
) -> None:
    operations, trainer = run_with_default_operations(
        tmp_path, seed=6, steps=3000, fault_at=2400, kind=kind
    )
    (rollback,) = operations.of_type("rollback")
    assert isinstance(rollback, Rollback)
    assert 2400 <= rollback.anomaly_step <= 2410
    assert rollback.checkpoint_step == 2000  # the newest healthy checkpoint before it
    assert operations.of_type("halt") == []
    assert (trainer.ops.client.attempt, trainer.ops.step) == (1, 3000)
