"""Checkpoint health, rollback targets, retention across rollbacks, and the rollback budget."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config.settings import CheckpointSettings, Settings
from rules.checkpoints import Checkpoint, CheckpointLedger, RollbackBudget

DEFAULTS = CheckpointSettings()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("FRAGRANCE_OPS_"):
            monkeypatch.delenv(name)


def uri(step: int, attempt: int = 0) -> str:
    return f"file:///ckpt/run/{step}-{attempt}.pt"


def observe(
    ledger: CheckpointLedger,
    steps: Iterable[int],
    anomalous: Iterable[int] = (),
    attempt: int = 0,
) -> None:
    """Verdicts for ``steps``, anomalous at ``anomalous``."""
    bad = set(anomalous)
    for step in steps:
        assert ledger.observe_verdict(step, step in bad, attempt=attempt)


def record(ledger: CheckpointLedger, step: int, attempt: int = 0) -> None:
    assert ledger.record(step, uri(step, attempt), attempt=attempt)


def steps_of(checkpoints: Iterable[Checkpoint]) -> list[int]:
    return [checkpoint.step for checkpoint in checkpoints]


def test_defaults_are_the_operations_guide_numbers() -> None:
    checkpoints = Settings().checkpoints
    assert (checkpoints.interval_steps, checkpoints.keep, checkpoints.auto_rollback) == (
        500,
        5,
        True,
    )
    assert checkpoints.health_lookback_steps == 50
    assert (checkpoints.max_rollbacks, checkpoints.rollback_within_steps) == (3, 2000)


def test_environment_sets_the_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRAGRANCE_OPS_CHECKPOINTS__KEEP", "2")
    monkeypatch.setenv("FRAGRANCE_OPS_CHECKPOINTS__AUTO_ROLLBACK", "false")
    checkpoints = Settings().checkpoints
    assert (checkpoints.keep, checkpoints.auto_rollback) == (2, False)


# --- health ---------------------------------------------------------------------------------


def test_health_is_unknown_until_the_metrics_up_to_the_checkpoint_are_seen() -> None:
    ledger = CheckpointLedger(DEFAULTS)
    observe(ledger, range(0, 499))
    record(ledger, 500)  # the checkpoint event overtook the metrics
    [checkpoint] = ledger.checkpoints
    assert ledger.health(checkpoint) == "unknown"
    assert ledger.newest_healthy_before(10_000) is None
    observe(ledger, [499, 500])
    assert ledger.health(checkpoint) == "healthy"
    assert ledger.newest_healthy_before(501) == checkpoint
    assert ledger.newest_healthy_before(500) is None  # strictly before


@pytest.mark.parametrize(
    ("anomalous_step", "health"),
    [(451, "unhealthy"), (500, "unhealthy"), (450, "healthy"), (501, "healthy")],
)
def test_an_anomaly_within_the_lookback_makes_a_checkpoint_unhealthy(
    anomalous_step: int, health: str
) -> None:
    ledger = CheckpointLedger(DEFAULTS)
    observe(ledger, range(0, 520), anomalous=[anomalous_step])
    record(ledger, 500)
    assert ledger.health(ledger.checkpoints[0]) == health


def test_a_window_the_ledger_did_not_watch_is_not_healthy() -> None:
    ledger = CheckpointLedger(DEFAULTS)
    observe(ledger, range(480, 600))  # metrics began mid-window (a late deployment)
    record(ledger, 500)
    record(ledger, 550)
    assert [ledger.health(c) for c in ledger.checkpoints] == ["unknown", "healthy"]
    early = CheckpointLedger(DEFAULTS)
    observe(early, range(0, 40))
    record(early, 30)  # the window is clipped at step 0
    assert early.health(early.checkpoints[0]) == "healthy"


def test_the_rollback_target_precedes_the_streak() -> None:
    ledger = CheckpointLedger(CheckpointSettings(interval_steps=100))
    for step in range(100, 1001, 100):
        observe(ledger, range(step - 99, step + 1), anomalous=range(760, 2000))
        record(ledger, step)
    # 700 is healthy; 800 saw anomalies from 760: the target for a streak starting at 760.
    assert ledger.newest_healthy_before(760) == ledger.checkpoints[6]
    assert ledger.checkpoints[6].step == 700
    assert ledger.newest_healthy_before(700) is not None
    assert steps_of([ledger.newest_healthy_before(700)]) == [600]  # type: ignore[list-item]


# --- retention ------------------------------------------------------------------------------


def test_retention_keeps_the_newest_five() -> None:
    ledger = CheckpointLedger(DEFAULTS)
    for step in range(500, 4001, 500):
        observe(ledger, range(step - 499, step + 1))
        record(ledger, step)
    assert steps_of(ledger.retention()) == [500, 1000, 1500]
    assert steps_of(ledger.checkpoints) == [2000, 2500, 3000, 3500, 4000]
    assert ledger.retention() == []
    assert steps_of(ledger.retention(keep=2)) == [2000, 2500, 3000]


def test_a_run_anomalous_for_eight_checkpoints_keeps_its_last_healthy_one() -> None:
    ledger = CheckpointLedger(DEFAULTS)
    deleted: list[Checkpoint] = []
    for step in range(500, 5001, 500):
        # Healthy until 1000; anomalous from 1001 on (e.g. auto_rollback off, or the
        # rollback could not be applied): checkpoints 1500 .. 5000 are 8 unhealthy ones.
        observe(ledger, range(step - 499, step + 1), anomalous=range(1001, 6000))
        record(ledger, step)
        deleted += ledger.retention()
    assert steps_of(ledger.checkpoints) == [1000, 3000, 3500, 4000, 4500, 5000]
    assert steps_of(deleted) == [500, 1500, 2000, 2500]
    healthy = ledger.newest_healthy_before(1001)
    assert healthy is not None
    assert (healthy.step, healthy.uri) == (1000, uri(1000))
    # Its window's anomaly summary is one interval, not one entry per step.
    assert ledger.anomalous_intervals == [(1001, 5000)]


def test_without_the_protection_rule_the_healthy_checkpoint_would_go() -> None:
    # The same run with keep=5 and the newest healthy one among the newest five: nothing
    # extra is kept, so the protection is what kept 1000 above.
    ledger = CheckpointLedger(DEFAULTS)
    for step in range(500, 5001, 500):
        observe(ledger, range(step - 499, step + 1), anomalous=range(4001, 6000))
        record(ledger, step)
    ledger.retention()
    assert steps_of(ledger.checkpoints) == [3000, 3500, 4000, 4500, 5000]


def test_long_runs_stay_bounded() -> None:
    ledger = CheckpointLedger(CheckpointSettings(interval_steps=50, health_lookback_steps=20))
    for step in range(50, 20_001, 50):
        spikes = [step - 45 + i * 3 for i in range(5)]  # 5 separate streaks per interval
        observe(ledger, range(step - 49, step + 1), anomalous=spikes)
        record(ledger, step)
        ledger.retention()
    assert len(ledger.checkpoints) <= 6
    assert len(ledger.anomalous_intervals) <= 6 * 5 + 5
    assert len(orjson.dumps(ledger.to_state())) < 4000


# --- rollbacks and branches -----------------------------------------------------------------


def rolled_back_run() -> CheckpointLedger:
    """Healthy to 2500, anomalous from 2700, checkpoints to 3500; rolled back to 2500."""
    ledger = CheckpointLedger(DEFAULTS)
    for step in range(500, 3501, 500):
        observe(ledger, range(step - 499, step + 1), anomalous=range(2700, 4000))
        record(ledger, step)
    target = ledger.newest_healthy_before(2700)
    assert target is not None
    assert target.step == 2500
    assert ledger.restore(2500, attempt=1)
    return ledger


def test_a_restore_makes_the_abandoned_checkpoints_stale() -> None:
    ledger = rolled_back_run()
    health = {c.step: ledger.health(c) for c in ledger.checkpoints}
    assert health == {
        500: "healthy",
        1000: "healthy",
        1500: "healthy",
        2000: "healthy",
        2500: "healthy",
        3000: "stale",
        3500: "stale",
    }
    assert ledger.anomalous_intervals == []  # steps past 2500 will be observed again
    # The new attempt replays 2501..3000 normally and saves 3000 again.
    observe(ledger, range(2501, 3001), attempt=1)
    assert ledger.health(ledger.checkpoints[-1]) == "stale"
    assert ledger.record(3000, uri(3000, 1), attempt=1)
    health = {c.step: ledger.health(c) for c in ledger.checkpoints}
    assert (health[3000], health[3500]) == ("healthy", "stale")
    target = ledger.newest_healthy_before(3200)
    assert target is not None
    assert target.uri == uri(3000, 1)
    # The replaced file of the abandoned trajectory is deleted with the next retention.
    assert uri(3000, 0) in [c.uri for c in ledger.retention()]


def test_a_save_to_the_same_uri_replaces_the_stale_entry_without_deleting_it() -> None:
    ledger = rolled_back_run()
    observe(ledger, range(2501, 3001), attempt=1)
    assert ledger.record(3000, uri(3000), attempt=1)  # the trainer overwrote its file
    assert ledger.health(ledger.checkpoints[-2]) == "healthy"
    # Only the two oldest of seven go: the overwritten file is the live one, not garbage.
    assert [c.uri for c in ledger.retention()] == [uri(500), uri(1000)]
    assert steps_of(ledger.checkpoints) == [1500, 2000, 2500, 3000, 3500]
    assert ledger.checkpoints[-2] == Checkpoint(3000, uri(3000), attempt=1, stale=False)


def test_a_late_checkpoint_from_the_abandoned_trajectory_is_stale() -> None:
    ledger = CheckpointLedger(DEFAULTS)
    observe(ledger, range(0, 3100), anomalous=range(2700, 4000))
    record(ledger, 2500)
    # The trainer rolled back to 2500; its attempt-1 metrics are seen before the checkpoint
    # event of 3000, which attempt 0 had saved just before the rollback.
    observe(ledger, range(2501, 2600), attempt=1)
    assert ledger.record(3000, uri(3000), attempt=0)
    assert ledger.health(ledger.checkpoints[-1]) == "stale"
    observe(ledger, range(2600, 3100), attempt=1)
    assert ledger.newest_healthy_before(3100) == ledger.checkpoints[0]


def test_a_new_attempt_branches_even_before_the_ack_and_a_late_ack_refines_it() -> None:
    ledger = CheckpointLedger(CheckpointSettings(health_lookback_steps=10))
    observe(ledger, range(0, 700), anomalous=range(520, 700))
    record(ledger, 500)
    # Sparse metrics: attempt 1 first reports step 510; the ack (restored 500) comes later.
    observe(ledger, range(510, 560, 10), attempt=1)
    assert ledger.anomalous_intervals == []  # 520.. were forgotten at the branch (509)
    assert not ledger.restore(600, attempt=1)  # above the branch: nothing to refine
    assert ledger.restore(500, attempt=1)
    state = ledger.to_state()
    assert not ledger.restore(500, attempt=1)
    assert not ledger.restore(400, attempt=0)
    assert ledger.to_state() == state
    # Verdicts of the abandoned attempt are ignored.
    assert not ledger.observe_verdict(700, True, attempt=0)
    observe(ledger, [560], anomalous=[560], attempt=1)
    assert ledger.anomalous_intervals == [(560, 560)]


def test_a_late_ack_keeps_what_the_new_attempt_observed() -> None:
    ledger = CheckpointLedger(CheckpointSettings(health_lookback_steps=10))
    observe(ledger, range(0, 700), anomalous=range(505, 700))
    record(ledger, 500)
    observe(ledger, range(510, 620), anomalous=[530], attempt=1)
    assert ledger.record(600, uri(600, 1), attempt=1)
    assert ledger.restore(500, attempt=1)  # ack processed late
    assert ledger.anomalous_intervals == [(530, 530)]
    assert [ledger.health(c) for c in ledger.checkpoints] == ["healthy", "healthy"]


# --- replays and state ----------------------------------------------------------------------

ledger_operations = st.lists(
    st.one_of(
        st.tuples(st.just("verdict"), st.integers(0, 2), st.integers(0, 40), st.booleans()),
        st.tuples(st.just("record"), st.integers(0, 2), st.integers(0, 40)),
        st.tuples(st.just("restore"), st.integers(0, 2), st.integers(0, 40)),
        st.tuples(st.just("retention"), st.integers(1, 3)),
    ),
    max_size=60,
)
small = CheckpointSettings(health_lookback_steps=4, keep=2)


def apply(ledger: CheckpointLedger, operation: tuple[Any, ...]) -> Any:
    kind = operation[0]
    if kind == "verdict":
        return ledger.observe_verdict(operation[2], operation[3], attempt=operation[1])
    if kind == "record":
        return ledger.record(operation[2], uri(operation[2], operation[1]), attempt=operation[1])
    if kind == "restore":
        return ledger.restore(operation[2], operation[1])
    return ledger.retention(operation[1])


@settings(max_examples=200, deadline=None)
@given(ops=ledger_operations, cut=st.integers(0, 60))
def test_ledger_state_round_trips_exactly(ops: list[tuple[Any, ...]], cut: int) -> None:
    uncrashed, crashed = CheckpointLedger(small), CheckpointLedger(small)
    for index, operation in enumerate(ops):
        if index == cut:
            state = orjson.loads(orjson.dumps(crashed.to_state()))
            crashed = CheckpointLedger.from_state(state, small)
            assert crashed.to_state() == uncrashed.to_state()
        assert apply(crashed, operation) == apply(uncrashed, operation)
        assert [crashed.health(c) for c in crashed.checkpoints] == [
            uncrashed.health(c) for c in uncrashed.checkpoints
        ]
    assert crashed.to_state() == uncrashed.to_state()


@settings(max_examples=200, deadline=None)
@given(ops=ledger_operations, bounds=st.tuples(st.integers(0, 60), st.integers(0, 60)))
def test_replaying_any_prefix_of_events_changes_nothing(
    ops: list[tuple[Any, ...]], bounds: tuple[int, int]
) -> None:
    ledger = CheckpointLedger(small)
    for operation in ops:
        apply(ledger, operation)
    ledger.retention()
    state = ledger.to_state()
    low, high = sorted(bounds)
    for operation in ops[low:high]:
        if operation[0] != "retention":  # a replay is of input events
            assert apply(ledger, operation) is False
    assert ledger.retention() == []
    assert ledger.to_state() == state


def test_unknown_state_versions_are_refused() -> None:
    state = CheckpointLedger(DEFAULTS).to_state() | {"version": 1}
    with pytest.raises(ValueError, match="version"):
        CheckpointLedger.from_state(state, DEFAULTS)


# --- rollback budget ------------------------------------------------------------------------


def test_the_budget_allows_three_rollbacks_within_two_thousand_steps() -> None:
    budget = RollbackBudget(DEFAULTS)
    for attempt, (step, target) in enumerate([(3000, 2500), (2700, 2500), (2600, 2500)]):
        assert budget.allow(step)
        assert budget.record(step, target, f"loss spike at {step}", attempt=attempt)
    assert not budget.allow(2650)  # a fourth: halt
    assert not budget.allow(4500)  # 3000 and 2700 and 2600 are all fewer than 2000 away
    assert budget.allow(4700)  # only 3000 is within 2000 steps
    assert budget.allow(600)
    assert budget.history == [
        {"attempt": 0, "step": 3000, "checkpoint_step": 2500, "reason": "loss spike at 3000"},
        {"attempt": 1, "step": 2700, "checkpoint_step": 2500, "reason": "loss spike at 2700"},
        {"attempt": 2, "step": 2600, "checkpoint_step": 2500, "reason": "loss spike at 2600"},
    ]


def test_budget_records_are_idempotent_and_round_trip() -> None:
    budget = RollbackBudget(CheckpointSettings(max_rollbacks=1))
    assert budget.record(100, 50, "x", attempt=0)
    assert not budget.record(100, 50, "x", attempt=0)
    assert not budget.allow(100)
    restored = RollbackBudget.from_state(orjson.loads(orjson.dumps(budget.to_state())), DEFAULTS)
    assert restored.history == budget.history
    assert restored.allow(100)  # the defaults allow three
    zero = RollbackBudget(CheckpointSettings(max_rollbacks=0))
    assert not zero.allow(0)


def test_budget_history_is_bounded() -> None:
    budget = RollbackBudget(DEFAULTS)
    for attempt in range(500):
        budget.record(attempt * 10_000, attempt * 10_000 - 500, "x", attempt=attempt)
    assert len(budget.history) == 64
    assert budget.history[-1]["attempt"] == 499
