"""The LLM circuit breaker, one per model (operations guide, section 3).

Modes, best first: ``creative`` > ``balanced`` > ``fast``. States: ``closed`` (creative,
cache TTL ``ttl_closed_s``), ``open`` (downshifted, holding) and ``half_open`` (downshifted,
probing the mode one step up); both degraded states use ``ttl_degraded_s``. The numbers are
``BreakerSettings``, frozen here as a ``BreakerPolicy``.

Time is the worker's clock, passed to every method as ``now`` (seconds). Outcome timestamps
are never read: producer clocks may be skewed by minutes, and must not shorten or extend a
downshift.

Counting. A call fails when it raised (``ok`` false) or, with ``slow_call_ms`` set, when it
succeeded slower than that. An outcome counts only against the breaker's current mode:
outcomes of a higher mode arriving after a downshift (calls that were in flight) or of any
other mode are ignored, so no failure counts twice. Counters restart at every transition.

- ``trip_on="consecutive"`` (default): ``failure_threshold`` consecutive failures trip.
- ``trip_on="rate"``: once the last ``rate_window`` calls hold at least ``rate_min_calls``,
  a failed fraction of ``failure_rate`` or more trips (``failure_threshold`` is not used).

Transitions (``open_s`` is 300 s by default):

- closed, trip -> open, one mode down (creative -> balanced), ``until = now + open_s``.
- open, trip ("a trip while degraded") -> open, one more mode down (balanced -> fast; at
  fast it stays fast), ``until = now + open_s``.
- open, first tick at or after ``until`` -> half_open, ``probe_mode`` one step up. Only
  ticks drive this, so recovery needs no traffic.
- half_open: outcomes in ``probe_mode`` are probes; each replica may send ``probe_calls``.
  ``probe_failures_to_reopen`` probe failures -> open, one mode down from the current one.
  ``probe_calls - probe_failures_to_reopen + 1`` probe successes (from that count on, one
  replica's remaining probes can no longer reach the failures that re-open; 2 of 3 by
  default) step up to ``probe_mode``: closed at creative, otherwise half_open again at
  once, probing the next mode up (graded recovery). Outcomes in the current mode still
  count toward a trip, as in open. ``until`` is the end of the probe round: a round that
  decided nothing by then (no traffic, or probe outcomes lost) is renewed by a tick with a
  new epoch, so replicas get a fresh probe budget instead of waiting forever.

Time recovery (``recovery="time"``, the operations guide's literal rule): the first tick at
or after ``until`` of an open (or, from a state restored under ``probe``, half-open)
breaker closes it: creative, ``ttl_closed_s``, no probe, no traffic needed. A failing model
then trips again from creative after ``failure_threshold`` failures.

With the defaults: 3 failures -> open/balanced/TTL 300; after 300 s -> half_open probing
creative; 2 probe failures -> open/fast; after 300 s -> half_open probing balanced; 2 probe
successes -> half_open at balanced probing creative; 2 more -> closed/creative/TTL 3,600.

Output: every state change returns a ``Transition``: what an ``llm.control`` event carries
except ``ts`` (``LlmControl(**dataclasses.asdict(t), ts=now)``), with an ``epoch`` that
increments per change so replicas can ignore stale control events. Nothing is random and
no clock is read here, so the same state and inputs always give the same transition.

Duplicates: an outcome whose ``call_id`` is among the last ``dedupe_window`` ids seen (a
producer retry, or the stream's replay after a crash) changes nothing. Ids are kept as
64-bit BLAKE2b digests, so the state stays small (about 11 KB for 1,024 ids).

Plain Python: no Kafka, no Faust. State round-trips through ``to_state``/``from_state``, so
a restarted worker neither forgets nor repeats a downshift.
"""

from __future__ import annotations

import base64
import hashlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from config.settings import BreakerSettings
from rules.state import check_version
from schemas.events import BreakerState, LlmMode

_STATE_VERSION = 1
_DIGEST_SIZE = 8

MODES: tuple[LlmMode, ...] = ("creative", "balanced", "fast")
"""The ladder, best first."""

# One character per counted call in the rate window (and in the state).
_OK, _FAILED, _SLOW = "o", "f", "s"

_Name = TypeVar("_Name", bound=str)


def step_down(mode: LlmMode) -> LlmMode:
    """The next mode down the ladder; ``fast`` stays ``fast``."""
    return MODES[min(MODES.index(mode) + 1, len(MODES) - 1)]


def step_up(mode: LlmMode) -> LlmMode:
    """The next mode up the ladder; ``creative`` stays ``creative``."""
    return MODES[max(MODES.index(mode) - 1, 0)]


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """The breaker's numbers (``BreakerSettings``; see their descriptions)."""

    failure_threshold: int = 3
    trip_on: Literal["consecutive", "rate"] = "consecutive"
    rate_window: int = 20
    failure_rate: float = 0.5
    rate_min_calls: int = 10
    slow_call_ms: float | None = None
    open_s: float = 300.0
    recovery: Literal["probe", "time"] = "probe"
    probe_calls: int = 3
    probe_failures_to_reopen: int = 2
    ttl_closed_s: float = 3600.0
    ttl_degraded_s: float = 300.0
    dedupe_window: int = 1024

    def __post_init__(self) -> None:
        # The settings validate too; this guards policies built directly (tests, tools).
        if not 1 <= self.probe_failures_to_reopen <= self.probe_calls:
            raise ValueError("probe_failures_to_reopen must lie within [1, probe_calls]")
        if not 1 <= self.rate_min_calls <= self.rate_window:
            raise ValueError("rate_min_calls must lie within [1, rate_window]")
        if self.recovery not in ("probe", "time"):
            raise ValueError(f"recovery must be 'probe' or 'time', got {self.recovery!r}")
        if self.failure_threshold < 1 or self.open_s <= 0 or self.dedupe_window < 0:
            raise ValueError("failure_threshold must be >= 1, open_s > 0 and dedupe_window >= 0")

    @classmethod
    def from_settings(cls, settings: BreakerSettings) -> BreakerPolicy:
        # Not rule parameters: how often the worker calls on_tick, which exceptions the LLM
        # SDK reports as failures in the first place, and other models' values (a model's
        # policy comes from ``settings.for_model(model)``).
        return cls(
            **settings.model_dump(
                exclude={"tick_interval_s", "record_exceptions", "ignore_exceptions", "models"}
            )
        )

    @property
    def probe_successes_to_recover(self) -> int:
        """Probe successes that step up: ``probe_calls - probe_failures_to_reopen + 1``."""
        return self.probe_calls - self.probe_failures_to_reopen + 1


@dataclass(frozen=True, slots=True)
class Transition:
    """A state change of one model's breaker: an ``llm.control`` event without its ``ts``."""

    model: str
    state: BreakerState
    mode: LlmMode
    cache_ttl_s: float
    until: float | None  # open: probing starts; half_open: the probe round ends; closed: None
    reason: str
    epoch: int  # increments with each state change of the model
    probe_mode: LlmMode | None = None  # half_open only
    probe_calls: int | None = None  # half_open only: probe calls each replica may send


def _code(ok: bool, latency_ms: float, slow_call_ms: float | None) -> str:
    if not ok:
        return _FAILED
    if slow_call_ms is not None and latency_ms > slow_call_ms:
        return _SLOW
    return _OK


def _digest(call_id: str) -> bytes:
    return hashlib.blake2b(call_id.encode(), digest_size=_DIGEST_SIZE).digest()


class ModelBreaker:
    """One model's breaker: outcomes and ticks in, transitions out."""

    __slots__ = (
        "_epoch",
        "_mode",
        "_probe_failed",
        "_probe_mode",
        "_probe_ok",
        "_probe_slow",
        "_reason",
        "_seen",
        "_seen_set",
        "_state",
        "_streak",
        "_streak_slow",
        "_until",
        "_window",
        "_window_failed",
        "_window_slow",
        "model",
        "policy",
    )

    def __init__(self, model: str, policy: BreakerPolicy) -> None:
        self.model = model
        self.policy = policy
        self._state: BreakerState = "closed"
        self._mode: LlmMode = "creative"
        self._until: float | None = None
        self._probe_mode: LlmMode | None = None
        self._epoch = 0
        self._reason = ""
        self._streak = 0  # consecutive failures in the current mode
        self._streak_slow = 0  # of which slow successes (for the reason)
        self._window: deque[str] = deque()  # the current mode's last calls (trip_on="rate")
        self._window_failed = 0  # failed or slow calls in the window
        self._window_slow = 0
        self._probe_ok = 0
        self._probe_failed = 0
        self._probe_slow = 0
        self._seen: deque[bytes] = deque()  # call id digests, oldest first
        self._seen_set: set[bytes] = set()

    @classmethod
    def from_settings(cls, model: str, settings: BreakerSettings) -> ModelBreaker:
        """A breaker with the model's settings (``settings.breaker.for_model(model)``)."""
        return cls(model, BreakerPolicy.from_settings(settings))

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def mode(self) -> LlmMode:
        return self._mode

    @property
    def until(self) -> float | None:
        return self._until

    @property
    def epoch(self) -> int:
        return self._epoch

    def control(self) -> Transition:
        """The current state, as the last transition announced it (initially closed, epoch 0)."""
        policy = self.policy
        closed = self._state == "closed"
        return Transition(
            model=self.model,
            state=self._state,
            mode=self._mode,
            cache_ttl_s=policy.ttl_closed_s if closed else policy.ttl_degraded_s,
            until=self._until,
            reason=self._reason,
            epoch=self._epoch,
            probe_mode=self._probe_mode,
            probe_calls=policy.probe_calls if self._state == "half_open" else None,
        )

    def on_outcome(
        self,
        ok: bool,
        mode: LlmMode,
        latency_ms: float,
        now: float,
        call_id: str | None = None,
    ) -> Transition | None:
        """One call's outcome, served in ``mode``; the transition it caused, or None."""
        if call_id is not None and self._repeated(call_id):
            return None
        code = _code(ok, latency_ms, self.policy.slow_call_ms)
        if self._state == "half_open" and mode == self._probe_mode:
            return self._probe(code, now)
        if mode != self._mode:
            return None  # in flight before a downshift, or a replica not yet following
        cause = self._count(code)
        if cause is None:
            return None
        return self._open(cause, now)

    def on_tick(self, now: float) -> Transition | None:
        """The worker's clock advanced: end the hold (probing, or closing with
        ``recovery="time"``), or renew an undecided probe round."""
        if self._until is None or now < self._until:
            return None
        open_s = self.policy.open_s
        if self.policy.recovery == "time":
            return self._change(
                "closed", "creative", None, f"held {self._mode} for {open_s:g} s: recovered"
            )
        if self._state == "open":
            up = step_up(self._mode)
            return self._change(
                "half_open",
                self._mode,
                now + open_s,
                f"held {self._mode} for {open_s:g} s: probing {up}",
                probe_mode=up,
            )
        probe_mode = self._probe_mode
        assert probe_mode is not None  # half_open: the only other state with an until
        return self._change(
            "half_open",
            self._mode,
            now + open_s,
            f"no probe decision within {open_s:g} s: probing {probe_mode} again",
            probe_mode=probe_mode,
        )

    def _repeated(self, call_id: str) -> bool:
        """Whether ``call_id`` was seen among the last ``dedupe_window``; remembers it."""
        window = self.policy.dedupe_window
        if window == 0:
            return False
        digest = _digest(call_id)
        if digest in self._seen_set:
            return True
        self._seen.append(digest)
        self._seen_set.add(digest)
        if len(self._seen) > window:
            self._seen_set.discard(self._seen.popleft())
        return False

    def _count(self, code: str) -> str | None:
        """Count a current-mode call; what tripped, or None."""
        policy = self.policy
        self._push(code)
        if code == _OK:
            self._streak = self._streak_slow = 0
        else:
            self._streak += 1
            self._streak_slow += code == _SLOW
        if policy.trip_on == "consecutive":
            if self._streak < policy.failure_threshold:
                return None
            return self._with_slow(
                f"{self._streak} consecutive failures in {self._mode}", self._streak_slow
            )
        calls, failed = len(self._window), self._window_failed
        # failed / calls, not failed >= rate * calls: 3 / 10 == 0.3 exactly, 0.3 * 10 is not.
        if calls < policy.rate_min_calls or failed / calls < policy.failure_rate:
            return None
        return self._with_slow(
            f"{failed} of the last {calls} calls failed in {self._mode} ({failed / calls:.0%})",
            self._window_slow,
        )

    def _push(self, code: str) -> None:
        self._window.append(code)
        self._window_failed += code != _OK
        self._window_slow += code == _SLOW
        if len(self._window) > self.policy.rate_window:
            dropped = self._window.popleft()
            self._window_failed -= dropped != _OK
            self._window_slow -= dropped == _SLOW

    def _with_slow(self, cause: str, slow: int) -> str:
        if slow:
            return f"{cause} ({slow} slower than {self.policy.slow_call_ms:g} ms)"
        return cause

    def _probe(self, code: str, now: float) -> Transition | None:
        """Count a probe; step up or re-open when the round is decided."""
        policy = self.policy
        probe_mode = self._probe_mode
        assert probe_mode is not None
        if code == _OK:
            self._probe_ok += 1
            if self._probe_ok < policy.probe_successes_to_recover:
                return None
            cause = f"{self._probe_ok} probe calls succeeded in {probe_mode}"
            if probe_mode == "creative":
                return self._change("closed", "creative", None, f"{cause}: recovered")
            up = step_up(probe_mode)
            return self._change(
                "half_open",
                probe_mode,
                now + policy.open_s,
                f"{cause}: step up to {probe_mode}, probing {up}",
                probe_mode=up,
            )
        self._probe_failed += 1
        self._probe_slow += code == _SLOW
        if self._probe_failed < policy.probe_failures_to_reopen:
            return None
        cause = f"{self._probe_failed} probe calls failed in {probe_mode}"
        return self._open(self._with_slow(cause, self._probe_slow), now)

    def _open(self, cause: str, now: float) -> Transition:
        """Open one mode down from the current one (fast holds), for ``open_s`` from now."""
        down = step_down(self._mode)
        action = f"downshift to {down}" if down != self._mode else f"hold {down}"
        return self._change("open", down, now + self.policy.open_s, f"{cause}: {action}")

    def _change(
        self,
        state: BreakerState,
        mode: LlmMode,
        until: float | None,
        reason: str,
        probe_mode: LlmMode | None = None,
    ) -> Transition:
        self._state, self._mode, self._until = state, mode, until
        self._probe_mode, self._reason = probe_mode, reason
        self._epoch += 1
        # Every transition starts a fresh count: a trip at fast must not re-trip on the
        # next failure, and a new probe round gets a new budget.
        self._reset_counts()
        return self.control()

    def _reset_counts(self) -> None:
        self._streak = self._streak_slow = 0
        self._window.clear()
        self._window_failed = self._window_slow = 0
        self._probe_ok = self._probe_failed = self._probe_slow = 0

    def adopt(self, control: Transition) -> None:
        """Take a shared decision (the stream's ``llm.control``) as this breaker's state.

        The SDK's local breaker uses it to converge to the stream: from the adopted state
        it counts afresh, so a local trip is judged against the mode the replica serves.
        """
        self._state, self._mode, self._until = control.state, control.mode, control.until
        self._probe_mode, self._reason = control.probe_mode, control.reason
        self._epoch = control.epoch
        self._reset_counts()

    def to_state(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "state": self._state,
            "mode": self._mode,
            "until": self._until,
            "probe_mode": self._probe_mode,
            "epoch": self._epoch,
            "reason": self._reason,
            "streak": [self._streak, self._streak_slow],
            "window": "".join(self._window),
            "probes": [self._probe_ok, self._probe_failed, self._probe_slow],
            "seen": base64.b64encode(b"".join(self._seen)).decode("ascii"),
        }

    @classmethod
    def from_state(
        cls, model: str, policy: BreakerPolicy, state: Mapping[str, Any]
    ) -> ModelBreaker:
        """Restore a breaker; counts beyond a (changed) policy's windows are dropped."""
        check_version(state, _STATE_VERSION, "breaker")
        breaker = cls(model, policy)
        breaker._state = _checked(state["state"], ("closed", "open", "half_open"))
        breaker._mode = _checked(state["mode"], MODES)
        until, probe_mode = state["until"], state["probe_mode"]
        breaker._until = None if until is None else float(until)
        breaker._probe_mode = None if probe_mode is None else _checked(probe_mode, MODES)
        _check_consistent(breaker._state, breaker._mode, breaker._until, breaker._probe_mode)
        breaker._epoch = int(state["epoch"])
        breaker._reason = str(state["reason"])
        breaker._streak, breaker._streak_slow = (int(n) for n in state["streak"])
        for code in str(state["window"]):
            breaker._push(_checked(code, (_OK, _FAILED, _SLOW)))
        breaker._probe_ok, breaker._probe_failed, breaker._probe_slow = (
            int(n) for n in state["probes"]
        )
        seen = base64.b64decode(state["seen"])
        digests = [seen[i : i + _DIGEST_SIZE] for i in range(0, len(seen), _DIGEST_SIZE)]
        breaker._seen = deque(digests[max(len(digests) - policy.dedupe_window, 0) :])
        breaker._seen_set = set(breaker._seen)
        return breaker


def _checked(value: object, allowed: tuple[_Name, ...]) -> _Name:
    for candidate in allowed:
        if value == candidate:
            return candidate
    raise ValueError(f"breaker state holds {value!r}, expected one of {allowed}")


def _check_consistent(
    state: BreakerState, mode: LlmMode, until: float | None, probe_mode: LlmMode | None
) -> None:
    """The invariants every transition keeps; a state breaking them is refused."""
    if state == "closed":
        ok = mode == "creative" and until is None and probe_mode is None
    elif state == "open":
        ok = mode != "creative" and until is not None and probe_mode is None
    else:
        ok = mode != "creative" and until is not None and probe_mode == step_up(mode)
    if not ok:
        raise ValueError(
            f"inconsistent breaker state: {state}, mode {mode}, until {until}, "
            f"probe_mode {probe_mode}"
        )
