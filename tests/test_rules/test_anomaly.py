"""Anomaly detection: thresholds, baselines, warmup, patience, cooldown, replays, state."""

from __future__ import annotations

import math
import os
import random
import statistics
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from config.settings import AnomalySettings, Settings
from rules.anomaly import AnomalyDetector, Verdict

NO_WARMUP = AnomalySettings(warmup_steps=0)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("FRAGRANCE_OPS_"):
            monkeypatch.delenv(name)


def feed(
    detector: AnomalyDetector, values: list[tuple[float, float]], first_step: int = 0
) -> list[Verdict]:
    verdicts = []
    for offset, (loss, reward) in enumerate(values):
        verdict = detector.observe(first_step + offset, loss, reward)
        assert verdict is not None
        verdicts.append(verdict)
    return verdicts


def last_verdict(anomaly: AnomalySettings, values: list[tuple[float, float]]) -> Verdict:
    return feed(AnomalyDetector(anomaly), values)[-1]


def test_defaults_are_the_operations_guide_numbers() -> None:
    anomaly = Settings().anomaly
    assert (anomaly.loss_spike_ratio, anomaly.reward_drop_ratio, anomaly.baseline) == (
        2.0,
        0.5,
        "previous",
    )
    assert (anomaly.warmup_steps, anomaly.patience, anomaly.cooldown_steps) == (10, 1, 100)
    assert (anomaly.ema_alpha, anomaly.median_window) == (0.1, 20)


def test_environment_sets_the_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRAGRANCE_OPS_ANOMALY__BASELINE", "median")
    monkeypatch.setenv("FRAGRANCE_OPS_ANOMALY__PATIENCE", "3")
    anomaly = Settings().anomaly
    assert (anomaly.baseline, anomaly.patience) == ("median", 3)


@pytest.mark.parametrize(
    "values",
    [
        {"loss_spike_ratio": 1.0},
        {"reward_drop_ratio": 1.0},
        {"reward_drop_ratio": -0.1},
        {"baseline": "mean"},
        {"patience": 0},
        {"ema_alpha": 0.0},
    ],
)
def test_meaningless_thresholds_are_refused(values: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        AnomalySettings(**values)


# --- thresholds -----------------------------------------------------------------------------


def test_loss_spike_threshold_is_inclusive() -> None:
    assert last_verdict(NO_WARMUP, [(0.5, 1.0), (1.0, 1.0)]).anomalous
    assert not last_verdict(NO_WARMUP, [(0.5, 1.0), (0.999, 1.0)]).anomalous


def test_reward_drop_threshold_is_inclusive() -> None:
    assert last_verdict(NO_WARMUP, [(1.0, 4.0), (1.0, 2.0)]).anomalous
    assert not last_verdict(NO_WARMUP, [(1.0, 4.0), (1.0, 2.001)]).anomalous


def test_reasons_name_the_anomaly_and_its_baseline() -> None:
    spike = last_verdict(NO_WARMUP, [(0.51, 3.2), (1.224, 3.2)])
    assert spike.reason == "loss spike 2.4x baseline 0.51"
    drop = last_verdict(NO_WARMUP, [(0.51, 3.2), (0.51, 1.312)])
    assert drop.reason == "reward drop to 41% of baseline 3.2"
    both = last_verdict(NO_WARMUP, [(0.51, 3.2), (1.224, 1.312)])
    assert both.reason == "loss spike 2.4x baseline 0.51; reward drop to 41% of baseline 3.2"
    assert both.values() == {
        "loss": 1.224,
        "reward": 1.312,
        "baseline_loss": 0.51,
        "baseline_reward": 3.2,
    }
    normal = last_verdict(NO_WARMUP, [(0.51, 3.2), (0.5, 3.0)])
    assert (normal.anomalous, normal.act, normal.reason, normal.streak_start) == (
        False,
        False,
        "",
        None,
    )


@pytest.mark.parametrize(
    ("baseline", "reward", "anomalous"),
    [
        (-2.0, -3.0, True),  # fell by half the baseline's size
        (-2.0, -2.9, False),
        (-2.0, -10.0, True),
        (-2.0, 1.0, False),  # an improvement
        (-2.0, -1.0, False),
        (2.0, -1.0, True),  # from positive to negative: below 50% of 2
        (0.0, -5.0, False),  # no relative scale at zero
        (0.0, 0.0, False),
    ],
)
def test_reward_drops_against_zero_and_negative_baselines(
    baseline: float, reward: float, anomalous: bool
) -> None:
    verdict = last_verdict(NO_WARMUP, [(1.0, baseline), (1.0, reward)])
    assert verdict.anomalous is anomalous
    if anomalous and baseline < 0:
        assert verdict.reason == f"reward drop to {reward:.3g} from baseline {baseline:.3g}"


@pytest.mark.parametrize(
    ("baseline", "loss", "anomalous"),
    [
        (-0.5, 0.0, True),  # rose by the baseline's size: "2x" for a negative loss
        (-0.5, -0.01, False),
        (-0.5, -2.0, False),
        (0.0, 100.0, False),
    ],
)
def test_loss_spikes_against_zero_and_negative_baselines(
    baseline: float, loss: float, anomalous: bool
) -> None:
    assert last_verdict(NO_WARMUP, [(baseline, 1.0), (loss, 1.0)]).anomalous is anomalous


@pytest.mark.parametrize(
    ("loss", "reward", "reason"),
    [
        (math.nan, 1.0, "non-finite loss"),
        (math.inf, 1.0, "non-finite loss"),
        (1.0, -math.inf, "non-finite reward"),
        (math.nan, math.nan, "non-finite loss; non-finite reward"),
    ],
)
def test_non_finite_values_act_at_once_even_in_warmup_and_with_patience(
    loss: float, reward: float, reason: str
) -> None:
    detector = AnomalyDetector(AnomalySettings(warmup_steps=50, patience=5))
    feed(detector, [(1.0, 1.0)] * 3)
    verdict = detector.observe(3, loss, reward)
    assert verdict is not None
    assert verdict.warmup
    assert (verdict.anomalous, verdict.act, verdict.reason) == (True, True, reason)
    assert verdict.streak_start == 3
    # The very first metric of a run can be the non-finite one too.
    first = AnomalyDetector(AnomalySettings()).observe(0, loss, reward)
    assert first is not None
    assert first.act


def test_anomalous_values_never_enter_the_baseline() -> None:
    detector = AnomalyDetector(AnomalySettings(warmup_steps=0, patience=10))
    verdicts = feed(detector, [(1.0, 4.0), (3.0, 4.0), (math.nan, 4.0), (2.5, 1.0), (1.1, 3.9)])
    assert [v.anomalous for v in verdicts] == [False, True, True, True, False]
    assert [v.baseline_loss for v in verdicts[1:]] == [1.0, 1.0, 1.0, 1.0]
    assert [v.baseline_reward for v in verdicts[1:]] == [4.0, 4.0, 4.0, 4.0]
    assert verdicts[3].reason == "loss spike 2.5x baseline 1; reward drop to 25% of baseline 4"
    after = detector.observe(5, 1.2, 3.9)
    assert after is not None
    assert (after.baseline_loss, after.baseline_reward) == (1.1, 3.9)


# --- baselines ------------------------------------------------------------------------------


def test_ema_baseline_follows_normal_values() -> None:
    anomaly = AnomalySettings(baseline="ema", ema_alpha=0.25, warmup_steps=0)
    detector = AnomalyDetector(anomaly)
    losses = [1.0, 1.2, 0.8, 5.0, 0.9, 1.1]
    expected: float | None = None
    for step, loss in enumerate(losses):
        verdict = detector.observe(step, loss, 1.0)
        assert verdict is not None
        assert verdict.baseline_loss == (None if expected is None else pytest.approx(expected))
        if not verdict.anomalous:
            expected = loss if expected is None else 0.25 * loss + 0.75 * expected
        else:
            assert loss == 5.0  # 5.0 >= 2 x ~0.97
    assert expected is not None


def test_median_baseline_ignores_a_single_outlier_in_its_window() -> None:
    # The ratio rules alone: five values are too few to know the run's noise.
    anomaly = AnomalySettings(baseline="median", median_window=5, warmup_steps=0, spread_factor=0)
    detector = AnomalyDetector(anomaly)
    # 1.9 is not a spike against a median of ~1.0, but it would poison a "previous"
    # baseline: 3.5 then looks like 1.8x, not an anomaly.
    losses = [1.0, 0.9, 1.1, 1.0, 1.9, 3.5]
    verdicts = feed(detector, [(loss, 1.0) for loss in losses])
    assert verdicts[-1].anomalous
    assert verdicts[-1].baseline_loss == statistics.median([0.9, 1.1, 1.0, 1.9, 1.0])
    previous = feed(AnomalyDetector(NO_WARMUP), [(loss, 1.0) for loss in losses])
    assert not previous[-1].anomalous


def test_median_window_keeps_only_the_newest_normal_values() -> None:
    detector = AnomalyDetector(AnomalySettings(baseline="median", median_window=3, warmup_steps=0))
    verdicts = feed(detector, [(loss, 10.0) for loss in (1.0, 1.2, 1.4, 1.6, 1.8)])
    assert [v.baseline_loss for v in verdicts] == [None, 1.0, 1.1, 1.2, 1.4]


@pytest.mark.parametrize("baseline", ["previous", "ema", "median"])
def test_every_baseline_kind_flags_a_clear_spike_and_drop(baseline: str) -> None:
    anomaly = AnomalySettings(baseline=baseline, warmup_steps=0)
    steady = [(1.0 + 0.01 * (i % 3), 5.0 - 0.01 * (i % 2)) for i in range(30)]
    verdicts = feed(AnomalyDetector(anomaly), [*steady, (2.5, 5.0), (1.0, 5.0), (1.0, 2.0)])
    assert [v.anomalous for v in verdicts] == [False] * 30 + [True, False, True]


# --- warmup, patience, cooldown -------------------------------------------------------------


def test_warmup_counts_steps_from_the_first_metric() -> None:
    # The ratio rules alone: the warmup's values (1 to 5) are far noisier than the spike.
    detector = AnomalyDetector(AnomalySettings(warmup_steps=10, spread_factor=0))
    verdicts = feed(detector, [(1.0, 1.0), (5.0, 1.0), (1.0, 1.0)], first_step=100)
    assert [(v.warmup, v.anomalous) for v in verdicts] == [(True, False)] * 3
    # 2.5 is 2.5x the previous 1.0, but unjudged in warmup: it enters the baseline.
    unjudged = detector.observe(109, 2.5, 1.0)
    assert unjudged is not None
    assert (unjudged.warmup, unjudged.anomalous, unjudged.baseline_loss) == (True, False, 1.0)
    verdict = detector.observe(110, 2.0, 1.0)
    assert verdict is not None
    assert (verdict.warmup, verdict.anomalous, verdict.baseline_loss) == (False, False, 2.5)
    spike = detector.observe(111, 4.0, 1.0)
    assert spike is not None
    assert spike.anomalous


def test_patience_needs_consecutive_anomalies_and_reports_the_streak_start() -> None:
    detector = AnomalyDetector(AnomalySettings(warmup_steps=0, patience=3))
    values = [(1.0, 1.0), (3.0, 1.0), (3.0, 1.0), (1.0, 1.0), (3.0, 1.0), (3.0, 1.0), (3.0, 1.0)]
    verdicts = feed(detector, values)
    assert [v.anomalous for v in verdicts] == [False, True, True, False, True, True, True]
    assert [v.act for v in verdicts] == [False] * 6 + [True]
    assert [v.streak_length for v in verdicts] == [0, 1, 2, 0, 1, 2, 3]
    assert verdicts[-1].streak_start == 4


def test_a_run_acts_once_per_attempt_until_it_is_rolled_back() -> None:
    detector = AnomalyDetector(NO_WARMUP)
    verdicts = feed(detector, [(1.0, 1.0), (3.0, 1.0), (3.0, 1.0), (1.0, 1.0), (9.0, 1.0)])
    assert [v.act for v in verdicts] == [False, True, False, False, False]
    assert verdicts[-1].anomalous
    assert verdicts[-1].streak_start == 4
    # The trainer applied the rollback: a new attempt may act again.
    replayed = detector.observe(1, 1.0, 1.0, attempt=1)
    assert replayed is not None
    again = detector.observe(2, 3.0, 1.0, attempt=1)
    assert again is not None
    assert again.act


def test_reset_starts_warmup_and_cooldown_from_the_restored_step() -> None:
    detector = AnomalyDetector(AnomalySettings(warmup_steps=10, cooldown_steps=100))
    feed(detector, [(1.0, 1.0)] * 20 + [(5.0, 1.0)], first_step=480)
    assert detector.reset_to(500, attempt=1)
    verdicts = {}
    for step in range(501, 620):
        loss = 5.0 if step in (505, 550, 599, 600, 601) else 1.0
        verdict = detector.observe(step, loss, 1.0, attempt=1)
        assert verdict is not None
        verdicts[step] = verdict
    assert verdicts[501].baseline_loss is None  # baselines were cleared
    assert (verdicts[505].warmup, verdicts[505].anomalous) == (True, False)
    assert (verdicts[550].anomalous, verdicts[550].act, verdicts[550].cooldown) == (
        True,
        False,
        True,
    )
    assert (verdicts[599].anomalous, verdicts[599].act) == (True, False)
    # Cooldown over at 600, mid-streak: act, naming the streak's first step.
    assert (verdicts[600].act, verdicts[600].cooldown, verdicts[600].streak_start) == (
        True,
        False,
        599,
    )
    assert not verdicts[601].act


def test_resets_are_idempotent_and_stale_ones_are_ignored() -> None:
    detector = AnomalyDetector(NO_WARMUP)
    feed(detector, [(1.0, 1.0)] * 5)
    assert detector.reset_to(2, attempt=1)
    state = detector.to_state()
    assert not detector.reset_to(2, attempt=1)
    assert not detector.reset_to(3, attempt=0)
    assert detector.to_state() == state
    # Metrics of the abandoned attempt arriving late are ignored.
    assert detector.observe(5, 100.0, 1.0, attempt=0) is None
    assert detector.observe(3, 1.0, 1.0, attempt=1) is not None
    detector.observe(4, 1.0, 1.0, attempt=2)  # a resume: attempt 2
    assert not detector.reset_to(3, attempt=1)  # the ack of an older rollback


def test_a_new_attempt_without_reset_clears_baselines_and_restarts_warmup() -> None:
    detector = AnomalyDetector(AnomalySettings(warmup_steps=5))
    feed(detector, [(1.0, 1.0)] * 20)
    first = detector.observe(10, 3.0, 1.0, attempt=1)
    assert first is not None
    assert (first.baseline_loss, first.warmup, first.anomalous) == (None, True, False)
    later = detector.observe(15, 7.0, 1.0, attempt=1)
    assert later is not None
    assert (later.warmup, later.baseline_loss, later.anomalous) == (False, 3.0, True)


def test_a_reset_acknowledged_after_the_new_attempt_began_still_starts_the_cooldown() -> None:
    detector = AnomalyDetector(AnomalySettings(warmup_steps=0, cooldown_steps=50))
    feed(detector, [(1.0, 1.0)] * 10)
    detector.observe(6, 1.0, 1.0, attempt=1)
    assert detector.reset_to(5, attempt=1)
    detector.observe(7, 1.0, 1.0, attempt=1)
    verdict = detector.observe(8, 9.0, 1.0, attempt=1)
    assert verdict is not None
    assert (verdict.anomalous, verdict.act, verdict.cooldown) == (True, False, True)


# --- replays and state ----------------------------------------------------------------------

metric_values = st.one_of(
    st.floats(-10.0, 10.0),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0]),
)
operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("metric"), st.integers(0, 2), st.integers(0, 60), metric_values, metric_values
        ),
        st.tuples(st.just("reset"), st.integers(0, 2), st.integers(0, 60)),
    ),
    max_size=60,
)
anomaly_settings = st.builds(
    AnomalySettings,
    baseline=st.sampled_from(["previous", "ema", "median"]),
    warmup_steps=st.integers(0, 5),
    patience=st.integers(1, 3),
    cooldown_steps=st.integers(0, 10),
    median_window=st.integers(1, 6),
)


def apply(detector: AnomalyDetector, operation: tuple[Any, ...]) -> Verdict | bool | None:
    if operation[0] == "metric":
        _, attempt, step, loss, reward = operation
        return detector.observe(step, loss, reward, attempt=attempt)
    return detector.reset_to(operation[2], attempt=operation[1])


def same(a: object, b: object) -> bool:
    """Equality where NaN equals NaN (verdicts carry the values they judged)."""
    return orjson.dumps(a, default=repr) == orjson.dumps(b, default=repr)


@settings(max_examples=200, deadline=None)
@given(ops=operations, cut=st.integers(0, 60), anomaly=anomaly_settings)
def test_state_round_trips_exactly(
    ops: list[tuple[Any, ...]], cut: int, anomaly: AnomalySettings
) -> None:
    uncrashed, crashed = AnomalyDetector(anomaly), AnomalyDetector(anomaly)
    for index, operation in enumerate(ops):
        if index == cut:
            state = orjson.loads(orjson.dumps(crashed.to_state()))
            crashed = AnomalyDetector.from_state(state, anomaly)
            assert crashed.to_state() == uncrashed.to_state()
        assert same(apply(crashed, operation), apply(uncrashed, operation))
    assert crashed.to_state() == uncrashed.to_state()


@settings(max_examples=200, deadline=None)
@given(
    ops=operations,
    bounds=st.tuples(st.integers(0, 60), st.integers(0, 60)),
    anomaly=anomaly_settings,
)
def test_replaying_any_prefix_changes_nothing(
    ops: list[tuple[Any, ...]], bounds: tuple[int, int], anomaly: AnomalySettings
) -> None:
    detector = AnomalyDetector(anomaly)
    for operation in ops:
        apply(detector, operation)
    state = detector.to_state()
    low, high = sorted(bounds)
    for operation in ops[low:high]:
        assert apply(detector, operation) in (None, False)
    assert detector.to_state() == state


def test_a_changed_baseline_kind_starts_a_fresh_baseline() -> None:
    detector = AnomalyDetector(NO_WARMUP)
    feed(detector, [(1.0, 1.0), (1.5, 2.0)])
    median = AnomalySettings(baseline="median", warmup_steps=0)
    restored = AnomalyDetector.from_state(detector.to_state(), median)
    verdict = restored.observe(2, 9.0, 1.0)
    assert verdict is not None
    assert (verdict.baseline_loss, verdict.anomalous) == (None, False)
    kept = AnomalyDetector.from_state(detector.to_state(), NO_WARMUP).observe(2, 9.0, 1.0)
    assert kept is not None
    assert (kept.baseline_loss, kept.anomalous) == (1.5, True)


def test_unknown_state_versions_are_refused() -> None:
    state = AnomalyDetector(NO_WARMUP).to_state() | {"version": 0}
    with pytest.raises(ValueError, match="version"):
        AnomalyDetector.from_state(state, NO_WARMUP)


# --- the spread floor (issue 15): values near zero or of changing sign ----------------------


def noisy(level: float, noise: float, count: int, seed: int = 7) -> list[float]:
    rng = random.Random(seed)
    return [level + rng.gauss(0.0, noise) for _ in range(count)]


def test_a_loss_hovering_around_zero_is_not_a_spike_when_it_changes_sign() -> None:
    # PPO's total loss: about -0.04 +- 0.015. "2x the previous value" fires on its noise.
    losses = noisy(-0.04, 0.015, 400)
    ratio_only = AnomalySettings(warmup_steps=10, spread_factor=0)
    flagged = [
        v for v in feed(AnomalyDetector(ratio_only), [(x, 1.0) for x in losses]) if v.anomalous
    ]
    assert flagged  # the guide's literal rule on PPO's loss: false alarms
    verdicts = feed(AnomalyDetector(AnomalySettings()), [(x, 1.0) for x in losses])
    assert not [v for v in verdicts if v.anomalous]


@pytest.mark.parametrize("diverged", [0.9, 21.0, 1890.0])
def test_a_divergence_of_a_loss_near_zero_is_a_spike(diverged: float) -> None:
    losses = noisy(-0.04, 0.015, 200)
    verdicts = feed(AnomalyDetector(AnomalySettings()), [(x, 1.0) for x in [*losses, diverged]])
    assert verdicts[-1].anomalous
    assert "loss rise" in verdicts[-1].reason or "loss spike" in verdicts[-1].reason


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e-6])
def test_twice_the_baseline_is_a_spike_for_a_loss_well_away_from_zero(scale: float) -> None:
    # 1.0 and 1.02 in turn: doubling rises 50 times the step-to-step change, in any units.
    losses = [(1.0 + 0.02 * (i % 2)) * scale for i in range(200)]  # ends at 1.02
    doubled = feed(AnomalyDetector(AnomalySettings()), [(x, 1.0) for x in [*losses, 2.04 * scale]])
    assert doubled[-1].anomalous
    almost = feed(AnomalyDetector(AnomalySettings()), [(x, 1.0) for x in [*losses, 2.03 * scale]])
    assert not almost[-1].anomalous  # the ratio rule decides up there


def test_a_reward_of_changing_sign_is_judged_by_its_noise() -> None:
    rewards = noisy(0.0, 0.2, 400)  # an advantage-like reward around zero
    ratio_only = AnomalySettings(warmup_steps=10, spread_factor=0)
    assert [
        v for v in feed(AnomalyDetector(ratio_only), [(1.0, r) for r in rewards]) if v.anomalous
    ]
    assert not [
        v
        for v in feed(AnomalyDetector(AnomalySettings()), [(1.0, r) for r in rewards])
        if v.anomalous
    ]
    collapsed = feed(AnomalyDetector(AnomalySettings()), [(1.0, r) for r in [*rewards, -50.0]])
    assert collapsed[-1].anomalous
    assert "reward drop" in collapsed[-1].reason


def test_half_the_baseline_is_a_drop_for_a_reward_well_away_from_zero() -> None:
    rewards = [10.0 + 0.2 * (i % 2) for i in range(200)]  # ends at 10.2
    verdicts = feed(AnomalyDetector(AnomalySettings()), [(1.0, r) for r in [*rewards, 5.1]])
    assert verdicts[-1].anomalous
    assert "reward drop" in verdicts[-1].reason
    almost = feed(AnomalyDetector(AnomalySettings()), [(1.0, r) for r in [*rewards, 5.11]])
    assert not almost[-1].anomalous


def test_anomalous_values_never_widen_the_spread() -> None:
    detector = AnomalyDetector(AnomalySettings(patience=10))
    losses = noisy(1.0, 0.05, 100)
    feed(detector, [(x, 1.0) for x in losses])
    spread = detector.to_state()["loss_spread"]
    streak = feed(detector, [(50.0, 1.0)] * 5, first_step=100)
    assert all(v.anomalous for v in streak)
    assert detector.to_state()["loss_spread"] == spread


def test_the_spread_round_trips_and_old_states_form_it_again() -> None:
    detector = AnomalyDetector(AnomalySettings())
    feed(detector, [(x, 1.0) for x in noisy(-0.04, 0.015, 100)])
    state = orjson.loads(orjson.dumps(detector.to_state()))
    restored = AnomalyDetector.from_state(state, AnomalySettings())
    assert restored.to_state() == detector.to_state()
    for name in ("loss_spread", "reward_spread", "released_streak"):
        del state[name]  # a state written before the spread floor
    older = AnomalyDetector.from_state(state, AnomalySettings())
    assert older.to_state()["loss_spread"] == [None, 0.0, 0.0]
    assert older.observe(100, -0.04, 1.0) is not None


def test_a_let_go_streak_that_turns_non_finite_is_acted_on() -> None:
    # The detector: a released streak acts no more on finite values, but on NaN it does.
    detector = AnomalyDetector(Settings().anomaly)
    for step in range(20):
        detector.observe(step, 1.0 + 0.01 * (step % 3), 1.0, 0)
    first = detector.observe(20, 10.0, 1.0, 0)
    assert first is not None
    assert first.act
    detector.release(0, 20)
    finite = detector.observe(21, 10.0, 1.0, 0)
    assert finite is not None
    assert finite.anomalous
    assert not finite.act
    non_finite = detector.observe(22, math.nan, 1.0, 0)
    assert non_finite is not None
    assert non_finite.act
