"""Small Stable-Baselines3 models for the callback's tests, and an injected divergence."""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from stable_baselines3 import A2C, DQN, PPO, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback

from producers.sb3 import FragranceOpsCallback
from producers.torch_ops import TorchRunOps

ALGORITHMS = ("ppo", "a2c", "sac", "td3", "dqn")


def small_model(name: str, seed: int = 0, **options: Any) -> BaseAlgorithm:
    """A small, fast model of algorithm ``name``: CartPole for the discrete-action ones,
    Pendulum for SAC and TD3; training starts after 100 transitions off-policy."""
    net = {"net_arch": [32, 32]}  # a fresh dict per model: SB3 adds its own keys to it
    if name == "ppo":
        return PPO(
            "MlpPolicy", "CartPole-v1", n_steps=64, batch_size=32, n_epochs=2, seed=seed,
            policy_kwargs=net, **options,
        )  # fmt: skip
    if name == "a2c":
        return A2C("MlpPolicy", "CartPole-v1", seed=seed, policy_kwargs=net, **options)
    off_policy = {"learning_starts": 100, "seed": seed, "policy_kwargs": net, **options}
    if name == "dqn":
        return DQN("MlpPolicy", "CartPole-v1", **off_policy)
    algorithm = {"sac": SAC, "td3": TD3}[name]
    return algorithm("MlpPolicy", "Pendulum-v1", batch_size=64, **off_policy)


def restorable_state(ops: TorchRunOps) -> dict[str, Any]:
    """What a rollback restores, in a checkpoint's layout: model and optimizers."""
    return copy.deepcopy(
        {
            "model": ops.model.state_dict(),
            "optimizer": ops.optimizer.state_dict(),
            "more_optimizers": [optimizer.state_dict() for optimizer in ops.more_optimizers],
        }
    )


class Divergence(BaseCallback):
    """Corrupts the policy's parameters (adds normal noise of std 10) once, after the
    operations step ``at_step`` was reported; pass it after the operations callback in a
    ``CallbackList``. ``restored`` is what the rollback that followed restored
    (``restorable_state``), taken before training went on from it."""

    def __init__(
        self,
        ops_callback: FragranceOpsCallback,
        at_step: int,
        pace_s: float = 0.0,
        stop_after_step: int | None = None,
    ):
        super().__init__()
        self.ops_callback = ops_callback
        self.at_step = at_step
        self.pace_s = pace_s  # per environment step once injected: lets a worker catch up
        # Restored and past this operations step: learn() stops (its budget is then only a
        # bound on how long the worker may take to answer, not a deadline it must meet).
        self.stop_after_step = stop_after_step
        self.injected = False
        self.restored: dict[str, Any] | None = None

    def _on_rollout_start(self) -> None:
        ops = self.ops_callback.ops
        if not self.injected and ops.step > self.at_step:
            self.injected = True
            with torch.no_grad():
                for parameter in self.model.policy.parameters():
                    parameter.add_(10.0 * torch.randn_like(parameter))
        elif self.injected and self.restored is None and ops.client.attempt == 1:
            self.restored = restorable_state(ops)

    def _on_step(self) -> bool:
        if self.injected and self.restored is None and self.pace_s:
            time.sleep(self.pace_s)
        stop = self.stop_after_step
        return not (
            self.restored is not None and stop is not None and self.ops_callback.ops.step > stop
        )
