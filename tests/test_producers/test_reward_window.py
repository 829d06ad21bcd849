"""The trainer's in-process reward window and the SB3 VecEnv wrapper around it: the worker's
rule (rules.reward_window.RewardWindow), fed as the worker feeds it, to the bit."""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3.common.vec_env import DummyVecEnv

from config.settings import Settings, run_overrides
from producers.reward_window import TrainerRewardWindow
from producers.sb3_rewards import WindowNormalizedReward
from rules.reward_window import RewardWindow


def test_capacity_comes_from_the_run_settings_and_its_overrides() -> None:
    assert TrainerRewardWindow().capacity == Settings().reward.window_size == 1000
    assert TrainerRewardWindow(overrides={"reward.window_size": 7}).capacity == 7
    base = run_overrides(Settings(), {"reward.window_size": 50})
    assert TrainerRewardWindow(settings=base).capacity == 50
    assert TrainerRewardWindow(settings=base, overrides={"reward.window_size": 3}).capacity == 3
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        TrainerRewardWindow(overrides={"reward.window_size": 0})


def test_fed_as_the_worker_feeds_the_rule() -> None:
    window = TrainerRewardWindow(overrides={"reward.window_size": 4})
    rule = RewardWindow(4)
    for step, reward in enumerate([1.0, 2.5, -3.0, 7.25, 0.5, 1e-3]):
        assert window.add(reward, step=step) == rule.add(reward, step=step)
    assert window.add(math.nan, step=6) is None  # non-finite: out of the window
    assert window.add(math.inf, step=7) is None
    assert window.add(-math.inf, step=8) is None
    assert window.count == 4
    assert window.add(9.0, step=5) is None  # a replayed step changes nothing
    assert window.add(9.0, step=0, attempt=1) == rule.add(9.0, step=0, attempt=1)
    assert window.add(2.0, step=1, attempt=0) is None  # an older attempt's step: a replay
    resumed = TrainerRewardWindow(attempt=2)
    assert resumed.add(1.0, step=0) == RewardWindow(1000).add(1.0, step=0, attempt=2)


class ScriptedRewards(gym.Env[np.ndarray, int]):
    """Plays a fixed reward sequence across episodes of ``episode_length`` steps."""

    observation_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, rewards: list[float], episode_length: int) -> None:
        self.rewards = rewards
        self.episode_length = episode_length
        self.played = 0
        self.in_episode = 0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.in_episode = 0
        return np.zeros(2, dtype=np.float32), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        reward = self.rewards[self.played]
        self.played += 1
        self.in_episode += 1
        done = self.in_episode == self.episode_length
        return np.full(2, 0.5, dtype=np.float32), reward, done, False, {}


def scripted(seed: int, steps: int) -> list[float]:
    """float32-exact rewards (DummyVecEnv keeps rewards as float32), a few non-finite."""
    rng = np.random.default_rng(seed)
    rewards = [float(np.float32(r)) for r in rng.normal(5.0 * seed, 1.0 + seed, size=steps)]
    for k in range(11, steps, 37):
        rewards[k] = [math.nan, math.inf, -math.inf][k % 3]
    return rewards


@pytest.mark.parametrize("window_size", [1, 16, 1000])
def test_each_step_reward_is_the_shared_window_normalized_reward(window_size: int) -> None:
    n_envs, steps = 3, 300
    rewards = [scripted(seed, steps) for seed in range(1, n_envs + 1)]
    venv = DummyVecEnv(
        [lambda r=r, n=n: ScriptedRewards(r, episode_length=5 + n) for n, r in enumerate(rewards)]
    )
    env = WindowNormalizedReward(venv, overrides={"reward.window_size": window_size})
    env.reset()
    rule = RewardWindow(window_size)
    episodes = 0
    for t in range(steps):
        _, normalized, dones, infos = env.step(np.zeros(n_envs, dtype=np.int64))
        assert normalized.dtype == np.float64
        episodes += int(dones.sum())
        for i in range(n_envs):
            raw = rewards[i][t]
            assert np.float64(infos[i]["raw_reward"]).tobytes() == np.float64(raw).tobytes()
            if math.isfinite(raw):
                expected = rule.add(raw, step=t * n_envs + i)
                assert expected is not None
                assert normalized[i] == expected.normalized_reward, (t, i)
            else:  # kept out of the window, passed on as it came
                assert normalized[i].tobytes() == np.float64(raw).tobytes()
    assert episodes > n_envs  # the window outlives episodes (DummyVecEnv resets the envs)
    finite = sum(math.isfinite(r) for env_rewards in rewards for r in env_rewards)
    assert env.window.count == rule.count == min(window_size, finite)
    assert env.next_step == steps * n_envs
