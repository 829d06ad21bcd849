"""The run's reward window in the trainer's process, for an update that needs the normalized
reward at once (``TrainerClient(receive_reward_stats=True)`` gives the worker's, later).

    window = TrainerRewardWindow(overrides={"reward.window_size": 500})
    stats = window.add(reward, step=step)  # None for a non-finite or a replayed step

It is the worker's rule (``rules.reward_window.RewardWindow``), sized from the run's settings
and fed as the worker feeds it: non-finite rewards stay out of the window, a step that is not
newer than the newest (attempt, step) is a replay and changes nothing. Fed the run's metrics,
it returns the statistics the worker publishes on ``trainer.reward-stats``, to the bit.
"""

from __future__ import annotations

import math
from typing import Any

from config.settings import Settings, run_overrides
from rules.reward_window import RewardWindow, WindowStats

__all__ = ["TrainerRewardWindow", "WindowStats"]


class TrainerRewardWindow:
    """One run's sliding reward window, sized by ``reward.window_size`` of the run's settings
    (``settings`` or ``Settings()``, with the run's ``overrides`` applied as the worker does)."""

    __slots__ = ("_window", "attempt")

    def __init__(
        self,
        *,
        settings: Settings | None = None,
        overrides: dict[str, Any] | None = None,
        attempt: int = 0,
    ) -> None:
        base = settings if settings is not None else Settings()
        resolved = run_overrides(base, overrides) if overrides else base
        self._window = RewardWindow(resolved.reward.window_size)
        self.attempt = attempt

    @property
    def capacity(self) -> int:
        return self._window.capacity

    @property
    def count(self) -> int:
        return self._window.count

    def add(self, reward: float, *, step: int, attempt: int | None = None) -> WindowStats | None:
        """The window's statistics after ``reward`` (the worker's record for this step), or
        None when the worker would publish none: a non-finite reward, or a replayed step."""
        reward = float(reward)
        if not math.isfinite(reward):
            return None
        if attempt is None:
            attempt = self.attempt
        return self._window.add(reward, step=step, attempt=attempt)
