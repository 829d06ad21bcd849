"""Stable-Baselines3 integration: the operations layer for an SB3 run in one callback.

    ops_callback = FragranceOpsCallback(TrainerClient("sb3-run-7"), "checkpoints/sb3-run-7")
    PPO("MlpPolicy", env).learn(1_000_000, callback=ops_callback)

Supported: PPO and A2C (on-policy; also on-policy algorithms that log PPO's keys, such as
sb3-contrib's RecurrentPPO and MaskablePPO), SAC, TD3 (with DDPG) and DQN (off-policy); any
other algorithm is refused when ``learn`` starts. One operations *step* is one call of the
algorithm's ``train``: on-policy, the update after a rollout of ``n_steps`` x ``n_envs``
transitions; off-policy, the ``gradient_steps`` after each ``train_freq`` collection. Set
``checkpoints.interval_steps`` and the entropy schedule's ``entropy.steps`` in those units.

The run is announced with ``run_settings`` over the callback's per-algorithm defaults
(``ALGORITHM_RUN_SETTINGS``: A2C's noisy updates are judged against a median baseline with
a patience of 3). After each update the callback reports what SB3's logger recorded for
it, and the mean episode return of SB3's episode buffer as ``reward``:

- PPO: ``loss`` train/loss, ``policy_loss`` train/policy_gradient_loss, ``value_loss``
  train/value_loss, ``entropy`` minus train/entropy_loss;
- A2C: ``loss`` composed from the parts (below), ``policy_loss`` train/policy_loss,
  ``value_loss`` train/value_loss, ``entropy`` minus train/entropy_loss;
- SAC: ``loss`` and ``value_loss`` train/critic_loss, ``policy_loss`` train/actor_loss,
  ``entropy_coef`` train/ent_coef when SAC learns it;
- TD3 and DDPG: ``loss`` and ``value_loss`` train/critic_loss, ``policy_loss``
  train/actor_loss (*);
- DQN: ``loss`` and ``value_loss`` train/loss.

A2C logs only the parts of its loss, so the callback composes it as A2C does:
``policy_loss + ent_coef * entropy_loss + vf_coef * value_loss``. Off-policy, the critic's
(Q) loss is the ``loss``: a diverging critic is what a failing SAC, TD3 or DQN run shows.
(*) TD3 updates its actor every ``policy_delay`` gradient steps; an update without one
reports no ``policy_loss``.

Between updates the callback applies the commands that arrived:

- ``set_entropy_coef`` sets PPO's and A2C's ``ent_coef`` and SAC's fixed coefficient (SAC
  with a number as ``ent_coef``); it is rejected, with the reason, by SAC learning its
  coefficient (``ent_coef="auto"``, the default) and by TD3, DDPG and DQN, which have none;
- ``rollback`` restores the policy (with its target networks), every optimizer and SAC's
  learned entropy coefficient from the named checkpoint (confined, weights only). An
  off-policy replay buffer keeps what the abandoned trajectory collected: transitions, valid
  training data, not the divergence;
- ``retune`` replaces the learning-rate schedule (every optimizer) and PPO's clip-range
  schedule with the proposed constants, and sets the entropy coefficient where
  ``set_entropy_coef`` would; a change an algorithm cannot take rejects the retune;
- ``halt`` stops ``learn``.

SB3's own ``num_timesteps`` keeps counting across a rollback (it is the budget of
environment steps consumed), while the operations step goes back to the checkpoint's.
Needs the ``sb3`` extra (stable-baselines3) and the ``torch`` extra.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from stable_baselines3 import A2C, DQN, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.utils import ConstantSchedule

from producers.torch_ops import TorchRunOps
from producers.trainer import TrainerClient, algorithm_label

SUPPORTED = "PPO, A2C, SAC, TD3, DDPG, DQN and on-policy algorithms logging PPO's keys"

RunSettings = dict[str, bool | int | float | str]
# Per-run overrides the callback announces for an algorithm unless ``run_settings`` sets
# them. A2C's update is one gradient step on n_steps x n_envs transitions (5 by default),
# so its loss moves 3 to 5 times between clean updates: on CartPole the default rules rolled
# back 2 of 3 clean runs of 400 updates, the median baseline with a patience of 3 none of 6
# runs of 1,000 updates, and an injected divergence is still rolled back.
ALGORITHM_RUN_SETTINGS: dict[type[BaseAlgorithm], RunSettings] = {
    A2C: {"anomaly.baseline": "median", "anomaly.patience": 3},
}


class FragranceOpsCallback(BaseCallback):
    """Reports every SB3 update and applies the operations layer's commands between them."""

    def __init__(
        self,
        client: TrainerClient,
        checkpoint_dir: Path | str,
        *,
        run_settings: RunSettings | None = None,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        self.client = client
        self.checkpoint_dir = Path(checkpoint_dir)
        self.run_settings = run_settings or {}
        self._ops: TorchRunOps | None = None
        self._updates_seen = 0

    @property
    def ops(self) -> TorchRunOps:
        if self._ops is None:
            raise RuntimeError("the callback has not started: pass it to model.learn()")
        return self._ops

    def _on_training_start(self) -> None:
        model = self.model
        if self._ops is not None:  # learn() called again to continue the same run
            self._updates_seen = model._n_updates
            return
        optimizers = _optimizers(model)
        clip_range = getattr(model, "clip_range", None)  # PPO and its kin (RecurrentPPO, ...)
        self._ops = TorchRunOps(
            self.client,
            _checkpointed(model),
            optimizers[0],
            self.checkpoint_dir,
            clip_epsilon=float(clip_range(1.0)) if callable(clip_range) else None,
            more_optimizers=optimizers[1:],
            entropy_coef_rejected=_entropy_coef_rejected(model),
        )
        entropy_coef = _entropy_coef(model)
        if entropy_coef is not None:
            self._ops.entropy_coef = entropy_coef
        self._updates_seen = model._n_updates
        settings = {
            **next((s for t, s in ALGORITHM_RUN_SETTINGS.items() if isinstance(model, t)), {}),
            **self.run_settings,
        }
        self.client.announce(settings, algorithm=algorithm_label(type(model).__name__))

    def _on_rollout_start(self) -> None:
        self._report_update()

    def _on_step(self) -> bool:
        return not self.ops.halted

    def _on_training_end(self) -> None:
        self._report_update()
        self.client.flush()

    def _report_update(self) -> None:
        """Report the update SB3 just finished (if any), then apply what arrived."""
        model = self.model
        updates_before = self._updates_seen
        if model._n_updates == updates_before:
            return
        self._updates_seen = model._n_updates
        ops = self.ops
        episodes = [float(info["r"]) for info in model.ep_info_buffer or []]
        retuned, entropy_coef = dict(ops.retuned), ops.entropy_coef
        ops.end_step(
            reward=float(np.mean(episodes)) if episodes else 0.0,
            **update_metrics(model, model.logger.name_to_value, updates_before),
        )
        if ops.entropy_coef != entropy_coef:
            _set_entropy_coef(model, ops.entropy_coef)
        # SB3 resets the optimizers' learning rate from its schedule before every update:
        # a retuned value must replace the schedule to stick.
        if ops.retuned.get("learning_rate") != retuned.get("learning_rate"):
            model.lr_schedule = ConstantSchedule(ops.retuned["learning_rate"])
        if ops.retuned.get("clip_epsilon") != retuned.get("clip_epsilon"):
            model.clip_range = ConstantSchedule(ops.retuned["clip_epsilon"])  # type: ignore[attr-defined]


def update_metrics(
    model: BaseAlgorithm, logged: dict[str, float], updates_before: int
) -> dict[str, float]:
    """The metrics of the update(s) SB3 made since ``updates_before``, from its logger's
    values (keys per algorithm in the module docstring); a missing key reads as NaN."""

    def get(key: str) -> float:
        return float(logged.get(key, math.nan))

    if isinstance(model, A2C):
        policy, value, entropy = (
            get("train/policy_loss"),
            get("train/value_loss"),
            get("train/entropy_loss"),
        )
        loss = policy + float(model.ent_coef) * entropy + float(model.vf_coef) * value
        return {"loss": loss, "policy_loss": policy, "value_loss": value, "entropy": -entropy}
    if isinstance(model, OnPolicyAlgorithm):
        return {
            "loss": get("train/loss"),
            "policy_loss": get("train/policy_gradient_loss"),
            "value_loss": get("train/value_loss"),
            "entropy": -get("train/entropy_loss"),
        }
    if isinstance(model, SAC | TD3):
        critic = get("train/critic_loss")
        metrics = {"loss": critic, "value_loss": critic}
        if isinstance(model, SAC) or _actor_updated(model, updates_before):
            metrics["policy_loss"] = get("train/actor_loss")
        learned = get("train/ent_coef")
        if isinstance(model, SAC) and model.ent_coef_optimizer is not None and learned >= 0:
            metrics["entropy_coef"] = learned  # the coefficient SAC learned, not a schedule's
        return metrics
    if isinstance(model, DQN):
        loss = get("train/loss")
        return {"loss": loss, "value_loss": loss}
    raise TypeError(f"FragranceOpsCallback supports {SUPPORTED}, not {type(model).__name__}")


def _actor_updated(model: TD3, updates_before: int) -> bool:
    """TD3 updates its actor when its gradient-step count reaches a multiple of
    ``policy_delay``; did one of the steps since ``updates_before``?"""
    delay = model.policy_delay
    return model._n_updates // delay > updates_before // delay


def _optimizers(model: BaseAlgorithm) -> list[torch.optim.Optimizer]:
    if isinstance(model, OnPolicyAlgorithm | DQN):
        return [model.policy.optimizer]
    if isinstance(model, SAC | TD3):
        policy = model.policy
        optimizers = [policy.actor.optimizer, policy.critic.optimizer]
        if isinstance(model, SAC) and model.ent_coef_optimizer is not None:
            optimizers.append(model.ent_coef_optimizer)
        return optimizers
    raise TypeError(f"FragranceOpsCallback supports {SUPPORTED}, not {type(model).__name__}")


class _SacState(torch.nn.Module):
    """What a checkpoint of SAC learning its entropy coefficient holds: the policy (with its
    target critic) and the log coefficient, which SAC trains outside the policy. Loading it
    copies into SAC's own tensors, which its optimizers hold."""

    def __init__(self, policy: torch.nn.Module, log_ent_coef: torch.Tensor) -> None:
        super().__init__()
        self.policy = policy
        self.register_buffer("log_ent_coef", log_ent_coef)


def _checkpointed(model: BaseAlgorithm) -> torch.nn.Module:
    if isinstance(model, SAC) and model.log_ent_coef is not None:
        return _SacState(model.policy, model.log_ent_coef)
    return model.policy


def _entropy_coef_rejected(model: BaseAlgorithm) -> str | None:
    """Why the operations layer cannot set this model's entropy coefficient (None: it can)."""
    name = type(model).__name__
    if isinstance(model, SAC) and model.ent_coef_optimizer is not None:
        return f"{name} learns its entropy coefficient (ent_coef='auto')"
    if isinstance(model, TD3 | DQN):
        return f"{name} has no entropy coefficient"
    return None


def _entropy_coef(model: BaseAlgorithm) -> float | None:
    if isinstance(model, OnPolicyAlgorithm):
        return float(model.ent_coef)
    if isinstance(model, SAC) and model.ent_coef_optimizer is None:
        return float(model.ent_coef_tensor.item())
    return None


def _set_entropy_coef(model: BaseAlgorithm, value: float) -> None:
    if isinstance(model, OnPolicyAlgorithm):
        model.ent_coef = value
    elif isinstance(model, SAC) and model.ent_coef_optimizer is None:
        model.ent_coef = value
        model.ent_coef_tensor = torch.tensor(value, device=model.device)
