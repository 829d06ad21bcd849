"""Stable-Baselines3 integration: the operations layer for an SB3 PPO run in one callback.

    ops_callback = FragranceOpsCallback(TrainerClient("sb3-run-7"), "checkpoints/sb3-run-7")
    PPO("MlpPolicy", env).learn(1_000_000, callback=ops_callback)

With SB3, one operations *step* is one PPO update (a rollout of ``n_steps`` x ``n_envs``
transitions, then ``n_epochs`` of minibatches), so set ``checkpoints.interval_steps`` and
the entropy schedule's ``entropy.steps`` in updates. After each update the callback:

- reports the update's losses (``train/loss``, ``train/policy_gradient_loss``,
  ``train/value_loss``, ``train/entropy_loss`` from SB3's logger) and the mean episode
  return of SB3's episode buffer as ``reward``;
- saves a checkpoint on the interval (policy, optimizer, RNG states; atomic, announced);
- applies the commands that arrived: ``set_entropy_coef`` sets ``model.ent_coef``; a
  ``rollback`` restores the policy and optimizer from the named checkpoint (confined,
  weights only); a ``retune`` replaces the learning-rate or clip-range schedule with the
  proposed constant; ``halt`` stops ``learn``.

SB3's own ``num_timesteps`` keeps counting across a rollback (it is the budget of
environment steps consumed), while the operations step goes back to the checkpoint's.
Needs the ``sb3`` extra (stable-baselines3) and the ``torch`` extra.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.utils import ConstantSchedule

from producers.torch_ops import TorchRunOps
from producers.trainer import TrainerClient
from schemas import DEFAULT_ALGORITHM


class FragranceOpsCallback(BaseCallback):
    """Reports every PPO update and applies the operations layer's commands between them."""

    def __init__(
        self,
        client: TrainerClient,
        checkpoint_dir: Path | str,
        *,
        run_settings: dict[str, bool | int | float | str] | None = None,
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

    def _algorithm(self) -> OnPolicyAlgorithm:
        if not isinstance(self.model, OnPolicyAlgorithm):
            raise TypeError("FragranceOpsCallback supports on-policy algorithms (PPO, A2C)")
        return self.model

    def _on_training_start(self) -> None:
        model = self._algorithm()
        if self._ops is not None:  # learn() called again to continue the same run
            self._updates_seen = model._n_updates
            return
        clip_range = getattr(model, "clip_range", None)
        self._ops = TorchRunOps(
            self.client,
            model.policy,
            model.policy.optimizer,
            self.checkpoint_dir,
            clip_epsilon=float(clip_range(1.0)) if callable(clip_range) else None,
        )
        self._ops.entropy_coef = float(model.ent_coef)
        self._updates_seen = model._n_updates
        self.client.announce(self.run_settings, algorithm=algorithm_label(type(model).__name__))

    def _on_rollout_start(self) -> None:
        self._report_update()

    def _on_step(self) -> bool:
        return not self.ops.halted

    def _on_training_end(self) -> None:
        self._report_update()
        self.client.flush()

    def _report_update(self) -> None:
        """Report the update SB3 just finished (if any), then apply what arrived."""
        model = self._algorithm()
        if model._n_updates == self._updates_seen:
            return
        self._updates_seen = model._n_updates
        ops = self.ops
        logged = model.logger.name_to_value
        episodes = [float(info["r"]) for info in model.ep_info_buffer or []]
        retuned = dict(ops.retuned)
        ops.end_step(
            loss=float(logged.get("train/loss", math.nan)),
            reward=float(np.mean(episodes)) if episodes else 0.0,
            policy_loss=float(logged.get("train/policy_gradient_loss", math.nan)),
            value_loss=float(logged.get("train/value_loss", math.nan)),
            entropy=-float(logged.get("train/entropy_loss", math.nan)),
        )
        model.ent_coef = ops.entropy_coef
        # SB3 resets the optimizer's learning rate from its schedule before every update:
        # a retuned value must replace the schedule to stick.
        if ops.retuned.get("learning_rate") != retuned.get("learning_rate"):
            model.lr_schedule = ConstantSchedule(ops.retuned["learning_rate"])
        if ops.retuned.get("clip_epsilon") != retuned.get("clip_epsilon"):
            model.clip_range = ConstantSchedule(ops.retuned["clip_epsilon"])  # type: ignore[attr-defined]


def algorithm_label(class_name: str) -> str:
    """The contract's algorithm name for a model class (``PPO`` -> ``ppo``); a name the
    contract cannot carry (a long or non-ASCII subclass name) falls back to PPO's."""
    label = re.sub(r"[^a-z0-9_-]", "", class_name.lower()).lstrip("0123456789_-")[:32]
    return label or DEFAULT_ALGORITHM
