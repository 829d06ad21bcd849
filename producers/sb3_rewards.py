"""Stable-Baselines3: the run's sliding-window reward normalization on a vectorized env.

    env = WindowNormalizedReward(DummyVecEnv([make_env] * 4))
    PPO("MlpPolicy", env).learn(100_000)

Like ``VecNormalize(norm_obs=False)``, but with the operations layer's rule: each
environment step's reward is replaced by its z-score in the window of the last
``reward.window_size`` rewards (``producers.reward_window.TrainerRewardWindow``, the rule the
worker runs). One window for the whole run, shared by the envs, as the operations guide
(section 1) keeps one window of the last 1,000 steps per run: at each vector step the envs'
rewards enter it in env-index order, transition ``t`` of env ``i`` as step
``start_step + t * n_envs + i``. The raw reward is kept in ``infos[i]["raw_reward"]``.
A non-finite reward stays out of the window (as in the worker) and is passed on unchanged.
Rewards are returned as float64, so each is exactly the window's ``normalized_reward``.
Needs the ``sb3`` extra (stable-baselines3); imports no torch itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper
from stable_baselines3.common.vec_env.base_vec_env import VecEnvObs, VecEnvStepReturn

from config.settings import Settings
from producers.reward_window import TrainerRewardWindow


class WindowNormalizedReward(VecEnvWrapper):
    """Replaces each env's reward by the run window's normalized reward for that step."""

    def __init__(
        self,
        venv: VecEnv,
        *,
        settings: Settings | None = None,
        overrides: dict[str, Any] | None = None,
        start_step: int = 0,
    ) -> None:
        super().__init__(venv)
        self.window = TrainerRewardWindow(settings=settings, overrides=overrides)
        self.next_step = start_step

    def reset(self) -> VecEnvObs:
        return self.venv.reset()

    def step_wait(self) -> VecEnvStepReturn:
        observations, rewards, dones, infos = self.venv.step_wait()
        normalized = np.array(rewards, dtype=np.float64)
        for i, raw in enumerate(rewards):
            raw_reward = float(raw)
            infos[i]["raw_reward"] = raw_reward
            stats = self.window.add(raw_reward, step=self.next_step + i)
            if stats is not None:
                normalized[i] = stats.normalized_reward
        self.next_step += self.num_envs
        return observations, normalized, dones, infos
