"""The entropy schedule against its closed forms, its emission policy, retunes and state."""

from __future__ import annotations

import itertools
import math
import os
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from config.settings import EntropySettings, Settings, run_overrides
from rules.entropy_schedule import EntropyEmitter, EntropySchedule


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("FRAGRANCE_OPS_"):
            monkeypatch.delenv(name)


def closed_form(kind: str, start: float, end: float, steps: int, step: int) -> float:
    """The formulas as the guide and the issue state them, computed independently."""
    progress = min(step, steps) / steps
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))
    return start + (end - start) * progress


def roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = orjson.loads(orjson.dumps(state))
    return result


def test_defaults_are_the_operations_guide_numbers() -> None:
    entropy = Settings().entropy
    assert (entropy.start, entropy.end, entropy.steps, entropy.kind) == (
        0.01,
        0.001,
        10_000,
        "cosine",
    )
    assert entropy.emit_tolerance_rel == 0.05
    assert (entropy.min_coef, entropy.max_coef) == (0.0, 0.1)


def test_environment_and_per_run_overrides_reach_the_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FRAGRANCE_OPS_ENTROPY__KIND", "linear")
    monkeypatch.setenv("FRAGRANCE_OPS_ENTROPY__STEPS", "2000")
    base = Settings()
    assert (base.entropy.kind, base.entropy.steps) == ("linear", 2000)
    run = run_overrides(base, {"entropy.kind": "cosine", "entropy.start": 0.05})
    assert (run.entropy.kind, run.entropy.start, run.entropy.steps) == ("cosine", 0.05, 2000)


@pytest.mark.parametrize(
    "values",
    [
        {"kind": "exponential"},
        {"steps": 0},
        {"start": -0.1},
        {"start": math.nan},
        {"min_coef": 0.05, "max_coef": 0.01, "start": 0.03, "end": 0.03},
        {"start": 0.2},  # outside [min_coef, max_coef]
        {"end": 0.0005, "min_coef": 0.001},
    ],
)
def test_inconsistent_entropy_settings_are_refused(values: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        EntropySettings(**values)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_default_schedules_match_the_closed_form_at_every_step(kind: str) -> None:
    schedule = EntropySchedule.from_settings(EntropySettings(kind=kind))
    for step in [*range(0, 10_001), 10_001, 12_345, 10**9]:
        expected = closed_form(kind, 0.01, 0.001, 10_000, step)
        assert abs(schedule.value(step) - expected) <= 1e-12, step


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(["cosine", "linear"]),
    start=st.floats(0.0, 0.1),
    end=st.floats(0.0, 0.1),
    steps=st.integers(1, 10**7),
    fraction=st.floats(0.0, 3.0),
)
def test_any_schedule_matches_the_closed_form(
    kind: str, start: float, end: float, steps: int, fraction: float
) -> None:
    schedule = EntropySchedule(start=start, end=end, steps=steps, kind=kind)  # type: ignore[arg-type]
    step = int(fraction * steps)
    assert abs(schedule.value(step) - closed_form(kind, start, end, steps, step)) <= 1e-12


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_endpoints_are_exact_and_the_end_holds(kind: str) -> None:
    schedule = EntropySchedule(start=0.01, end=0.001, steps=10_000, kind=kind)  # type: ignore[arg-type]
    assert schedule.value(0) == 0.01
    assert schedule.value(10_000) == 0.001
    assert schedule.value(50_000) == 0.001
    # Halfway both curves are at the midpoint; a quarter in, cosine has decayed less.
    assert schedule.value(5_000) == pytest.approx(0.0055, rel=1e-12)
    assert schedule.value(2_500) == pytest.approx(
        0.0055 + 0.0045 * (math.sqrt(0.5) if kind == "cosine" else 0.5), rel=1e-12
    )


def test_negative_steps_are_refused() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        EntropySchedule(0.01, 0.001, 100).value(-1)


# --- emission ------------------------------------------------------------------------------


def test_first_metric_emits_then_only_moves_beyond_the_tolerance() -> None:
    emitter = EntropyEmitter(EntropySettings())
    emitted = {step: v for step in range(0, 12_000) if (v := emitter.observe(step)) is not None}
    schedule = EntropySchedule.from_settings(EntropySettings())
    assert next(iter(emitted)) == 0
    assert emitted[0] == 0.01
    steps = sorted(emitted)
    for previous, step in itertools.pairwise(steps):
        assert emitted[step] == schedule.value(step)
        if step == schedule.steps:  # the end value is sent exactly when first reached
            assert emitted[step] == schedule.end
            continue
        assert abs(emitted[step] - emitted[previous]) > 0.05 * emitted[previous]
        # The step before each emission was still within the tolerance of the last value.
        assert abs(schedule.value(step - 1) - emitted[previous]) <= 0.05 * emitted[previous]
    # Far fewer commands than metrics, and the held end value is reached.
    assert 20 < len(emitted) < 100
    assert emitted[steps[-1]] == schedule.value(11_999) == schedule.end


def test_a_higher_attempt_always_emits_even_without_change() -> None:
    emitter = EntropyEmitter(EntropySettings())
    assert emitter.observe(100) is not None
    assert emitter.observe(101) is None
    # A rollback to step 50 under attempt 1: the restored trainer needs the value at once.
    assert emitter.observe(51, attempt=1) == EntropySchedule(0.01, 0.001, 10_000).value(51)
    assert emitter.observe(52, attempt=1) is None


def test_zero_tolerance_emits_every_change() -> None:
    emitter = EntropyEmitter(EntropySettings(emit_tolerance_rel=0.0, steps=10))
    values = [emitter.observe(step) for step in range(15)]
    assert all(v is not None for v in values[:11])
    assert values[11:] == [None] * 4  # held at the end value: nothing moves


def test_duplicates_and_older_positions_change_nothing() -> None:
    emitter = EntropyEmitter(EntropySettings(emit_tolerance_rel=0.0))
    for step in range(10):
        emitter.observe(step, attempt=1)
    before = emitter.to_state()
    assert emitter.observe(9, attempt=1) is None
    assert emitter.observe(3, attempt=1) is None
    assert emitter.observe(500, attempt=0) is None  # an older attempt, however late its step
    assert emitter.to_state() == before


# --- retunes --------------------------------------------------------------------------------


def test_a_retune_rescales_the_schedule_and_is_sent_at_once() -> None:
    settings_ = EntropySettings()
    schedule = EntropySchedule.from_settings(settings_)
    emitter = EntropyEmitter(settings_)
    emitter.observe(2000)
    sent = emitter.apply_retune(0.02, step=2000)
    assert sent == pytest.approx(0.02, rel=1e-15)
    scale = 0.02 / schedule.value(2000)
    assert emitter.scale == scale
    for step in (2001, 5000, 9999, 10_000, 20_000):
        assert emitter.value(step) == pytest.approx(schedule.value(step) * scale, rel=1e-15)
    # The tolerance is measured from the retuned value: the next metric sends nothing.
    assert emitter.observe(2001) is None
    assert emitter.last_sent == sent


def test_retuned_values_are_clamped_to_the_bounds() -> None:
    emitter = EntropyEmitter(EntropySettings(max_coef=0.03))
    emitter.observe(0)
    # 0.5 is beyond max_coef: it counts as 0.03, so the decay resumes from 0.03.
    assert emitter.apply_retune(0.5, step=0) == 0.03
    assert emitter.value(5000) == pytest.approx(0.03 * 0.0055 / 0.01, rel=1e-12)
    emitter = EntropyEmitter(EntropySettings(max_coef=0.03))
    emitter.apply_retune(0.025, step=9000)  # scale ~19: early steps would exceed the bound
    assert emitter.value(0) == 0.03
    emitter = EntropyEmitter(EntropySettings(min_coef=0.0008))
    assert emitter.apply_retune(0.0, step=0) == pytest.approx(0.0008, rel=1e-15)


def test_a_retune_where_the_schedule_is_zero_pins_the_value() -> None:
    emitter = EntropyEmitter(EntropySettings(end=0.0, steps=100))
    assert emitter.apply_retune(0.004, step=150) == 0.004
    assert emitter.value(10) == 0.004
    assert emitter.value(1000) == 0.004
    # A later retune where the schedule is positive returns to scaling.
    assert emitter.apply_retune(0.005, step=50, attempt=1) == pytest.approx(0.005, rel=1e-15)
    assert emitter.value(100) == 0.0


def test_replayed_retunes_are_ignored_and_retunes_survive_rollbacks() -> None:
    emitter = EntropyEmitter(EntropySettings())
    emitter.observe(3000)
    assert emitter.apply_retune(0.02, step=3000) is not None
    state = emitter.to_state()
    assert emitter.apply_retune(0.02, step=3000) is None
    assert emitter.apply_retune(0.05, step=2999) is None  # older than the last retune
    assert emitter.to_state() == state
    scaled = emitter.value(2500)
    assert emitter.observe(2501, attempt=1) == emitter.value(2501)
    assert scaled > EntropySchedule(0.01, 0.001, 10_000).value(2500)


def test_retune_values_must_be_finite_and_non_negative() -> None:
    emitter = EntropyEmitter(EntropySettings())
    for bad in (math.nan, math.inf, -0.01):
        with pytest.raises(ValueError, match="finite"):
            emitter.apply_retune(bad, step=0)


# --- state ----------------------------------------------------------------------------------

operations = st.lists(
    st.one_of(
        st.tuples(st.just("metric"), st.integers(0, 3), st.integers(0, 12_000)),
        st.tuples(
            st.just("retune"),
            st.integers(0, 3),
            st.integers(0, 12_000),
            st.floats(0.0, 0.2),
        ),
    ),
    max_size=40,
)


def apply(emitter: EntropyEmitter, operation: tuple[Any, ...]) -> float | None:
    if operation[0] == "metric":
        return emitter.observe(operation[2], attempt=operation[1])
    return emitter.apply_retune(operation[3], step=operation[2], attempt=operation[1])


@settings(max_examples=200, deadline=None)
@given(ops=operations, cut=st.integers(0, 40), kind=st.sampled_from(["cosine", "linear"]))
def test_state_round_trips_exactly(ops: list[tuple[Any, ...]], cut: int, kind: str) -> None:
    entropy = EntropySettings(kind=kind, steps=8000)
    uncrashed, crashed = EntropyEmitter(entropy), EntropyEmitter(entropy)
    for index, operation in enumerate(ops):
        if index == cut:
            crashed = EntropyEmitter.from_state(roundtrip(crashed.to_state()), entropy)
            assert crashed.to_state() == uncrashed.to_state()
        assert apply(crashed, operation) == apply(uncrashed, operation)
    assert crashed.to_state() == uncrashed.to_state()


@settings(max_examples=200, deadline=None)
@given(ops=operations, bounds=st.tuples(st.integers(0, 40), st.integers(0, 40)))
def test_replaying_any_prefix_changes_nothing(
    ops: list[tuple[Any, ...]], bounds: tuple[int, int]
) -> None:
    emitter = EntropyEmitter(EntropySettings())
    for operation in ops:
        apply(emitter, operation)
    state = emitter.to_state()
    low, high = sorted(bounds)
    for operation in ops[low:high]:
        assert apply(emitter, operation) is None
    assert emitter.to_state() == state


def test_unknown_state_versions_are_refused() -> None:
    state = EntropyEmitter(EntropySettings()).to_state() | {"version": 99}
    with pytest.raises(ValueError, match="version"):
        EntropyEmitter.from_state(state, EntropySettings())
