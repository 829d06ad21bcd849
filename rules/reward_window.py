"""Reward normalization over a sliding window (operations guide, section 1).

The window's sums are exact (``rules.exact_sums``), so an update is O(1), nothing drifts
however long a run lasts, and the mean and the population standard deviation (ddof=0, as
numpy's default) are the correctly rounded values of the exact window statistics. The same
window therefore gives bit-identical statistics whether or not the worker crashed and
restored it in between.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from struct import Struct

from rules.exact_sums import ExactSums

_HEADER = Struct("<I I I q q")  # version, capacity, count, last attempt, last step
_FORMAT_VERSION = 1
_NO_POSITION = (-1, -1)


@dataclass(frozen=True, slots=True)
class WindowStats:
    """The window after one reward entered it."""

    reward: float
    normalized_reward: float
    mean: float
    std: float
    count: int


def _z_score(reward: float, mean: float, std: float) -> float:
    """(reward - mean) / std, or 0 for a constant window; finite, as |z| <= sqrt(n - 1)."""
    if std == 0.0:
        return 0.0
    difference = reward - mean
    if math.isinf(difference):  # rewards near ±1.8e308: only the difference overflows
        return (reward / 2 - mean / 2) / (std / 2)
    return difference / std


class RewardWindow:
    """The last ``capacity`` rewards of one run, deduplicated by (attempt, step)."""

    __slots__ = ("_capacity", "_head", "_last", "_ring", "_sums")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("window capacity must be at least 1")
        self._capacity = capacity
        self._ring = array("d")  # grows to capacity, then wraps at _head
        self._head = 0
        self._sums = ExactSums()  # of the rewards in the ring
        self._last = _NO_POSITION

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def count(self) -> int:
        return self._sums.count

    @property
    def mean(self) -> float | None:
        """The mean of the rewards in the window; None when it is empty."""
        return self._sums.mean() if self._sums.count else None

    @property
    def std(self) -> float | None:
        """Their population standard deviation (ddof=0); None when the window is empty."""
        return self._sums.population_std() if self._sums.count else None

    @property
    def last_position(self) -> tuple[int, int]:
        """(attempt, step) of the newest reward, or (-1, -1) when empty."""
        return self._last

    def rewards(self) -> list[float]:
        """The rewards in the window, oldest first."""
        return list(self._ring[self._head :]) + list(self._ring[: self._head])

    def has_seen(self, attempt: int, step: int) -> bool:
        """True when (attempt, step) is not newer than the newest reward: a duplicate."""
        return (attempt, step) <= self._last

    def add(self, reward: float, *, step: int, attempt: int = 0) -> WindowStats | None:
        """Add a finite reward; return the new statistics, or None for a duplicate step."""
        if not math.isfinite(reward):
            raise ValueError(f"reward must be finite, got {reward!r}")
        if self.has_seen(attempt, step):
            return None
        sums = self._sums
        sums.add(reward)
        if sums.count <= self._capacity:
            self._ring.append(reward)
        else:
            sums.remove(self._ring[self._head])
            self._ring[self._head] = reward
            self._head = (self._head + 1) % self._capacity
        self._last = (attempt, step)
        mean, std = sums.mean(), sums.population_std()
        return WindowStats(
            reward=reward,
            normalized_reward=_z_score(reward, mean, std),
            mean=mean,
            std=std,
            count=sums.count,
        )

    def resize(self, capacity: int) -> None:
        """Change the capacity, keeping the newest rewards that fit."""
        if capacity == self._capacity:
            return
        if capacity < 1:
            raise ValueError("window capacity must be at least 1")
        kept = self.rewards()[-capacity:]
        self._capacity = capacity
        self._load(kept)

    def _load(self, rewards: list[float]) -> None:
        self._ring = array("d", rewards)
        self._head = 0
        self._sums = ExactSums()
        for reward in rewards:
            self._sums.add(reward)

    # State: a compact binary snapshot, so a changelog record per run per batch stays small.
    def to_bytes(self) -> bytes:
        header = _HEADER.pack(_FORMAT_VERSION, self._capacity, self._sums.count, *self._last)
        ring, head = self._ring, self._head
        return header + ring[head:].tobytes() + ring[:head].tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> RewardWindow:
        version, capacity, count, attempt, step = _HEADER.unpack_from(data)
        if version != _FORMAT_VERSION:
            raise ValueError(f"unknown reward window format {version}")
        rewards = array("d")
        rewards.frombytes(data[_HEADER.size :])
        if len(rewards) != count:
            raise ValueError("corrupt reward window snapshot")
        window = cls(capacity)
        window._load(list(rewards))
        window._last = (attempt, step)
        return window
