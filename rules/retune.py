"""Feedback retuning: windows of user ratings become hyperparameter proposals (guide, section 4).

Per target run (a rating's ``run_id``, or ``default_target`` without one; ``retune_target``),
counted ratings (1 to 5) are collected in windows, and each closing window is judged by the
guide's three rules (``RetuneSettings``):

- ``low_mean``: mean < ``low_mean_threshold`` (3.0) raises ``entropy_coef`` (more exploration);
- ``high_variance``: sample variance (n - 1) > ``high_variance_threshold`` (1.5) lowers
  ``learning_rate`` (stability);
- ``high_mean``: mean >= ``high_mean_threshold`` (4.0) lowers ``clip_epsilon`` (exploitation).

Evidence, not noise: each rule compares a two-sided ``confidence`` interval with its
threshold. It *fires* when the interval lies wholly on the rule's side (``low_mean``: upper
bound < 3.0; ``high_variance``: lower bound > 1.5; ``high_mean``: lower bound >= 4.0), is *not
fired* when the interval lies wholly on the other side, and is *undecided* when the interval
straddles the threshold. Undecided rules propose nothing; the verdict names them.

The guide's literal rule, as an option: with ``confidence_gate`` off, each rule compares the
window's point mean or sample variance with its threshold, exactly as the guide states
(``mean < 3.0``, ``variance > 1.5``, ``mean >= 4.0``). Every rule is then decided as soon as
the window has two ratings, so a window closes on evidence at ``min_window`` (the guide's
100) and the verdict carries no confidence or intervals (``None``).

Intervals, without scipy (``statistics.NormalDist`` gives the normal quantile ``z``):

- mean: Student's t interval ``mean +- t(df) * s / sqrt(n)``, df = n - 1. ``t_quantile`` uses
  the closed forms for df 1 and 2 and the Cornish-Fisher expansion in ``1/df`` to the fourth
  order (Abramowitz & Stegun 26.7.5) from df 3 on: relative error about 1e-3 at df 3 and
  below 1e-4 from df 5 for 95% intervals.
- variance: the chi-square interval ``((n-1) s^2 / chi2(1 - a/2), (n-1) s^2 / chi2(a/2))``.
  ``chi2_quantile`` uses the closed forms for df 1 and 2 and the Wilson-Hilferty
  approximation ``df * (1 - 2/(9 df) + z sqrt(2/(9 df)))^3`` from df 3 on: relative error
  below 1e-3 from df 30 (where every judged window is, by default) and below 1e-2 from df 10
  in the lower tail; below that the lower-tail quantile is too small, which only widens
  the upper bound (more "undecided", never a spurious firing).

Both intervals assume roughly normal ratings. Ratings are bounded, so the true mean lies in
[1, 5] and the true variance in [0, 4]; the intervals are clipped to those ranges (which
changes no decision). For ratings spread towards 1 and 5, the ones that make variance high,
the chi-square interval is wider than it needs to be (light tails): conservative.

Windows. A window opens at its first counted rating (the worker's clock ``now`` at its
arrival) and closes, yielding a ``WindowVerdict``:

- on *evidence*: it has at least ``min_window`` counted ratings and every rule is decided
  (fired or not fired), checked after each counted rating;
- at ``max_window`` counted ratings, decided or not;
- on *timeout*: ``window_timeout_s`` after it opened (``on_tick(now)``, or the next rating's
  arrival, which is then judged in a new window). With at least ``timeout_min_ratings``
  counted ratings it is judged by the same interval rules (with few ratings the intervals
  are wide, so usually nothing fires: the honest answer); with fewer it proposes nothing
  and every rule is undecided ("too few ratings"), because with a handful of ratings a
  t interval can collapse (five ratings of 5 are a zero-width interval at 5).

The window is looked at after every counted rating from ``min_window`` on, so a rule whose
true statistic sits right at its threshold fires more often than one look's
``(1 - confidence) / 2``: simulated with the true mean exactly 3.0 (defaults otherwise),
``low_mean`` fired in about 11% of windows at confidence 0.95 and 2.5% at 0.99. Raise
``confidence`` to be stricter.

One user cannot dominate a window: at most ``per_user_cap`` ratings of a user count in it;
more are ignored and counted (``capped``). Duplicates are dropped: a rating's fingerprint is
its ``rating_id`` when the rating SDK set one, else ``(user_id, formula_id, ts, rating)``;
the last ``seen_ratings_max`` fingerprints of a target are remembered across windows (8-byte
BLAKE2b digests), so the same ratings sent twice yield one window and one proposal.

Proposals apply to the run's current values, which the agent reports with
``observe_current`` (from the run's metrics' optional fields);
a value never reported falls back to ``default_*``. The retuner does not assume its own
proposal was applied: until the run reports the new value, the next window starts from the
old one. A fired rule's change is clamped to its bound (``entropy_coef_max``,
``learning_rate_min``, ``clip_epsilon_min``), and a change the bound makes a no-op (or a
move against the rule's direction, for a current value already beyond the bound) is not
proposed. Fired rules propose their changes whatever the other rules say.

Determinism: no clock, no randomness; ``now`` is an argument. The command id derives from
the target and the window's sequence number (``WindowVerdict.command_id``), so a replay
never proposes twice. State round-trips through ``to_state``/``from_state`` (JSON-able); a
restored retuner closes its window at exactly the rating a crash-free one would.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from statistics import NormalDist
from typing import Any, Literal, cast

from config.settings import RetuneSettings
from rules.commands import retune_command_id
from rules.exact_sums import ExactSums
from rules.state import check_version
from schemas.events import Rating, RetunableName, Retune

RATING_MIN = 1.0
RATING_MAX = 5.0
# A distribution on [1, 5] has variance at most (5 - 1)^2 / 4.
VARIANCE_MAX = (RATING_MAX - RATING_MIN) ** 2 / 4.0

RuleStatus = Literal["fired", "not_fired", "undecided"]
ClosedBy = Literal["evidence", "max_window", "timeout"]
RatingStatus = Literal["counted", "duplicate", "capped"]
Interval = tuple[float, float]

_STATE_VERSION = 1
_FINGERPRINT_BYTES = 8  # 2**-64 collision odds per stored pair: negligible at 3,000
_NORMAL = NormalDist()


# --- quantiles ------------------------------------------------------------------------------


def _check_quantile_arguments(p: float, df: int) -> None:
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p!r}")
    if df < 1:
        raise ValueError(f"df must be at least 1, got {df}")


@lru_cache(maxsize=4096)
def t_quantile(p: float, df: int) -> float:
    """Student's t quantile: exact for df 1 and 2, Cornish-Fisher (A&S 26.7.5) from df 3."""
    _check_quantile_arguments(p, df)
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2.0 * p - 1.0) / math.sqrt(2.0 * p * (1.0 - p))
    z = _NORMAL.inv_cdf(p)
    z2 = z * z
    g1 = (z2 + 1.0) * z / 4.0
    g2 = ((5.0 * z2 + 16.0) * z2 + 3.0) * z / 96.0
    g3 = (((3.0 * z2 + 19.0) * z2 + 17.0) * z2 - 15.0) * z / 384.0
    g4 = ((((79.0 * z2 + 776.0) * z2 + 1482.0) * z2 - 1920.0) * z2 - 945.0) * z / 92160.0
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


@lru_cache(maxsize=4096)
def chi2_quantile(p: float, df: int) -> float:
    """Chi-square quantile: exact for df 1 and 2, Wilson-Hilferty from df 3 (at least 0)."""
    _check_quantile_arguments(p, df)
    if df == 1:
        return _NORMAL.inv_cdf((1.0 + p) / 2.0) ** 2
    if df == 2:
        return -2.0 * math.log1p(-p)
    c = 2.0 / (9.0 * df)
    base = 1.0 - c + _NORMAL.inv_cdf(p) * math.sqrt(c)
    # The cube goes negative far in the lower tail at small df: the quantile is then ~0.
    return df * max(base, 0.0) ** 3


# --- statistics -----------------------------------------------------------------------------


def _clip(interval: Interval, low: float, high: float) -> Interval:
    return (min(max(interval[0], low), high), min(max(interval[1], low), high))


def mean_interval(mean: float, variance: float, n: int, confidence: float) -> Interval:
    """Two-sided t interval of the mean, clipped to the ratings' range."""
    half = t_quantile((1.0 + confidence) / 2.0, n - 1) * math.sqrt(variance / n)
    return _clip((mean - half, mean + half), RATING_MIN, RATING_MAX)


def variance_interval(variance: float, n: int, confidence: float) -> Interval:
    """Two-sided chi-square interval of the variance, clipped to [0, VARIANCE_MAX]."""
    scaled = (n - 1) * variance
    upper_q = chi2_quantile((1.0 + confidence) / 2.0, n - 1)
    lower_q = chi2_quantile((1.0 - confidence) / 2.0, n - 1)
    high = scaled / lower_q if lower_q > 0.0 else math.inf
    return _clip((scaled / upper_q, high), 0.0, VARIANCE_MAX)


# --- rules ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    statistic: Literal["mean", "variance"]
    comparison: Literal["<", ">", ">="]
    parameter: Literal["entropy_coef", "learning_rate", "clip_epsilon"]
    raises: bool  # raise the parameter (else lower it)

    def judge(self, interval: Interval, threshold: float) -> RuleStatus:
        low, high = interval
        if self.comparison == "<":
            fired, not_fired = high < threshold, low >= threshold
        elif self.comparison == ">":
            fired, not_fired = low > threshold, high <= threshold
        else:
            fired, not_fired = low >= threshold, high < threshold
        if fired:
            return "fired"
        return "not_fired" if not_fired else "undecided"


_RULES = (
    _Rule("low_mean", "mean", "<", "entropy_coef", raises=True),
    _Rule("high_variance", "variance", ">", "learning_rate", raises=False),
    _Rule("high_mean", "mean", ">=", "clip_epsilon", raises=False),
)
PARAMETERS = tuple(rule.parameter for rule in _RULES)
_OTHER_SIDE = {"<": ">=", ">": "<=", ">=": "<"}


def _thresholds(settings: RetuneSettings) -> dict[str, float]:
    return {
        "low_mean": settings.low_mean_threshold,
        "high_variance": settings.high_variance_threshold,
        "high_mean": settings.high_mean_threshold,
    }


def _proposal(parameter: str, current: float, settings: RetuneSettings) -> float:
    """The parameter's new value after its rule fired, clamped to its bound.

    The product is rounded to 12 significant digits first, so 0.2 * 0.8 proposes 0.16, not
    0.16000000000000003 (a difference no optimizer can see, but every reader of an ack does).
    """
    if parameter == "entropy_coef":
        raised = _tidy(current * settings.entropy_coef_raise_factor)
        return min(raised, settings.entropy_coef_max)
    if parameter == "learning_rate":
        return max(_tidy(current * settings.learning_rate_lower_factor), settings.learning_rate_min)
    return max(_tidy(current * settings.clip_epsilon_lower_factor), settings.clip_epsilon_min)


def _tidy(value: float) -> float:
    return float(f"{value:.12g}")


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _fmt_interval(interval: Interval) -> str:
    return f"[{_fmt(interval[0])}, {_fmt(interval[1])}]"


@dataclass(frozen=True, slots=True)
class RuleOutcome:
    """One rule's judgement of a closed window."""

    rule: str  # low_mean, high_variance, high_mean
    parameter: str  # what it changes when it fires
    condition: str  # e.g. "mean < 3"
    status: RuleStatus
    interval: Interval | None  # the statistic's interval (None: fewer than two ratings, or
    # no confidence gate)
    before: float | None  # fired: the run's current value
    after: float | None  # fired and not a no-op at the bound: the proposed value
    reason: str


@dataclass(frozen=True, slots=True)
class WindowVerdict:
    """A closed window: its statistics, each rule's outcome and the proposed changes."""

    target: str
    sequence: int  # 0, 1, 2, ... per target
    closed_by: ClosedBy
    opened_at: float
    closed_at: float
    size: int  # counted ratings
    duplicates: int  # ignored while the window was open
    capped: int  # ignored while the window was open: over the per-user cap
    users: int  # distinct users among the counted ratings
    confidence: float | None  # None: no confidence gate, the guide's literal rule
    mean: float
    variance: float | None  # sample variance (n - 1); None for one rating
    mean_interval: Interval | None
    variance_interval: Interval | None
    rules: tuple[RuleOutcome, ...]
    changes: dict[str, float]  # parameter -> proposed value; empty when nothing fires
    rationale: str

    @property
    def window_id(self) -> str:
        return f"{self.target}#{self.sequence}"

    @property
    def command_id(self) -> str:
        """The retune command's id: replaying the same window gives the same id."""
        return retune_command_id(self.target, window_id=self.sequence)

    @property
    def undecided(self) -> tuple[str, ...]:
        """Names of the rules whose interval straddled their threshold (or too few ratings)."""
        return tuple(outcome.rule for outcome in self.rules if outcome.status == "undecided")

    def window(self) -> dict[str, Any]:
        """JSON-able summary, the retune command's ``window`` field."""

        def interval(value: Interval | None) -> list[float] | None:
            return None if value is None else [value[0], value[1]]

        return {
            "id": self.window_id,
            "target": self.target,
            "sequence": self.sequence,
            "closed_by": self.closed_by,
            "opened_at": self.opened_at,
            "closed_at": self.closed_at,
            "size": self.size,
            "duplicates": self.duplicates,
            "capped": self.capped,
            "users": self.users,
            "confidence": self.confidence,
            "mean": self.mean,
            "variance": self.variance,
            "mean_interval": interval(self.mean_interval),
            "variance_interval": interval(self.variance_interval),
            "rules": {outcome.rule: outcome.status for outcome in self.rules},
        }

    def command(self, issued_at: float) -> Retune | None:
        """The ``retune`` command for the target run; None when nothing is proposed."""
        if not self.changes:
            return None
        return Retune(
            command_id=self.command_id,
            run_id=self.target,
            issued_at=issued_at,
            changes={cast(RetunableName, name): value for name, value in self.changes.items()},
            rationale=self.rationale,
            window=self.window(),
        )


@dataclass(frozen=True, slots=True)
class RatingOutcome:
    """What one rating did: counted or ignored, and the verdict of a window it closed.

    A verdict can accompany an ignored rating: a window past its timeout closes at the next
    call, whatever that call brings.
    """

    status: RatingStatus
    verdict: WindowVerdict | None


def retune_target(run_id: str | None, settings: RetuneSettings) -> str:
    """The run a rating is windowed under: its run_id, or the default target."""
    return run_id if run_id is not None else settings.default_target


def rating_fingerprint(
    *, user_id: str, formula_id: str, ts: float, rating: float, rating_id: str | None = None
) -> bytes:
    """What identifies a rating for deduplication: its rating_id, else its content."""
    parts: list[Any] = ["id", rating_id]
    if rating_id is None:
        # float(): a rating sent as 4 and replayed as 4.0 is the same rating.
        parts = ["rating", user_id, formula_id, float(ts), float(rating)]
    encoded = json.dumps(parts, ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.blake2b(encoded, digest_size=_FINGERPRINT_BYTES).digest()


class Retuner:
    """One target run: its open ratings window, seen fingerprints and current values."""

    __slots__ = (
        "_capped",
        "_current",
        "_duplicates",
        "_opened_at",
        "_ratings",
        "_seen",
        "_seen_order",
        "_sequence",
        "_settings",
        "_sums",
        "_target",
        "_users",
    )

    def __init__(self, target: str, settings: RetuneSettings) -> None:
        self._target = target
        self._settings = settings
        self._sequence = 0
        self._current: dict[str, float | None] = dict.fromkeys(PARAMETERS)
        self._seen: set[bytes] = set()
        self._seen_order: deque[bytes] = deque()
        self._reset_window()

    def _reset_window(self) -> None:
        self._opened_at: float | None = None
        # The counted ratings, in arrival order: at most max_window floats, kept so the state
        # round-trips exactly (the exact sums can outgrow the 64-bit ints JSON encoders take).
        self._ratings: list[float] = []
        self._sums = ExactSums()
        self._users: dict[str, int] = {}
        self._duplicates = 0
        self._capped = 0

    @property
    def target(self) -> str:
        return self._target

    @property
    def sequence(self) -> int:
        """The open (or next) window's sequence number."""
        return self._sequence

    @property
    def size(self) -> int:
        """Counted ratings in the open window."""
        return len(self._ratings)

    @property
    def opened_at(self) -> float | None:
        return self._opened_at

    def current(self) -> dict[str, float]:
        """The run's hyperparameters as the rules see them: reported, else the defaults."""
        defaults = {
            "entropy_coef": self._settings.default_entropy_coef,
            "learning_rate": self._settings.default_learning_rate,
            "clip_epsilon": self._settings.default_clip_epsilon,
        }
        return {
            name: value if (value := self._current[name]) is not None else defaults[name]
            for name in PARAMETERS
        }

    def observe_current(
        self,
        *,
        entropy_coef: float | None = None,
        learning_rate: float | None = None,
        clip_epsilon: float | None = None,
    ) -> None:
        """The run reported these values (None: not reported, keep what is known)."""
        reported = {
            "entropy_coef": entropy_coef,
            "learning_rate": learning_rate,
            "clip_epsilon": clip_epsilon,
        }
        for name, value in reported.items():
            if value is None:
                continue
            if not math.isfinite(value) or value < 0.0:
                raise ValueError(f"{name} must be finite and non-negative, got {value!r}")
            self._current[name] = value

    # --- events ---------------------------------------------------------------------------

    def add(
        self,
        rating: float,
        *,
        user_id: str,
        formula_id: str,
        ts: float,
        now: float,
        rating_id: str | None = None,
    ) -> RatingOutcome:
        """Take one rating that arrived at ``now`` (the worker's clock)."""
        if not (math.isfinite(rating) and RATING_MIN <= rating <= RATING_MAX):
            raise ValueError(f"rating must lie in [1, 5], got {rating!r}")
        if not math.isfinite(now):
            raise ValueError(f"now must be finite, got {now!r}")
        # An expired window closes before the rating is looked at: the tick may be late.
        verdict = self.on_tick(now)
        fingerprint = rating_fingerprint(
            user_id=user_id, formula_id=formula_id, ts=ts, rating=rating, rating_id=rating_id
        )
        rating = float(rating)
        if fingerprint in self._seen:
            if self._opened_at is not None:
                self._duplicates += 1
            return RatingOutcome("duplicate", verdict)
        # Capped ratings are remembered too, so a replay of one cannot count in a later window.
        self._remember(fingerprint)
        if self._users.get(user_id, 0) >= self._settings.per_user_cap:
            self._capped += 1
            return RatingOutcome("capped", verdict)
        if self._opened_at is None:
            self._opened_at = now
        self._ratings.append(rating)
        self._sums.add(rating)
        self._users[user_id] = self._users.get(user_id, 0) + 1
        closed = self._close_if_done(now)
        return RatingOutcome("counted", verdict if closed is None else closed)

    def add_event(self, event: Rating, *, now: float) -> RatingOutcome:
        """``add`` for a contract rating, which must belong to this target (``retune_target``)."""
        target = retune_target(event.run_id, self._settings)
        if target != self._target:
            raise ValueError(f"a rating for {target!r} sent to the retuner of {self._target!r}")
        return self.add(
            event.rating,
            user_id=event.user_id,
            formula_id=event.formula_id,
            ts=event.ts,
            now=now,
            rating_id=event.rating_id,
        )

    def on_tick(self, now: float) -> WindowVerdict | None:
        """Wall-clock punctuation: close the open window once it is ``window_timeout_s`` old."""
        if self._opened_at is None or now - self._opened_at < self._settings.window_timeout_s:
            return None
        return self._close("timeout", now)

    def _remember(self, fingerprint: bytes) -> None:
        self._seen.add(fingerprint)
        self._seen_order.append(fingerprint)
        while len(self._seen_order) > self._settings.seen_ratings_max:
            self._seen.discard(self._seen_order.popleft())

    def _close_if_done(self, now: float) -> WindowVerdict | None:
        n = len(self._ratings)
        settings = self._settings
        if n >= settings.min_window:
            mean_ci, variance_ci = self._intervals()
            thresholds = _thresholds(settings)
            decided = all(
                rule.judge(
                    mean_ci if rule.statistic == "mean" else variance_ci, thresholds[rule.name]
                )
                != "undecided"
                for rule in _RULES
            )
            if decided:
                return self._close("evidence", now)
        if n >= settings.max_window:
            return self._close("max_window", now)
        return None

    def _intervals(self) -> tuple[Interval, Interval]:
        """The intervals the rules judge: confidence intervals, or without the confidence
        gate the point statistics themselves (zero-width)."""
        n, variance = len(self._ratings), self._sums.sample_variance()
        assert variance is not None  # callers ensure n >= 2
        if not self._settings.confidence_gate:
            mean = self._sums.mean()
            return (mean, mean), (variance, variance)
        confidence = self._settings.confidence
        return (
            mean_interval(self._sums.mean(), variance, n, confidence),
            variance_interval(variance, n, confidence),
        )

    def _close(self, closed_by: ClosedBy, now: float) -> WindowVerdict:
        verdict = self._judge(closed_by, now)
        self._sequence += 1
        self._reset_window()
        return verdict

    def _judge(self, closed_by: ClosedBy, now: float) -> WindowVerdict:
        settings = self._settings
        n = len(self._ratings)
        mean, variance = self._sums.mean(), self._sums.sample_variance()
        mean_ci, variance_ci = self._intervals() if n >= 2 else (None, None)
        gated = settings.confidence_gate
        too_few = closed_by == "timeout" and n < settings.timeout_min_ratings
        thresholds = _thresholds(settings)
        current = self.current()
        outcomes: list[RuleOutcome] = []
        changes: dict[str, float] = {}
        for rule in _RULES:
            threshold = thresholds[rule.name]
            condition = f"{rule.statistic} {rule.comparison} {_fmt(threshold)}"
            interval = mean_ci if rule.statistic == "mean" else variance_ci
            before = after = None
            if too_few or interval is None:
                status: RuleStatus = "undecided"
                reason = (
                    f"undecided: {n} ratings at timeout, fewer than "
                    f"timeout_min_ratings={settings.timeout_min_ratings}"
                )
            else:
                status = rule.judge(interval, threshold)
                shown = _fmt_interval(interval)
                judged = (
                    f"interval {shown} wholly" if gated else f"{rule.statistic} {_fmt(interval[0])}"
                )
                if status == "undecided":
                    reason = f"undecided: interval {shown} straddles {_fmt(threshold)}"
                elif status == "not_fired":
                    other = _OTHER_SIDE[rule.comparison]
                    reason = f"not fired: {judged} {other} {_fmt(threshold)}"
                else:
                    before = current[rule.parameter]
                    proposed = _proposal(rule.parameter, before, settings)
                    moves = proposed > before if rule.raises else proposed < before
                    reason = f"fired: {judged} {rule.comparison} {_fmt(threshold)}"
                    if moves:
                        after = changes[rule.parameter] = proposed
                        reason += f": {rule.parameter} {_fmt(before)} -> {_fmt(proposed)}"
                    else:
                        reason += (
                            f", but {rule.parameter} {_fmt(before)} is at its bound: no change"
                        )
            outcomes.append(
                RuleOutcome(
                    rule=rule.name,
                    parameter=rule.parameter,
                    condition=condition,
                    status=status,
                    interval=interval if gated else None,
                    before=before,
                    after=after,
                    reason=reason,
                )
            )
        assert self._opened_at is not None
        verdict = WindowVerdict(
            target=self._target,
            sequence=self._sequence,
            closed_by=closed_by,
            opened_at=self._opened_at,
            closed_at=now,
            size=n,
            duplicates=self._duplicates,
            capped=self._capped,
            users=len(self._users),
            confidence=settings.confidence if gated else None,
            mean=mean,
            variance=variance,
            mean_interval=mean_ci if gated else None,
            variance_interval=variance_ci if gated else None,
            rules=tuple(outcomes),
            changes=changes,
            rationale="",
        )
        return replace(verdict, rationale=_rationale(verdict))

    # --- state ----------------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "target": self._target,
            "sequence": self._sequence,
            "opened_at": self._opened_at,
            "ratings": list(self._ratings),
            "users": dict(self._users),
            "duplicates": self._duplicates,
            "capped": self._capped,
            "seen": base64.b64encode(b"".join(self._seen_order)).decode("ascii"),
            "current": dict(self._current),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], settings: RetuneSettings) -> Retuner:
        check_version(state, _STATE_VERSION, "retuner")
        retuner = cls(str(state["target"]), settings)
        retuner._sequence = int(state["sequence"])
        opened_at = state["opened_at"]
        retuner._opened_at = None if opened_at is None else float(opened_at)
        for rating in state["ratings"]:
            retuner._ratings.append(float(rating))
            retuner._sums.add(float(rating))
        retuner._users = {str(user): int(count) for user, count in state["users"].items()}
        retuner._duplicates = int(state["duplicates"])
        retuner._capped = int(state["capped"])
        seen = base64.b64decode(state["seen"])
        if len(seen) % _FINGERPRINT_BYTES:
            raise ValueError("corrupt retuner state: seen fingerprints")
        for offset in range(0, len(seen), _FINGERPRINT_BYTES):
            retuner._remember(seen[offset : offset + _FINGERPRINT_BYTES])  # trims if lowered
        for name in PARAMETERS:
            value = state["current"].get(name)
            retuner._current[name] = None if value is None else float(value)
        return retuner


def _rationale(verdict: WindowVerdict) -> str:
    """One line a human can act on: the window, its statistics and each rule's outcome."""
    percent = f"{100.0 * (verdict.confidence or 0.0):g}%"
    head = (
        f"window {verdict.window_id} closed by {verdict.closed_by} with {verdict.size} ratings "
        f"from {verdict.users} users ({verdict.duplicates} duplicates and {verdict.capped} over "
        f"the per-user cap ignored): mean {_fmt(verdict.mean)}"
    )
    if verdict.mean_interval is not None:
        head += f" ({percent} CI {_fmt_interval(verdict.mean_interval)})"
    if verdict.variance is not None:
        head += f", variance {_fmt(verdict.variance)}"
    if verdict.variance_interval is not None:
        head += f" ({percent} CI {_fmt_interval(verdict.variance_interval)})"
    if verdict.confidence is None:
        head += " (no confidence gate: the guide's literal rule)"
    parts = [head]
    parts.extend(
        f"{outcome.rule} ({outcome.condition}) {outcome.reason}" for outcome in verdict.rules
    )
    if verdict.changes:
        proposed = ", ".join(f"{name}={_fmt(value)}" for name, value in verdict.changes.items())
        parts.append(f"proposed {proposed}")
    else:
        parts.append("nothing proposed")
    return "; ".join(parts)
