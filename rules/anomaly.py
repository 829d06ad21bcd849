"""Anomaly detection on a run's loss and reward (operations guide, section 2).

A metric is anomalous when (``AnomalySettings``):

- its loss or reward is not finite (NaN, +-inf): always, even in warmup;
- loss spike: with a positive baseline ``b``, ``loss >= loss_spike_ratio * b``; with a
  negative one, ``loss >= b + (loss_spike_ratio - 1) * |b|`` (a rise by the same fraction
  of the baseline's size; PPO's total loss can be negative);
- reward drop: with a positive baseline ``b``, ``reward <= reward_drop_ratio * b``; with a
  negative one, ``reward <= b - (1 - reward_drop_ratio) * |b|`` (a fall by the same
  fraction of the baseline's size, so -2 -> -3 is a drop at the default 0.5);
- a baseline of exactly 0 has no scale for a relative rule: no spike or drop against it;
- and, for a spike or a drop, the rise (fall) from the baseline is at least
  ``spread_factor`` times the metric's recent spread (below).

The spread floor is what makes the ratio rules safe for values near zero or of changing
sign. PPO's total loss (policy loss + value loss - entropy bonus) hovers around zero and
changes sign from one minibatch to the next: against a baseline of -0.038, a loss of
0.0016 is "a rise of one baseline's size", so the ratio rules alone roll back clean runs
of the reference trainer (and halt some). The spread is the
exponentially weighted mean absolute difference between consecutive normal values
(``spread_alpha``, bias-corrected, O(1) per metric): the run's own step-to-step noise, not
inflated by a smooth trend. For a loss or reward of one sign and a scale well away from
zero the ratio is the stricter condition and the guide's thresholds keep their meaning (a
loss of 1.0 +- 0.05 that doubles rises by 1.0, about 18 spreads); near zero the floor
decides. ``spread_factor`` 0 gives the ratio rules alone.

Finite values are judged only from ``warmup_steps`` after the run's first metric (or the
restored step of a rollback), once a baseline exists. Anomalous metrics never enter the
baseline nor the spread (neither their loss nor their reward), so a diverging run cannot
drag its own reference along, nor widen its own tolerance.

Baselines (``baseline``), one for loss and one for reward:

- ``previous`` (default, the guide's): the previous normal value. Reacts at once but is
  noisy for PPO, where consecutive updates' loss and reward vary a lot; pair it with
  ``patience`` > 1 or prefer the others on noisy runs.
- ``ema``: exponential moving average (``ema_alpha``). Follows smooth trends (a loss that
  keeps falling, a reward that keeps rising) without being moved much by one step.
- ``median``: median of the last ``median_window`` normal values. Robust to single
  outliers in the reference itself; the best choice when rewards are heavy-tailed.

Acting: ``patience`` consecutive anomalous metrics (a non-finite value acts at once) make a
verdict ``act``, except within ``cooldown_steps`` of a restored checkpoint, and at most once
per attempt: the rollback that follows moves the run to a newer attempt, and until then
more anomalies of the same attempt must not produce a second rollback. An act the caller
could not answer (no checkpoint to roll back to) is ``release``-d: that streak acts no
more on finite values (a non-finite value still acts), a later one may. A rollback must
target a checkpoint saved before ``Verdict.streak_start``, the first anomalous step of the
streak.

Replays: a metric whose ``(attempt, step)`` is not newer than the last one seen, or whose
attempt is older than the last ``reset_to``, returns None and changes nothing. A metric with
a higher attempt than before (a resume, or a rollback whose ack is not yet processed) clears
the baselines and the streak and restarts the warmup at that step; ``reset_to`` (after a
rollback ack) does the same from the restored step and also starts the cooldown.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from config.settings import AnomalySettings
from rules import Position
from rules.state import check_version, position_from_state, position_to_state

_STATE_VERSION = 1


# Not frozen: one is made per metric, and a frozen dataclass's __init__ (object.__setattr__
# per field) cost 1.1 us more for these 13 fields, a third of the detector's own time.
@dataclass(slots=True)
class Verdict:
    """The detector's judgement of one metric."""

    step: int
    attempt: int
    anomalous: bool
    act: bool  # roll back now: patience reached, not in cooldown, not yet acted this attempt
    reason: str  # "" when normal; anomalies joined by "; "
    loss: float
    reward: float
    baseline_loss: float | None  # what the values were compared with (None: no baseline yet)
    baseline_reward: float | None
    streak_start: int | None  # first step of the current anomalous streak
    streak_length: int  # consecutive anomalous metrics, this one included
    warmup: bool  # finite values were not judged
    cooldown: bool  # acting is suppressed after a rollback

    def values(self) -> dict[str, float]:
        """The triggering values and baselines, for a rollback command's ``values``."""
        values = {"loss": self.loss, "reward": self.reward}
        if self.baseline_loss is not None:
            values["baseline_loss"] = self.baseline_loss
        if self.baseline_reward is not None:
            values["baseline_reward"] = self.baseline_reward
        return values


class _Baseline:
    """One metric's reference value: previous, EMA or median of normal values."""

    __slots__ = ("_alpha", "_kind", "_values", "_window")

    def __init__(self, settings: AnomalySettings) -> None:
        self._kind = settings.baseline
        self._alpha = settings.ema_alpha
        self._window = settings.median_window if self._kind == "median" else 1
        self._values: list[float] = []  # previous/ema: at most one value; median: the window

    def value(self) -> float | None:
        if not self._values:
            return None
        if self._kind == "median":
            return float(statistics.median(self._values))
        return self._values[0]

    def add(self, value: float) -> None:
        if self._kind == "ema" and self._values:
            self._values[0] = self._alpha * value + (1.0 - self._alpha) * self._values[0]
            return
        self._values.append(value)
        del self._values[: -self._window]

    def clear(self) -> None:
        self._values.clear()

    def to_state(self) -> dict[str, Any]:
        return {"kind": self._kind, "values": list(self._values)}

    def load(self, state: dict[str, Any]) -> None:
        """Restore values; a baseline of another kind (settings changed) starts afresh."""
        if state["kind"] == self._kind:
            self._values = [float(v) for v in state["values"]][-self._window :]


class _Spread:
    """A metric's recent noise: the exponentially weighted mean of the absolute differences
    between consecutive normal values (bias-corrected: weights normalised by their sum).
    Successive differences measure step-to-step noise and ignore a smooth trend (a loss
    falling steadily is not noisy), and they are what a "previous value" baseline sees."""

    __slots__ = ("_decay", "_last", "_sum", "_weight")

    def __init__(self, alpha: float) -> None:
        self._decay = 1.0 - alpha
        self._last: float | None = None  # the newest normal value
        self._sum = self._weight = 0.0  # weighted differences and their weights

    def value(self) -> float:
        """The spread, 0 until two normal values were seen."""
        return self._sum / self._weight if self._weight else 0.0

    def add(self, value: float) -> None:
        if self._last is not None:
            self._sum = self._decay * self._sum + abs(value - self._last)
            self._weight = self._decay * self._weight + 1.0
        self._last = value

    def clear(self) -> None:
        self._last = None
        self._sum = self._weight = 0.0

    def to_state(self) -> list[float | None]:
        return [self._last, self._sum, self._weight]

    def load(self, state: list[float | None]) -> None:
        last, total, weight = state
        self._last = None if last is None else float(last)
        self._sum, self._weight = float(total or 0.0), float(weight or 0.0)


def _loss_spike(loss: float, baseline: float, ratio: float, floor: float) -> str | None:
    if loss - baseline < floor:
        return None
    if baseline > 0.0 and loss >= ratio * baseline:
        return f"loss spike {loss / baseline:.1f}x baseline {baseline:.3g}"
    if baseline < 0.0 and loss >= baseline + (ratio - 1.0) * abs(baseline):
        return f"loss rise to {loss:.3g} from baseline {baseline:.3g}"
    return None


def _reward_drop(reward: float, baseline: float, ratio: float, floor: float) -> str | None:
    if baseline - reward < floor:
        return None
    if baseline > 0.0 and reward <= ratio * baseline:
        return f"reward drop to {100.0 * reward / baseline:.0f}% of baseline {baseline:.3g}"
    if baseline < 0.0 and reward <= baseline - (1.0 - ratio) * abs(baseline):
        return f"reward drop to {reward:.3g} from baseline {baseline:.3g}"
    return None


class AnomalyDetector:
    """Per run: judges each metric against the run's baselines."""

    __slots__ = (
        "_acted_attempt",
        "_cooldown_until",
        "_last",
        "_loss",
        "_loss_spread",
        "_released_streak",
        "_reset_attempt",
        "_reward",
        "_reward_spread",
        "_settings",
        "_streak_length",
        "_streak_start",
        "_warmup_from",
    )

    def __init__(self, settings: AnomalySettings) -> None:
        self._settings = settings
        self._loss = _Baseline(settings)
        self._reward = _Baseline(settings)
        self._loss_spread = _Spread(settings.spread_alpha)
        self._reward_spread = _Spread(settings.spread_alpha)
        self._last: Position | None = None
        self._reset_attempt: int | None = None  # attempt of the last reset_to
        self._warmup_from: int | None = None
        self._cooldown_until: int | None = None  # acting resumes at this step
        self._acted_attempt: int | None = None
        self._released_streak: Position | None = None  # (attempt, streak start) not to act on
        self._streak_start: int | None = None
        self._streak_length = 0

    @property
    def last_position(self) -> Position | None:
        return self._last

    def in_streak(self, attempt: int, streak_start: int) -> bool:
        """Whether the newest metric judged is still in that anomalous streak."""
        last = self._last
        return last is not None and last[0] == attempt and self._streak_start == streak_start

    def _clear(self, step: int) -> None:
        self._loss.clear()
        self._reward.clear()
        self._loss_spread.clear()
        self._reward_spread.clear()
        self._streak_start = None
        self._streak_length = 0
        self._warmup_from = step

    def observe(self, step: int, loss: float, reward: float, attempt: int = 0) -> Verdict | None:
        """Judge one metric; None for a replayed (duplicate, older or stale-attempt) one."""
        position = (attempt, step)
        last = self._last
        if (last is not None and position <= last) or (
            self._reset_attempt is not None and attempt < self._reset_attempt
        ):
            return None
        if last is None or (attempt > last[0] and attempt != self._reset_attempt):
            self._clear(step)  # a run's start, or a new attempt not announced by reset_to
        self._last = position
        settings = self._settings
        assert self._warmup_from is not None
        warmup = step < self._warmup_from + settings.warmup_steps
        cooldown = self._cooldown_until is not None and step < self._cooldown_until
        baseline_loss, baseline_reward = self._loss.value(), self._reward.value()

        reasons: list[str] = []
        non_finite = False
        for name, value in (("loss", loss), ("reward", reward)):
            if not math.isfinite(value):
                reasons.append(f"non-finite {name}")
                non_finite = True
        if not warmup:
            factor = settings.spread_factor
            if baseline_loss is not None and math.isfinite(loss):
                floor = factor * self._loss_spread.value()
                spike = _loss_spike(loss, baseline_loss, settings.loss_spike_ratio, floor)
                if spike:
                    reasons.append(spike)
            if baseline_reward is not None and math.isfinite(reward):
                floor = factor * self._reward_spread.value()
                drop = _reward_drop(reward, baseline_reward, settings.reward_drop_ratio, floor)
                if drop:
                    reasons.append(drop)

        act = False
        if reasons:
            if self._streak_start is None:
                self._streak_start = step
            self._streak_length += 1
            # A released streak acts no more on finite values; a non-finite one always may.
            released = self._released_streak == (attempt, self._streak_start)
            act = (
                (non_finite or self._streak_length >= settings.patience)
                and not cooldown
                and self._acted_attempt != attempt
                and (non_finite or not released)
            )
            if act:
                self._acted_attempt = attempt
        else:
            self._streak_start, self._streak_length = None, 0
            self._loss.add(loss)
            self._reward.add(reward)
            self._loss_spread.add(loss)
            self._reward_spread.add(reward)
        return Verdict(
            step=step,
            attempt=attempt,
            anomalous=bool(reasons),
            act=act,
            reason="; ".join(reasons),
            loss=loss,
            reward=reward,
            baseline_loss=baseline_loss,
            baseline_reward=baseline_reward,
            streak_start=self._streak_start,
            streak_length=self._streak_length,
            warmup=warmup,
            cooldown=cooldown,
        )

    def release(self, attempt: int, streak_start: int) -> None:
        """The act for this streak was not answered with a rollback (there was nothing to roll
        back to): the streak acts no more on finite values (a non-finite one still acts),
        but a later one of the same attempt may."""
        if self._acted_attempt == attempt:
            self._acted_attempt = None
        self._released_streak = (attempt, streak_start)

    def resume(self) -> None:
        """A person cleared the run's halt: whatever acted or was let go may act again."""
        self._acted_attempt = None
        self._released_streak = None

    def reset_to(self, step: int, attempt: int) -> bool:
        """A rollback to ``step`` was applied; the trainer continues under ``attempt``.

        Clears baselines and streak, and starts warmup and cooldown at ``step``. Returns False
        (and changes nothing) for a replayed or stale ack: ``attempt`` not newer than the last
        reset's, or older than the newest attempt seen in metrics.
        """
        if (self._reset_attempt is not None and attempt <= self._reset_attempt) or (
            self._last is not None and attempt < self._last[0]
        ):
            return False
        self._reset_attempt = attempt
        self._clear(step)
        self._cooldown_until = step + self._settings.cooldown_steps
        return True

    def to_state(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "last": position_to_state(self._last),
            "reset_attempt": self._reset_attempt,
            "warmup_from": self._warmup_from,
            "cooldown_until": self._cooldown_until,
            "acted_attempt": self._acted_attempt,
            "released_streak": position_to_state(self._released_streak),
            "streak_start": self._streak_start,
            "streak_length": self._streak_length,
            "loss": self._loss.to_state(),
            "reward": self._reward.to_state(),
            "loss_spread": self._loss_spread.to_state(),
            "reward_spread": self._reward_spread.to_state(),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], settings: AnomalySettings) -> AnomalyDetector:
        """A stored state (``to_state``); one without the released streak or the spreads
        reads as having none (the spreads form again from the next normal values)."""
        check_version(state, _STATE_VERSION, "anomaly detector")
        detector = cls(settings)
        detector._last = position_from_state(state["last"])
        detector._reset_attempt = state["reset_attempt"]
        detector._warmup_from = state["warmup_from"]
        detector._cooldown_until = state["cooldown_until"]
        detector._acted_attempt = state["acted_attempt"]
        detector._released_streak = position_from_state(state.get("released_streak"))
        detector._streak_start = state["streak_start"]
        detector._streak_length = int(state["streak_length"])
        detector._loss.load(state["loss"])
        detector._reward.load(state["reward"])
        if "loss_spread" in state:
            detector._loss_spread.load(state["loss_spread"])
            detector._reward_spread.load(state["reward_spread"])
        return detector
