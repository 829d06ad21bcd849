"""The entropy coefficient schedule and when to send it (operations guide, section 1).

Schedule (``EntropySettings``): from ``start`` to ``end`` over ``steps`` steps, then held at
``end``. With ``p = min(step, steps) / steps``:

- cosine (default): ``end + (start - end) * 0.5 * (1 + cos(pi * p))``
- linear: ``start + (end - start) * p``

Emission (``EntropyEmitter``, one per run): the trainer is sent a ``set_entropy_coef``
command at a run's first metric, whenever a metric carries a higher ``attempt`` (a resume
or a rollback, so a restored trainer gets the right value at once), and otherwise only
when the value moved by more than ``emit_tolerance_rel`` of the last value sent, or first reached
the schedule's end value (sent exactly). A metric
whose ``(attempt, step)`` is not newer than the last one seen is a replay: nothing is sent
and nothing changes.

Retune composition: a retune that sets the coefficient to ``X`` at step ``s`` rescales the
schedule instead of being overwritten by it. ``X`` is first clamped to
``[min_coef, max_coef]``; the scale becomes ``X / schedule(s)`` and every later value is
``clamp(schedule(step) * scale)``, so the decay goes on from the retuned level with the
same shape. When ``schedule(s)`` is 0 no scale can express ``X``, and the coefficient is
pinned at ``X`` until the next retune. The retuned value is sent at once (``apply_retune``
returns it) and becomes the reference for the tolerance. A retune survives rollbacks and
resumes (it reflects user feedback, not the diverged trajectory). Retunes are ordered by
``(attempt, step)``: one not newer than the last applied retune is a replay and is ignored,
so two retunes must name different positions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from config.settings import EntropySettings
from rules import Position
from rules.state import check_version, position_from_state, position_to_state

_STATE_VERSION = 1


@dataclass(frozen=True, slots=True)
class EntropySchedule:
    """The closed-form decay curve."""

    start: float
    end: float
    steps: int
    kind: Literal["cosine", "linear"] = "cosine"

    @classmethod
    def from_settings(cls, settings: EntropySettings) -> EntropySchedule:
        return cls(start=settings.start, end=settings.end, steps=settings.steps, kind=settings.kind)

    def value(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        if step >= self.steps:
            return self.end
        # The closed forms above, as a weighted mean of start and end: equal to them within
        # a few ulps, and exactly ``start`` at step 0 and ``end`` at ``steps``.
        if self.kind == "cosine":
            weight = 0.5 * (1.0 + math.cos(math.pi * step / self.steps))
        else:
            weight = 1.0 - step / self.steps
        return weight * self.start + (1.0 - weight) * self.end


class EntropyEmitter:
    """Per run: which ``set_entropy_coef`` values to send, given the run's metrics."""

    __slots__ = (
        "_last",
        "_last_retune",
        "_max",
        "_min",
        "_pinned",
        "_scale",
        "_sent",
        "_tolerance",
        "schedule",
    )

    def __init__(self, settings: EntropySettings) -> None:
        self.schedule = EntropySchedule.from_settings(settings)
        self._tolerance = settings.emit_tolerance_rel
        self._min = settings.min_coef
        self._max = settings.max_coef
        self._last: Position | None = None  # newest metric seen
        self._sent: float | None = None  # last value sent
        self._scale = 1.0
        self._pinned: float | None = None
        self._last_retune: Position | None = None

    @property
    def last_position(self) -> Position | None:
        return self._last

    @property
    def last_sent(self) -> float | None:
        return self._sent

    @property
    def scale(self) -> float:
        return self._scale

    def _clamp(self, value: float) -> float:
        return min(max(value, self._min), self._max)

    def value(self, step: int) -> float:
        """The coefficient for ``step``: the schedule composed with any retune."""
        if self._pinned is not None:
            return self._pinned
        return self._clamp(self.schedule.value(step) * self._scale)

    def observe(self, step: int, attempt: int = 0) -> float | None:
        """A metric arrived: the coefficient to send now, or None."""
        position = (attempt, step)
        last = self._last
        if last is not None and position <= last:
            return None
        self._last = position
        value = self.value(step)
        sent = self._sent
        if (
            last is None
            or sent is None
            or attempt > last[0]
            or abs(value - sent) > self._tolerance * abs(sent)
            # The schedule's end is sent exactly, however small the last move.
            or (step >= self.schedule.steps and value != sent)
        ):
            self._sent = value
            return value
        return None

    def apply_retune(self, new_value: float, step: int, attempt: int | None = None) -> float | None:
        """Compose a retuned coefficient with the schedule; the value to send now, or None.

        ``attempt`` defaults to the newest attempt seen in metrics.
        """
        if not math.isfinite(new_value) or new_value < 0:
            raise ValueError(f"entropy_coef must be finite and non-negative, got {new_value!r}")
        if attempt is None:
            attempt = self._last[0] if self._last is not None else 0
        position = (attempt, step)
        if self._last_retune is not None and position <= self._last_retune:
            return None
        self._last_retune = position
        target = self._clamp(new_value)
        scheduled = self.schedule.value(step)
        if scheduled > 0.0:
            self._scale, self._pinned = target / scheduled, None
        else:
            self._scale, self._pinned = 1.0, target
        self._sent = self.value(step)
        return self._sent

    def to_state(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "last": position_to_state(self._last),
            "sent": self._sent,
            "scale": self._scale,
            "pinned": self._pinned,
            "last_retune": position_to_state(self._last_retune),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], settings: EntropySettings) -> EntropyEmitter:
        check_version(state, _STATE_VERSION, "entropy emitter")
        emitter = cls(settings)
        emitter._last = position_from_state(state["last"])
        emitter._sent = _optional_float(state["sent"])
        emitter._scale = float(state["scale"])
        emitter._pinned = _optional_float(state["pinned"])
        emitter._last_retune = position_from_state(state["last_retune"])
        return emitter


def _optional_float(value: float | None) -> float | None:
    return None if value is None else float(value)
