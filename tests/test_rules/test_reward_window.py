"""The sliding reward window against numpy, including its exactness guarantees."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rules.reward_window import RewardWindow
from tests.helpers.reference import window_stats

finite_rewards = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(rewards=st.lists(finite_rewards, min_size=1, max_size=60), capacity=st.integers(1, 20))
def test_every_step_matches_numpy(rewards: list[float], capacity: int) -> None:
    window = RewardWindow(capacity)
    values = np.array(rewards)
    for step, reward in enumerate(rewards):
        stats = window.add(reward, step=step)
        assert stats is not None
        mean, std, count = window_stats(values, step, capacity)
        assert stats.count == count
        assert stats.mean == pytest.approx(mean, rel=1e-9, abs=1e-9)
        assert stats.std == pytest.approx(std, rel=1e-9, abs=1e-9)


def test_long_runs_do_not_drift() -> None:
    rng = np.random.default_rng(0)
    # Large offset, small spread: where running float sums lose the variance.
    values = 1e6 + rng.normal(0.0, 1e-3, 50_000)
    window = RewardWindow(1000)
    for step, reward in enumerate(values):
        stats = window.add(float(reward), step=step)
    assert stats is not None
    exact_window = values[-1000:]
    assert stats.mean == pytest.approx(float(exact_window.mean()), rel=1e-12)
    assert stats.std == pytest.approx(float(exact_window.std()), rel=1e-6)


def test_tiny_and_huge_magnitudes_mix_exactly() -> None:
    window = RewardWindow(3)
    for step, reward in enumerate([1e-300, 1e200, -1e200, 3e-300]):
        stats = window.add(reward, step=step)
    assert stats is not None
    # The window holds 1e200, -1e200, 3e-300: the mean is exactly 1e-300, which any
    # running float sum would have lost.
    assert stats.mean == 1e-300


def test_a_variance_beyond_float_range_still_gives_the_exact_std() -> None:
    """An exploded reward (1e160: its square overflows a float) keeps every statistic
    finite and exact, so the metrics of a diverging run stay expressible."""
    window = RewardWindow(2)
    window.add(1e300, step=0)
    stats = window.add(-1e300, step=1)
    assert stats is not None
    assert (stats.mean, stats.std, stats.normalized_reward) == (0.0, 1e300, -1.0)
    window = RewardWindow(300)
    for step in range(150):
        stats = window.add(1e160 if step == 20 else 1.0, step=step)
    assert stats is not None
    exact = [Fraction(r) for r in window.rewards()]
    mean = sum(exact) / len(exact)
    variance = sum((r - mean) ** 2 for r in exact) / len(exact)
    assert stats.mean == float(mean)
    assert stats.std == pytest.approx(math.sqrt(float(variance / 10**300)) * 1e150, rel=1e-15)


def test_rewards_at_the_edge_of_float_range_give_finite_z_scores() -> None:
    window = RewardWindow(3)
    for step, reward in enumerate([1.7e308, -1.7e308]):
        window.add(reward, step=step)
    stats = window.add(1.7e308, step=2)  # reward - mean overflows; the z-score does not
    assert stats is not None
    assert math.isfinite(stats.normalized_reward)
    assert math.isfinite(stats.std)
    assert stats.normalized_reward == pytest.approx(1 / math.sqrt(2), rel=1e-12)


def test_duplicate_and_older_steps_are_ignored() -> None:
    window = RewardWindow(10)
    assert window.add(1.0, step=5) is not None
    assert window.add(100.0, step=5) is None
    assert window.add(100.0, step=4) is None
    assert window.count == 1
    # A rollback replays old steps under a new attempt: they count again.
    stats = window.add(3.0, step=4, attempt=1)
    assert stats is not None
    assert stats.count == 2
    assert stats.mean == 2.0


def test_snapshot_restores_bit_identical_statistics() -> None:
    rng = np.random.default_rng(1)
    uncrashed, crashed = RewardWindow(100), RewardWindow(100)
    for step, reward in enumerate(rng.normal(3.0, 2.0, 250)):
        uncrashed.add(float(reward), step=step)
        crashed.add(float(reward), step=step)
        if step % 37 == 0:
            crashed = RewardWindow.from_bytes(crashed.to_bytes())
    assert crashed.last_position == uncrashed.last_position
    assert crashed.rewards() == uncrashed.rewards()
    assert crashed.add(7.0, step=250) == uncrashed.add(7.0, step=250)


def test_resize_keeps_the_newest_rewards() -> None:
    window = RewardWindow(5)
    for step in range(5):
        window.add(float(step), step=step)
    window.resize(2)
    assert window.rewards() == [3.0, 4.0]
    stats = window.add(5.0, step=5)
    assert stats is not None
    assert (stats.mean, stats.count) == (4.5, 2)


def test_constant_rewards_normalize_to_zero() -> None:
    window = RewardWindow(10)
    for step in range(3):
        stats = window.add(2.5, step=step)
    assert stats is not None
    assert (stats.std, stats.normalized_reward) == (0.0, 0.0)


@pytest.mark.parametrize("reward", [math.nan, math.inf, -math.inf])
def test_non_finite_rewards_are_refused(reward: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        RewardWindow(10).add(reward, step=0)


def test_corrupt_snapshots_are_refused() -> None:
    data = RewardWindow(10).to_bytes()
    with pytest.raises(ValueError, match="format"):
        RewardWindow.from_bytes(b"\x09" + data[1:])


def test_statistics_do_not_depend_on_the_scale_the_sums_are_held_in() -> None:
    """A live window's scale only grows; a restored one's is the smallest its rewards need.
    Rewards with very fine bits pass through a small window, so the two scales differ,
    and every statistic after each restore must still be bit-identical."""
    rng = random.Random(5)
    live = RewardWindow(20)
    for step in range(3000):
        fine = rng.gauss(0.0, 1.0) * 2.0 ** -rng.randint(0, 60)
        reward = rng.choice([fine, rng.gauss(0.5, 0.2), float(rng.randint(-5, 5))])
        assert live.add(reward, step=2 * step) is not None
        restored = RewardWindow.from_bytes(live.to_bytes())
        reward = rng.gauss(0.5, 0.2)
        stats = live.add(reward, step=2 * step + 1)
        assert stats is not None
        assert stats == restored.add(reward, step=2 * step + 1)
        live = restored
