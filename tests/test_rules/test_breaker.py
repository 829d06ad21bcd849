"""The LLM circuit breaker: the graded ladder, trip options, stale modes, dedupe, ticks, state."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from config.settings import BreakerSettings, Settings
from rules.breaker import (
    MODES,
    BreakerPolicy,
    ModelBreaker,
    Transition,
    step_down,
    step_up,
)
from schemas import LlmControl, decode, encode
from schemas.events import LlmMode

MODEL = "qwen"
DEFAULTS = BreakerPolicy()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("FRAGRANCE_OPS_"):
            monkeypatch.delenv(name)


def fail(
    breaker: ModelBreaker, mode: LlmMode, now: float, call_id: str | None = None
) -> Transition | None:
    return breaker.on_outcome(False, mode, 120.0, now, call_id)


def succeed(
    breaker: ModelBreaker,
    mode: LlmMode,
    now: float,
    latency_ms: float = 120.0,
    call_id: str | None = None,
) -> Transition | None:
    return breaker.on_outcome(True, mode, latency_ms, now, call_id)


def fail_times(breaker: ModelBreaker, mode: LlmMode, count: int, now: float) -> Transition | None:
    """``count`` failures; asserts only the last may change anything, and returns it."""
    for _ in range(count - 1):
        assert fail(breaker, mode, now) is None
    return fail(breaker, mode, now)


def roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = orjson.loads(orjson.dumps(state))
    return result


def restored(breaker: ModelBreaker, policy: BreakerPolicy = DEFAULTS) -> ModelBreaker:
    return ModelBreaker.from_state(MODEL, policy, roundtrip(breaker.to_state()))


def opened_at_balanced(policy: BreakerPolicy = DEFAULTS, now: float = 1000.0) -> ModelBreaker:
    breaker = ModelBreaker(MODEL, policy)
    tripped = fail_times(breaker, "creative", policy.failure_threshold, now)
    assert tripped is not None
    assert (tripped.state, tripped.mode) == ("open", "balanced")
    return breaker


# --- settings -------------------------------------------------------------------------------


def test_defaults_are_the_operations_guide_numbers() -> None:
    breaker = Settings().breaker
    assert (breaker.failure_threshold, breaker.trip_on, breaker.open_s) == (3, "consecutive", 300)
    assert (breaker.ttl_closed_s, breaker.ttl_degraded_s) == (3600.0, 300.0)
    assert (breaker.rate_window, breaker.failure_rate, breaker.rate_min_calls) == (20, 0.5, 10)
    assert (breaker.slow_call_ms, breaker.dedupe_window) == (None, 1024)
    assert (breaker.probe_calls, breaker.probe_failures_to_reopen) == (3, 2)
    policy = BreakerPolicy.from_settings(breaker)
    assert policy == DEFAULTS
    assert policy.probe_successes_to_recover == 2  # 3 - 2 + 1


def test_environment_sets_the_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRAGRANCE_OPS_BREAKER__TRIP_ON", "rate")
    monkeypatch.setenv("FRAGRANCE_OPS_BREAKER__SLOW_CALL_MS", "2500")
    monkeypatch.setenv("FRAGRANCE_OPS_BREAKER__OPEN_S", "2")
    breaker = Settings().breaker
    assert (breaker.trip_on, breaker.slow_call_ms, breaker.open_s) == ("rate", 2500.0, 2.0)
    assert ModelBreaker.from_settings(MODEL, breaker).policy.open_s == 2.0


@pytest.mark.parametrize(
    "values",
    [
        {"failure_threshold": 0},
        {"trip_on": "ratio"},
        {"failure_rate": 0.0},
        {"failure_rate": 1.5},
        {"rate_min_calls": 21},  # more than rate_window: the rate would never be judged
        {"slow_call_ms": 0.0},
        {"open_s": 0.0},
        {"probe_calls": 0},
        {"probe_failures_to_reopen": 4},  # more than probe_calls
        {"ttl_degraded_s": -1.0},
        {"dedupe_window": -1},
    ],
)
def test_meaningless_settings_are_refused(values: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        BreakerSettings(**values)


@pytest.mark.parametrize(
    "values",
    [
        {"probe_failures_to_reopen": 4},
        {"probe_failures_to_reopen": 0},
        {"rate_min_calls": 21},
        {"failure_threshold": 0},
    ],
)
def test_policies_built_directly_are_checked_too(values: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must"):
        BreakerPolicy(**values)


def test_recovery_needs_the_successes_the_failures_can_no_longer_outvote() -> None:
    assert BreakerPolicy(probe_calls=5, probe_failures_to_reopen=2).probe_successes_to_recover == 4
    assert BreakerPolicy(probe_calls=1, probe_failures_to_reopen=1).probe_successes_to_recover == 1


# --- the ladder -----------------------------------------------------------------------------


def test_the_ladder() -> None:
    assert MODES == ("creative", "balanced", "fast")
    assert [step_down(mode) for mode in MODES] == ["balanced", "fast", "fast"]
    assert [step_up(mode) for mode in MODES] == ["creative", "creative", "balanced"]


def test_the_default_sequence_down_to_fast_and_back_to_creative() -> None:
    breaker = ModelBreaker(MODEL, DEFAULTS)
    steps: list[tuple[float, Transition | None]] = []
    assert fail(breaker, "creative", 1000.0) is None
    assert fail(breaker, "creative", 1000.5) is None
    steps.append((1001.0, fail(breaker, "creative", 1001.0)))
    assert breaker.on_tick(1300.9) is None
    steps.append((1301.0, breaker.on_tick(1301.0)))
    assert fail(breaker, "creative", 1302.0) is None
    steps.append((1303.0, fail(breaker, "creative", 1303.0)))
    steps.append((1603.0, breaker.on_tick(1603.0)))
    assert succeed(breaker, "balanced", 1604.0) is None
    steps.append((1605.0, succeed(breaker, "balanced", 1605.0)))
    assert succeed(breaker, "creative", 1606.0) is None
    steps.append((1607.0, succeed(breaker, "creative", 1607.0)))

    assert [transition for _, transition in steps] == [
        Transition(
            model=MODEL,
            state="open",
            mode="balanced",
            cache_ttl_s=300.0,
            until=1301.0,
            reason="3 consecutive failures in creative: downshift to balanced",
            epoch=1,
        ),
        Transition(
            model=MODEL,
            state="half_open",
            mode="balanced",
            cache_ttl_s=300.0,
            until=1601.0,
            reason="held balanced for 300 s: probing creative",
            epoch=2,
            probe_mode="creative",
            probe_calls=3,
        ),
        Transition(
            model=MODEL,
            state="open",
            mode="fast",
            cache_ttl_s=300.0,
            until=1603.0,
            reason="2 probe calls failed in creative: downshift to fast",
            epoch=3,
        ),
        Transition(
            model=MODEL,
            state="half_open",
            mode="fast",
            cache_ttl_s=300.0,
            until=1903.0,
            reason="held fast for 300 s: probing balanced",
            epoch=4,
            probe_mode="balanced",
            probe_calls=3,
        ),
        Transition(
            model=MODEL,
            state="half_open",
            mode="balanced",
            cache_ttl_s=300.0,
            until=1905.0,
            reason="2 probe calls succeeded in balanced: step up to balanced, probing creative",
            epoch=5,
            probe_mode="creative",
            probe_calls=3,
        ),
        Transition(
            model=MODEL,
            state="closed",
            mode="creative",
            cache_ttl_s=3600.0,
            until=None,
            reason="2 probe calls succeeded in creative: recovered",
            epoch=6,
        ),
    ]
    assert breaker.control() == steps[-1][1]
    # Every transition is a valid llm.control event once the worker stamps it.
    for now, transition in steps:
        assert transition is not None
        event = LlmControl(**dataclasses.asdict(transition), ts=now)
        assert decode(LlmControl, encode(event)) == event


def test_a_new_breaker_is_closed_in_creative_at_epoch_0() -> None:
    control = ModelBreaker(MODEL, DEFAULTS).control()
    assert control == Transition(MODEL, "closed", "creative", 3600.0, None, "", 0)
    assert LlmControl(**dataclasses.asdict(control), ts=1.0).epoch == 0


def test_a_success_breaks_the_streak() -> None:
    breaker = ModelBreaker(MODEL, DEFAULTS)
    for now in range(10):
        assert fail(breaker, "creative", now) is None
        assert fail(breaker, "creative", now) is None
        assert succeed(breaker, "creative", now) is None
    assert breaker.state == "closed"


def test_a_trip_while_degraded_steps_down_again_and_fast_holds() -> None:
    breaker = opened_at_balanced()
    tripped = fail_times(breaker, "balanced", 3, 1100.0)
    assert tripped is not None
    assert (tripped.state, tripped.mode, tripped.until, tripped.epoch) == (
        "open",
        "fast",
        1400.0,
        2,
    )
    assert tripped.reason == "3 consecutive failures in balanced: downshift to fast"
    held = fail_times(breaker, "fast", 3, 1200.0)
    assert held is not None
    assert (held.state, held.mode, held.until, held.epoch) == ("open", "fast", 1500.0, 3)
    assert held.reason == "3 consecutive failures in fast: hold fast"
    # Counting restarts at every transition: the next failure is the first of a new streak.
    assert fail(breaker, "fast", 1201.0) is None
    assert fail(breaker, "fast", 1202.0) is None


def test_failures_in_the_current_mode_trip_while_half_open() -> None:
    breaker = opened_at_balanced()
    assert breaker.on_tick(1300.0) is not None
    tripped = fail_times(breaker, "balanced", 3, 1310.0)
    assert tripped is not None
    assert (tripped.state, tripped.mode, tripped.until, tripped.probe_mode) == (
        "open",
        "fast",
        1610.0,
        None,
    )


def test_probe_failures_at_fast_reopen_at_fast() -> None:
    breaker = opened_at_balanced()
    fail_times(breaker, "balanced", 3, 1100.0)  # -> fast until 1400
    probing = breaker.on_tick(1400.0)
    assert probing is not None
    assert (probing.mode, probing.probe_mode) == ("fast", "balanced")
    reopened = fail_times(breaker, "balanced", 2, 1401.0)
    assert reopened is not None
    assert (reopened.state, reopened.mode, reopened.until) == ("open", "fast", 1701.0)
    assert reopened.reason == "2 probe calls failed in balanced: hold fast"


@pytest.mark.parametrize(
    ("probes", "state", "mode"),
    [
        ("fss", "closed", "creative"),
        ("sff", "open", "fast"),
        ("sfs", "closed", "creative"),
        ("fsf", "open", "fast"),
    ],
)
def test_mixed_probes_decide_by_the_first_count_reached(probes: str, state: str, mode: str) -> None:
    breaker = opened_at_balanced()
    breaker.on_tick(1300.0)
    results = [
        (succeed if probe == "s" else fail)(breaker, "creative", 1301.0 + index)
        for index, probe in enumerate(probes)
    ]
    assert results[:-1] == [None, None]
    decided = results[-1]
    assert decided is not None
    assert (decided.state, decided.mode) == (state, mode)


def test_current_mode_successes_are_not_probes() -> None:
    breaker = opened_at_balanced()
    breaker.on_tick(1300.0)
    for now in range(1301, 1320):
        assert succeed(breaker, "balanced", float(now)) is None
    assert (breaker.state, breaker.mode) == ("half_open", "balanced")


# --- stale modes ----------------------------------------------------------------------------


def test_calls_in_flight_before_a_downshift_do_not_count_again() -> None:
    breaker = opened_at_balanced()
    state = breaker.to_state()
    for now in range(1001, 1011):
        assert fail(breaker, "creative", float(now)) is None  # creative calls still in flight
    assert breaker.to_state() == state
    # They did not start a balanced streak either.
    assert fail(breaker, "balanced", 1020.0) is None
    assert fail(breaker, "balanced", 1021.0) is None


def test_other_modes_never_count() -> None:
    breaker = ModelBreaker(MODEL, DEFAULTS)
    for mode in ("balanced", "fast"):
        assert fail_times(breaker, mode, 10, 1.0) is None  # replicas downshifted locally
    assert breaker.state == "closed"
    half_open = opened_at_balanced()
    half_open.on_tick(1300.0)
    assert fail_times(half_open, "fast", 10, 1301.0) is None
    assert half_open.state == "half_open"


# --- ticks ----------------------------------------------------------------------------------


def test_ticks_alone_end_the_hold_at_until_inclusive() -> None:
    breaker = opened_at_balanced(now=1000.0)
    assert [breaker.on_tick(now) for now in (1000.0, 1200.0, 1299.999)] == [None, None, None]
    probing = breaker.on_tick(1300.0)
    assert probing is not None
    assert probing.state == "half_open"
    assert breaker.on_tick(1300.0) is None
    assert breaker.on_tick(1301.0) is None


def test_a_late_tick_starts_a_full_probe_round() -> None:
    breaker = opened_at_balanced(now=1000.0)
    probing = breaker.on_tick(5000.0)  # the worker was down for an hour
    assert probing is not None
    assert probing.until == 5300.0


def test_ticks_never_change_a_closed_breaker() -> None:
    breaker = ModelBreaker(MODEL, DEFAULTS)
    assert [breaker.on_tick(float(now)) for now in range(0, 10_000, 100)] == [None] * 100


def test_an_undecided_probe_round_is_renewed_with_a_fresh_budget() -> None:
    breaker = opened_at_balanced(now=1000.0)
    breaker.on_tick(1300.0)
    assert fail(breaker, "creative", 1301.0) is None  # one probe failure, then silence
    assert breaker.on_tick(1599.0) is None
    renewed = breaker.on_tick(1600.0)
    assert renewed is not None
    assert (renewed.state, renewed.mode, renewed.probe_mode, renewed.until, renewed.epoch) == (
        "half_open",
        "balanced",
        "creative",
        1900.0,
        3,
    )
    assert renewed.reason == "no probe decision within 300 s: probing creative again"
    assert fail(breaker, "creative", 1601.0) is None  # the earlier failure no longer counts
    reopened = fail(breaker, "creative", 1602.0)
    assert reopened is not None
    assert reopened.mode == "fast"


# --- per-model settings ---------------------------------------------------------------------


def test_a_model_s_own_values_override_the_group_s(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "FRAGRANCE_OPS_BREAKER__MODELS", '{"qwen-big": {"failure_threshold": 5, "open_s": 60}}'
    )
    settings = Settings().breaker
    big = BreakerPolicy.from_settings(settings.for_model("qwen-big"))
    assert (big.failure_threshold, big.open_s, big.ttl_closed_s) == (5, 60.0, 3600.0)
    assert settings.for_model("qwen-small") is settings
    assert BreakerPolicy.from_settings(settings.for_model("qwen-small")) == DEFAULTS
    breaker = ModelBreaker("qwen-big", big)
    assert fail_times(breaker, "creative", 4, 1000.0) is None
    tripped = fail(breaker, "creative", 1000.0)
    assert tripped is not None
    assert tripped.until == 1060.0


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ({"m": {"tick_interval_s": 1.0}}, "tick_interval_s cannot be set per model"),
        ({"m": {"no_such": 1}}, "no_such cannot be set per model"),
        ({"m": {"open_s": 0}}, "models.m: open_s: Input should be greater than 0"),
        ({"m": {"probe_calls": 1}}, "probe_failures_to_reopen must not exceed probe_calls"),
    ],
)
def test_meaningless_per_model_values_are_refused_naming_the_model(
    models: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        BreakerSettings(models=models)


# --- time recovery (the guide's literal rule) -----------------------------------------------

TIME = dataclasses.replace(DEFAULTS, recovery="time")


def test_probe_recovery_is_the_default_and_the_environment_chooses_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert (Settings().breaker.recovery, DEFAULTS.recovery) == ("probe", "probe")
    monkeypatch.setenv("FRAGRANCE_OPS_BREAKER__RECOVERY", "time")
    assert ModelBreaker.from_settings(MODEL, Settings().breaker).policy == TIME
    monkeypatch.setenv("FRAGRANCE_OPS_BREAKER__RECOVERY", "sometimes")
    with pytest.raises(ValidationError):
        Settings()
    with pytest.raises(ValueError, match="recovery must be"):
        BreakerPolicy(recovery="sometimes")  # type: ignore[arg-type]


def test_time_recovery_returns_to_creative_after_open_s_with_no_traffic() -> None:
    breaker = opened_at_balanced(TIME, now=1000.0)
    assert breaker.on_tick(1299.9) is None
    recovered = breaker.on_tick(1300.0)  # the first tick at until: no call was made
    assert recovered is not None
    assert (recovered.state, recovered.mode, recovered.cache_ttl_s, recovered.until) == (
        "closed",
        "creative",
        3600.0,
        None,
    )
    assert (recovered.probe_mode, recovered.probe_calls, recovered.epoch) == (None, None, 2)
    assert recovered.reason == "held balanced for 300 s: recovered"
    assert breaker.on_tick(5000.0) is None  # closed stays closed


def test_time_recovery_from_fast_goes_straight_to_creative_and_can_trip_again() -> None:
    breaker = opened_at_balanced(TIME, now=1000.0)
    tripped = fail_times(breaker, "balanced", 3, 1100.0)  # a trip while degraded
    assert tripped is not None
    assert (tripped.mode, tripped.until) == ("fast", 1400.0)
    assert breaker.on_tick(1300.0) is None  # the hold restarted at the second trip
    recovered = breaker.on_tick(1400.0)
    assert recovered is not None
    assert (recovered.state, recovered.mode) == ("closed", "creative")
    again = fail_times(breaker, "creative", 3, 1401.0)
    assert again is not None
    assert (again.state, again.mode, again.cache_ttl_s) == ("open", "balanced", 300.0)


# As stored before recovery= and per-model settings existed (to_state at 2bc0914, version 1:
# open at balanced until 1300 after 3 failures in creative and 1 in balanced, ids c0-c3).
STORED_BEFORE_TIME_RECOVERY: dict[str, Any] = {
    "version": 1,
    "state": "open",
    "mode": "balanced",
    "until": 1300.0,
    "probe_mode": None,
    "epoch": 1,
    "reason": "3 consecutive failures in creative: downshift to balanced",
    "streak": [1, 0],
    "window": "f",
    "probes": [0, 0, 0],
    "seen": "epgeVWvV1j9D8ACjb210TgVPfQ2eUFxdWH8gNy/NmcY=",
}


@pytest.mark.parametrize(
    ("policy", "after_hold"),
    [(DEFAULTS, ("half_open", "balanced", "creative")), (TIME, ("closed", "creative", None))],
    ids=["probe", "time"],
)
def test_a_state_stored_before_time_recovery_reads_and_replays_the_same(
    policy: BreakerPolicy, after_hold: tuple[str, str, str | None]
) -> None:
    def replay() -> list[Transition | None]:
        breaker = ModelBreaker.from_state(MODEL, policy, dict(STORED_BEFORE_TIME_RECOVERY))
        assert breaker.to_state() == STORED_BEFORE_TIME_RECOVERY  # nothing lost or added
        return [
            fail(breaker, "balanced", 1100.0, call_id="c3"),  # seen before the restart
            fail(breaker, "balanced", 1100.0, call_id="c4"),  # streak 2 of 3: no trip
            breaker.on_tick(1299.0),
            breaker.on_tick(1300.0),
        ]

    first = replay()
    assert first == replay()  # same state and inputs, same decisions
    assert first[:3] == [None, None, None]
    ended = first[3]
    assert ended is not None
    assert (ended.state, ended.mode, ended.probe_mode) == after_hold
    assert ended.epoch == 2


def test_a_probing_breaker_restored_under_time_recovery_closes_at_its_until() -> None:
    probing = opened_at_balanced(now=1000.0)
    assert probing.on_tick(1300.0) is not None  # half-open under probe recovery
    restored_under_time = restored(probing, TIME)
    assert restored_under_time.on_tick(1599.0) is None
    closed = restored_under_time.on_tick(1600.0)
    assert closed is not None
    assert (closed.state, closed.mode, closed.cache_ttl_s) == ("closed", "creative", 3600.0)


# --- trip options ---------------------------------------------------------------------------


def test_failure_rate_is_judged_from_the_minimum_calls_on() -> None:
    breaker = ModelBreaker(MODEL, BreakerPolicy(trip_on="rate"))
    assert fail_times(breaker, "creative", 9, 1.0) is None  # 9 calls < rate_min_calls
    tripped = fail(breaker, "creative", 2.0)
    assert tripped is not None
    assert tripped.reason == (
        "10 of the last 10 calls failed in creative (100%): downshift to balanced"
    )


def test_failure_rate_threshold_is_inclusive_and_exact() -> None:
    breaker = ModelBreaker(
        MODEL, BreakerPolicy(trip_on="rate", rate_window=10, failure_rate=0.3, rate_min_calls=10)
    )
    for _ in range(7):
        assert succeed(breaker, "creative", 1.0) is None
    assert fail(breaker, "creative", 1.0) is None
    assert fail(breaker, "creative", 1.0) is None
    tripped = fail(breaker, "creative", 1.0)  # 3 / 10 == 0.3, though 0.3 * 10 > 3
    assert tripped is not None
    assert tripped.reason.startswith("3 of the last 10 calls failed in creative (30%)")


def test_failure_rate_below_the_threshold_does_not_trip() -> None:
    breaker = ModelBreaker(MODEL, BreakerPolicy(trip_on="rate"))
    for _ in range(10):  # 40% failed, forever, with no three in a row mattering
        assert fail(breaker, "creative", 1.0) is None
        assert succeed(breaker, "creative", 1.0) is None
        assert fail(breaker, "creative", 1.0) is None
        for _ in range(2):
            assert succeed(breaker, "creative", 1.0) is None


def test_the_rate_window_slides() -> None:
    breaker = ModelBreaker(
        MODEL, BreakerPolicy(trip_on="rate", rate_window=4, failure_rate=0.5, rate_min_calls=4)
    )
    for _ in range(3):
        assert succeed(breaker, "creative", 1.0) is None
    assert fail(breaker, "creative", 1.0) is None  # 1 of 4
    tripped = fail(breaker, "creative", 1.0)  # 2 of the last 4 (of 5 calls in all)
    assert tripped is not None
    assert tripped.reason.startswith("2 of the last 4 calls failed in creative (50%)")


def test_the_rate_window_restarts_after_a_trip() -> None:
    breaker = ModelBreaker(MODEL, BreakerPolicy(trip_on="rate"))
    fail_times(breaker, "creative", 10, 1.0)
    assert fail_times(breaker, "balanced", 9, 2.0) is None
    tripped = fail(breaker, "balanced", 3.0)
    assert tripped is not None
    assert tripped.mode == "fast"


def test_slow_successes_count_as_failures_when_configured() -> None:
    breaker = ModelBreaker(MODEL, BreakerPolicy(slow_call_ms=2000.0))
    assert succeed(breaker, "creative", 1.0, latency_ms=2000.0) is None  # not slower: ok
    assert fail(breaker, "creative", 1.0) is None
    assert succeed(breaker, "creative", 1.0, latency_ms=2000.5) is None
    tripped = fail(breaker, "creative", 1.0)
    assert tripped is not None
    assert tripped.reason == (
        "3 consecutive failures in creative (1 slower than 2000 ms): downshift to balanced"
    )


def test_without_a_slow_call_threshold_latency_never_counts() -> None:
    breaker = ModelBreaker(MODEL, DEFAULTS)
    for _ in range(10):
        assert succeed(breaker, "creative", 1.0, latency_ms=1e9) is None


def test_slow_probes_are_probe_failures() -> None:
    policy = BreakerPolicy(slow_call_ms=500.0)
    breaker = opened_at_balanced(policy)
    breaker.on_tick(1300.0)
    assert succeed(breaker, "creative", 1301.0, latency_ms=900.0) is None
    reopened = succeed(breaker, "creative", 1302.0, latency_ms=901.0)
    assert reopened is not None
    assert reopened.reason == (
        "2 probe calls failed in creative (2 slower than 500 ms): downshift to fast"
    )


def test_slow_calls_in_the_failure_rate() -> None:
    policy = BreakerPolicy(trip_on="rate", slow_call_ms=100.0, rate_min_calls=4, rate_window=4)
    breaker = ModelBreaker(MODEL, policy)
    assert succeed(breaker, "creative", 1.0, latency_ms=50.0) is None
    assert succeed(breaker, "creative", 1.0, latency_ms=150.0) is None
    assert succeed(breaker, "creative", 1.0, latency_ms=50.0) is None
    tripped = fail(breaker, "creative", 1.0)
    assert tripped is not None
    assert tripped.reason.startswith(
        "2 of the last 4 calls failed in creative (50%) (1 slower than 100 ms)"
    )


# --- duplicates -----------------------------------------------------------------------------


def test_a_repeated_call_id_counts_once() -> None:
    breaker = ModelBreaker(MODEL, DEFAULTS)
    for _ in range(5):
        assert fail(breaker, "creative", 1.0, call_id="call-1") is None
    assert fail(breaker, "creative", 1.0, call_id="call-2") is None
    assert fail(breaker, "creative", 1.0, call_id="call-3") is not None


def test_a_repeated_probe_counts_once() -> None:
    breaker = opened_at_balanced()
    breaker.on_tick(1300.0)
    for _ in range(3):
        assert fail(breaker, "creative", 1301.0, call_id="probe-1") is None
    assert breaker.state == "half_open"


def test_outcomes_without_call_id_are_not_deduplicated() -> None:
    breaker = ModelBreaker(MODEL, DEFAULTS)
    assert fail_times(breaker, "creative", 3, 1.0) is not None


def test_dedupe_remembers_the_last_window_of_ids_first_in_first_out() -> None:
    breaker = ModelBreaker(MODEL, BreakerPolicy(failure_threshold=2, dedupe_window=2))
    assert fail(breaker, "creative", 1.0, call_id="a") is None  # streak 1
    assert succeed(breaker, "creative", 1.0, call_id="b") is None  # streak 0
    assert succeed(breaker, "creative", 1.0, call_id="c") is None  # remembers b, c
    assert fail(breaker, "creative", 1.0, call_id="a") is None  # forgotten: counts, streak 1
    assert fail(breaker, "creative", 1.0, call_id="c") is None  # remembered: ignored
    tripped = fail(breaker, "creative", 1.0, call_id="d")
    assert tripped is not None
    assert tripped.reason.startswith("2 consecutive failures")


def test_a_dedupe_window_of_zero_disables_deduplication() -> None:
    breaker = ModelBreaker(MODEL, BreakerPolicy(dedupe_window=0))
    for _ in range(2):
        assert fail(breaker, "creative", 1.0, call_id="same") is None
    assert fail(breaker, "creative", 1.0, call_id="same") is not None
    assert breaker.to_state()["seen"] == ""


# --- state ----------------------------------------------------------------------------------


def test_a_restart_mid_downshift_neither_forgets_nor_repeats_it() -> None:
    breaker = opened_at_balanced(now=1000.0)
    saved = roundtrip(breaker.to_state())
    after_restart = ModelBreaker.from_state(MODEL, DEFAULTS, saved)
    assert after_restart.control() == breaker.control()
    # Replayed creative failures (the stream re-reads from its last commit) change nothing.
    assert fail_times(after_restart, "creative", 5, 1001.0) is None
    assert (after_restart.mode, after_restart.epoch) == ("balanced", 1)
    assert after_restart.on_tick(1299.0) is None
    probing = after_restart.on_tick(1300.0)
    assert probing is not None
    assert (probing.state, probing.epoch) == ("half_open", 2)
    assert [after_restart.on_tick(now) for now in (1300.0, 1301.0, 1599.0)] == [None] * 3
    # Restarted after the half-open state was saved: no second half-open transition.
    again = restored(after_restart)
    assert [again.on_tick(now) for now in (1300.0, 1301.0, 1599.0)] == [None] * 3
    # Restarted from the older state (the half-open event published, its state not saved):
    # the same logical change is the same value, so the compacted topic holds one truth.
    replayed = ModelBreaker.from_state(MODEL, DEFAULTS, saved).on_tick(1300.0)
    assert replayed == probing


def test_a_transition_replayed_from_the_same_state_is_the_same_value() -> None:
    breaker = ModelBreaker(MODEL, DEFAULTS)
    fail_times(breaker, "creative", 2, 1.0)
    state = roundtrip(breaker.to_state())
    first = fail(breaker, "creative", 5.0, call_id="x")
    second = fail(ModelBreaker.from_state(MODEL, DEFAULTS, state), "creative", 5.0, call_id="x")
    assert first is not None
    assert first == second


def test_duplicates_are_remembered_across_a_restart() -> None:
    breaker = ModelBreaker(MODEL, DEFAULTS)
    fail(breaker, "creative", 1.0, call_id="call-1")
    fail(breaker, "creative", 1.0, call_id="call-2")
    after_restart = restored(breaker)  # fewer ids than the window: all of them kept
    assert fail(after_restart, "creative", 2.0, call_id="call-1") is None
    assert fail(after_restart, "creative", 2.0, call_id="call-2") is None
    assert fail(after_restart, "creative", 2.0, call_id="call-3") is not None


def test_the_state_is_compact() -> None:
    breaker = ModelBreaker(MODEL, DEFAULTS)
    for index in range(5000):
        succeed(breaker, "creative", 1.0, call_id=f"{index:08d}-6f1c-4b7e-9a55-2d0c8e1f3a7b")
    assert len(orjson.dumps(breaker.to_state())) < 12_000  # 1,024 ids: 8 bytes each, base64


def test_a_smaller_policy_on_restore_keeps_the_newest_counts() -> None:
    rate = BreakerPolicy(trip_on="rate", dedupe_window=10)
    breaker = ModelBreaker(MODEL, rate)
    for index in range(10):
        (fail if index < 4 else succeed)(breaker, "creative", 1.0, call_id=str(index))
    smaller = BreakerPolicy(
        trip_on="rate", rate_window=4, rate_min_calls=4, failure_rate=0.5, dedupe_window=2
    )
    after_restart = ModelBreaker.from_state(MODEL, smaller, roundtrip(breaker.to_state()))
    assert after_restart.to_state()["window"] == "oooo"
    assert fail(after_restart, "creative", 2.0, call_id="9") is None  # remembered: ignored
    assert fail(after_restart, "creative", 2.0, call_id="0") is None  # forgotten: 1 of 4
    assert fail(after_restart, "creative", 2.0, call_id="10") is not None  # 2 of 4


def test_unknown_state_versions_are_refused() -> None:
    state = ModelBreaker(MODEL, DEFAULTS).to_state() | {"version": 0}
    with pytest.raises(ValueError, match="version"):
        ModelBreaker.from_state(MODEL, DEFAULTS, state)


@pytest.mark.parametrize(
    "change",
    [
        {"mode": "balanced"},  # closed while degraded
        {"state": "open"},  # open without until, at creative
        {"state": "half_open", "mode": "fast", "until": 5.0, "probe_mode": "creative"},
        {"mode": "turbo"},
    ],
)
def test_inconsistent_states_are_refused(change: dict[str, Any]) -> None:
    state = ModelBreaker(MODEL, DEFAULTS).to_state() | change
    with pytest.raises(ValueError, match="breaker state"):
        ModelBreaker.from_state(MODEL, DEFAULTS, state)


# --- properties -----------------------------------------------------------------------------

operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("outcome"),
            st.booleans(),
            st.sampled_from(MODES),
            st.sampled_from([10.0, 900.0]),
            st.one_of(st.none(), st.integers(0, 30).map(str)),
        ),
        st.tuples(st.just("tick"), st.sampled_from([0.0, 1.0, 5.0, 10.0])),
    ),
    max_size=120,
)


@st.composite
def policies(draw: st.DrawFn) -> BreakerPolicy:
    probe_calls = draw(st.integers(1, 4))
    rate_window = draw(st.integers(1, 8))
    return BreakerPolicy(
        failure_threshold=draw(st.integers(1, 4)),
        trip_on=draw(st.sampled_from(["consecutive", "rate"])),
        rate_window=rate_window,
        failure_rate=draw(st.sampled_from([0.25, 0.5, 1.0])),
        rate_min_calls=draw(st.integers(1, rate_window)),
        slow_call_ms=draw(st.sampled_from([None, 500.0])),
        open_s=10.0,
        probe_calls=probe_calls,
        probe_failures_to_reopen=draw(st.integers(1, probe_calls)),
        dedupe_window=draw(st.integers(0, 8)),
    )


def run(breaker: ModelBreaker, operation: tuple[Any, ...], clock: list[float]) -> Transition | None:
    if operation[0] == "tick":
        clock[0] += operation[1]
        return breaker.on_tick(clock[0])
    _, ok, mode, latency_ms, call_id = operation
    return breaker.on_outcome(ok, mode, latency_ms, clock[0], call_id)


def check_invariants(before: Transition, after: Transition, policy: BreakerPolicy) -> None:
    assert after.epoch == before.epoch + 1
    assert (after.state == "closed") == (after.mode == "creative") == (after.until is None)
    assert after.cache_ttl_s == (
        policy.ttl_closed_s if after.state == "closed" else policy.ttl_degraded_s
    )
    half_open = after.state == "half_open"
    assert (after.probe_mode is not None) == (after.probe_calls is not None) == half_open
    if half_open:
        assert after.probe_mode == step_up(after.mode)
    # One step at a time; opening never steps up.
    moved = MODES.index(after.mode) - MODES.index(before.mode)
    assert abs(moved) <= 1
    if after.state == "open":
        assert moved >= 0


@settings(max_examples=300, deadline=None)
@given(ops=operations, cut=st.integers(0, 120), policy=policies())
def test_state_round_trips_exactly_and_transitions_keep_the_invariants(
    ops: list[tuple[Any, ...]], cut: int, policy: BreakerPolicy
) -> None:
    uncrashed, crashed = ModelBreaker(MODEL, policy), ModelBreaker(MODEL, policy)
    clock_a, clock_b = [0.0], [0.0]
    for index, operation in enumerate(ops):
        if index == cut:
            crashed = restored(crashed, policy)
            assert crashed.to_state() == uncrashed.to_state()
        before = uncrashed.control()
        transition = run(uncrashed, operation, clock_a)
        assert run(crashed, operation, clock_b) == transition
        if transition is None:
            assert uncrashed.control() == before
        else:
            assert transition == uncrashed.control()
            check_invariants(before, transition, policy)
            LlmControl(**dataclasses.asdict(transition), ts=clock_a[0])
    assert crashed.to_state() == uncrashed.to_state()


@settings(max_examples=200, deadline=None)
@given(ops=operations, bounds=st.tuples(st.integers(0, 120), st.integers(0, 120)))
def test_replaying_outcomes_with_call_ids_changes_nothing(
    ops: list[tuple[Any, ...]], bounds: tuple[int, int]
) -> None:
    policy = BreakerPolicy(open_s=10.0, dedupe_window=len(ops) + 1)
    # Unique ids, as the SDK sets them.
    outcomes = [
        (*operation[:4], f"call-{index}")
        for index, operation in enumerate(ops)
        if operation[0] == "outcome"
    ]
    breaker, clock = ModelBreaker(MODEL, policy), [0.0]
    for operation in outcomes:
        run(breaker, operation, clock)
    state = breaker.to_state()
    low, high = sorted(bounds)
    for operation in outcomes[low:high]:
        assert run(breaker, operation, clock) is None
    assert breaker.to_state() == state
