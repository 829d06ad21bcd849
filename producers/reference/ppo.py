"""The guide's PPO trainer, wired to the operations layer through ``TorchRunOps``.

The loop (operations guide, "Integration"): collect a rollout of ``rollout_steps`` (2,048)
environment steps, train ``epochs`` (10) epochs over it in minibatches of ``batch_size``
(64), report policy loss and average reward, apply what the operations layer sends.

One operations *step* is one minibatch update (one optimizer step): 2,048 / 64 x 10 = 320
steps per rollout, so the guide's checkpoint interval (500 steps) and entropy schedule
(10,000 steps) fall within minutes on a CPU. Each step reports the minibatch's losses and,
as ``reward``, the mean return of the episodes its minibatch learns from
(``episode_reward``). After a rollback the trainer drops the
rest of the rollout (collected by the policy it just abandoned) and collects a fresh one
with the restored policy.

``inject_fault(step)`` corrupts the parameters once at that step (attempt 0 only), or with
``kind="learning_rate"`` makes that one update with a learning rate of 1.0, so tests and
the demo can show a real divergence being detected and rolled back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from producers.reference.env import FragranceFormulaEnv
from producers.torch_ops import TorchRunOps
from producers.trainer import TrainerClient

FaultKind = Literal["parameters", "learning_rate"]

REFERENCE_RUN_SETTINGS: dict[str, bool | int | float | str] = {
    "anomaly.baseline": "median",
    "anomaly.patience": 3,
}
"""Announced with the run, an example of per-run overrides: minibatch losses are noisy, so
judge against the median of recent steps and act on 3 anomalous steps in a row (a real
divergence lasts; one odd minibatch does not). The defaults alone (the spread floor in
``rules/anomaly.py``) also leave clean runs untouched
(``tests/test_producers/test_reference.py``)."""


@dataclass(frozen=True, slots=True)
class PPOConfig:
    """The guide's numbers, plus the usual PPO constants."""

    state_dim: int = 40
    action_dim: int = 60
    rollout_steps: int = 2048
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 1e-3
    clip_epsilon: float = 0.2
    gamma: float = 0.99
    gae_lambda: float = 0.95
    value_coef: float = 0.5
    max_grad_norm: float = 0.5
    hidden: int = 64


class ActorCritic(nn.Module):
    def __init__(self, config: PPOConfig) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(config.state_dim, config.hidden),
            nn.Tanh(),
            nn.Linear(config.hidden, config.hidden),
            nn.Tanh(),
        )
        self.policy = nn.Linear(config.hidden, config.action_dim)
        self.value = nn.Linear(config.hidden, 1)

    def forward(self, observations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(observations)
        return self.policy(features), self.value(features).squeeze(-1)


@dataclass(frozen=True, slots=True)
class Rollout:
    observations: torch.Tensor
    actions: torch.Tensor
    log_probs: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    # Per transition, the return of the episode it belongs to (NaN: still running when the
    # rollout ended): what an update reports as its reward (``episode_reward``).
    episode_returns: torch.Tensor
    mean_episode_return: float


@dataclass(frozen=True, slots=True)
class StepReport:
    """What one minibatch update reported (handed to ``on_step`` observers)."""

    step: int
    attempt: int
    loss: float
    policy_loss: float
    value_loss: float
    entropy: float
    reward: float  # the mean return of the episodes the minibatch learns from
    entropy_coef: float


class ReferencePPOTrainer:
    """PPO on ``FragranceFormulaEnv`` (or any discrete-action Gymnasium env of the same shape)."""

    def __init__(
        self,
        client: TrainerClient,
        checkpoint_dir: Path | str,
        *,
        config: PPOConfig | None = None,
        seed: int = 0,
        env: gym.Env[NDArray[np.float32], np.int64] | None = None,
        run_settings: dict[str, bool | int | float | str] | None = None,
    ) -> None:
        self.run_settings = REFERENCE_RUN_SETTINGS if run_settings is None else run_settings
        self.config = config if config is not None else PPOConfig()
        torch.manual_seed(seed)
        np.random.seed(seed)
        self.env = env if env is not None else FragranceFormulaEnv()
        self.model = ActorCritic(self.config)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.config.learning_rate)
        self.ops = TorchRunOps(
            client,
            self.model,
            self.optimizer,
            checkpoint_dir,
            clip_epsilon=self.config.clip_epsilon,
        )
        self._observation, _ = self.env.reset(seed=seed)
        self._episode_return = 0.0
        self._faults: dict[int, FaultKind] = {}

    def inject_fault(self, step: int, kind: FaultKind = "parameters") -> None:
        """Diverge once at the update of ``step``: its parameters corrupted just before it,
        or the update itself made with a learning rate of 1.0."""
        self._faults[step] = kind

    def train(self, total_steps: int, on_step: Callable[[StepReport], None] | None = None) -> None:
        """Announce the run, then train until ``ops.step`` reaches ``total_steps`` or a halt."""
        self.ops.client.announce(self.run_settings)
        while self.ops.step < total_steps and not self.ops.halted:
            self._update(self.collect_rollout(), total_steps, on_step)
        self.ops.client.flush()

    @torch.no_grad()
    def collect_rollout(self) -> Rollout:
        config = self.config
        size = config.rollout_steps
        observations = torch.zeros(size, config.state_dim)
        actions = torch.zeros(size, dtype=torch.long)
        log_probs = torch.zeros(size)
        values = torch.zeros(size + 1)
        rewards = torch.zeros(size)
        dones = torch.zeros(size)
        step_returns = torch.full((size,), math.nan)
        episode_start = 0  # where the running episode's transitions begin in this rollout
        episode_returns: list[float] = []
        for index in range(size):
            observation = torch.as_tensor(self._observation)
            logits, value = self.model(observation)
            action = torch.multinomial(torch.softmax(logits, dim=-1), 1)[0]
            observations[index], actions[index] = observation, action
            log_probs[index] = torch.log_softmax(logits, dim=-1)[action]
            values[index] = value
            self._observation, reward, terminated, truncated, _ = self.env.step(
                np.int64(action.item())
            )
            rewards[index] = float(reward)
            self._episode_return += float(reward)
            if terminated or truncated:
                dones[index] = 1.0
                step_returns[episode_start : index + 1] = self._episode_return
                episode_start = index + 1
                episode_returns.append(self._episode_return)
                self._episode_return = 0.0
                self._observation, _ = self.env.reset()
        values[size] = self.model(torch.as_tensor(self._observation))[1]
        advantages = torch.zeros(size)
        gae = torch.tensor(0.0)
        for index in reversed(range(size)):  # generalized advantage estimation
            alive = 1.0 - dones[index]
            delta = rewards[index] + config.gamma * values[index + 1] * alive - values[index]
            gae = delta + config.gamma * config.gae_lambda * alive * gae
            advantages[index] = gae
        return Rollout(
            observations=observations,
            actions=actions,
            log_probs=log_probs,
            advantages=advantages,
            returns=advantages + values[:size],
            episode_returns=step_returns,
            mean_episode_return=float(np.mean(episode_returns)) if episode_returns else 0.0,
        )

    def _update(
        self, rollout: Rollout, total_steps: int, on_step: Callable[[StepReport], None] | None
    ) -> None:
        attempt = self.ops.client.attempt
        for _epoch in range(self.config.epochs):
            order = torch.randperm(self.config.rollout_steps)
            for batch in torch.split(order, self.config.batch_size):
                if self.ops.step >= total_steps or self.ops.halted:
                    return
                report = self._minibatch(rollout, batch)
                if on_step is not None:
                    on_step(report)
                if self.ops.client.attempt != attempt:
                    return  # rolled back: this rollout came from the abandoned policy

    def _minibatch(self, rollout: Rollout, batch: torch.Tensor) -> StepReport:
        ops, config = self.ops, self.config
        step = ops.step
        fault = self._faults.pop(step, None)
        if fault == "parameters":
            with torch.no_grad():  # the injected fault: a corrupted update
                for parameter in self.model.parameters():
                    parameter.add_(torch.randn_like(parameter) * 3.0)
        logits, values = self.model(rollout.observations[batch])
        log_policy = torch.log_softmax(logits, dim=-1)
        log_prob = log_policy.gather(1, rollout.actions[batch].unsqueeze(1)).squeeze(1)
        ratio = torch.exp(log_prob - rollout.log_probs[batch])
        advantages = rollout.advantages[batch]
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        clip = ops.clip_epsilon if ops.clip_epsilon is not None else config.clip_epsilon
        policy_loss = -torch.min(
            ratio * advantages, torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * advantages
        ).mean()
        value_loss = (values - rollout.returns[batch]).pow(2).mean()
        entropy = -(log_policy.exp() * log_policy).sum(dim=-1).mean()
        loss = policy_loss + config.value_coef * value_loss - ops.entropy_coef * entropy
        self.optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
        if fault == "learning_rate":  # the injected fault: one update at lr 1.0
            rates = [group["lr"] for group in self.optimizer.param_groups]
            for group in self.optimizer.param_groups:
                group["lr"] = 1.0
            self.optimizer.step()
            for group, rate in zip(self.optimizer.param_groups, rates, strict=True):
                group["lr"] = rate
        else:
            self.optimizer.step()
        report = StepReport(
            step=step,
            attempt=ops.client.attempt,
            loss=loss.item(),
            policy_loss=policy_loss.item(),
            value_loss=value_loss.item(),
            entropy=entropy.item(),
            reward=episode_reward(rollout, batch),
            entropy_coef=ops.entropy_coef,
        )
        ops.end_step(
            loss=report.loss,
            reward=report.reward,
            policy_loss=report.policy_loss,
            value_loss=report.value_loss,
            entropy=report.entropy,
        )
        return report


def episode_reward(rollout: Rollout, batch: torch.Tensor) -> float:
    """An update's reward: the mean return of the episodes its minibatch learns from, each
    weighted by its transitions there (the rollout's mean when none of them ended yet).

    Per update, not per rollout: the rollout's mean repeated for its 320 updates left a
    1,000-step reward window about three distinct values. A minibatch draws 64 of the
    rollout's 2,048 transitions, from some 50 of its 170 episodes: an estimate of the
    policy's return that varies from update to update by about an eighth of the episodes'
    own spread, so a policy that got worse shows at its next rollout as before.
    """
    returns = rollout.episode_returns[batch]
    ended = returns[~torch.isnan(returns)]
    return float(ended.mean()) if len(ended) else rollout.mean_episode_return
