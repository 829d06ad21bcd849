"""The stall watchdog's rule: records waiting with no progress for the timeout."""

from __future__ import annotations

import pytest

from rules.progress import Stall, StallDetector


def test_a_partition_with_records_waiting_and_no_progress_stalls_after_the_timeout() -> None:
    detector = StallDetector(timeout_s=60.0)
    assert detector.observe(0.0, {"p0": (100, 150)}) == []
    assert detector.observe(59.0, {"p0": (100, 150)}) == []
    assert detector.observe(60.0, {"p0": (100, 160)}) == [Stall("p0", 100, 160, 60.0)]


def test_progress_or_an_idle_partition_restarts_the_clock() -> None:
    detector = StallDetector(timeout_s=60.0)
    detector.observe(0.0, {"busy": (100, 150), "idle": (40, 40)})
    # busy moved on at 50 s; idle has nothing to read however long it waits.
    assert detector.observe(50.0, {"busy": (120, 150), "idle": (40, 40)}) == []
    assert detector.observe(100.0, {"busy": (120, 150), "idle": (40, 40)}) == []
    [stall] = detector.observe(110.0, {"busy": (120, 150), "idle": (40, 40)})
    assert (stall.partition, stall.idle_s) == ("busy", 60.0)
    # New records on a partition that was caught up: the clock starts when they are seen.
    assert detector.observe(200.0, {"busy": (150, 150), "idle": (40, 45)}) == []
    assert detector.observe(259.0, {"busy": (150, 150), "idle": (40, 45)}) == []
    assert [s.partition for s in detector.observe(260.0, {"idle": (40, 45)})] == ["idle"]


def test_a_broker_outage_is_not_counted_as_a_stall() -> None:
    detector = StallDetector(timeout_s=60.0)
    detector.observe(0.0, {"p0": (100, 150)})
    detector.unknown(300.0)  # the high watermarks could not be read for five minutes
    assert detector.observe(301.0, {"p0": (100, 150)}) == []
    assert detector.observe(360.0, {"p0": (100, 150)})[0].idle_s == 60.0


def test_revoked_partitions_are_forgotten() -> None:
    detector = StallDetector(timeout_s=10.0)
    detector.observe(0.0, {"p0": (1, 5)})
    detector.observe(5.0, {})  # revoked
    assert detector.observe(12.0, {"p0": (1, 5)}) == []  # assigned again: a fresh clock


def test_the_description_says_where_it_is_stuck_and_for_how_long() -> None:
    assert Stall("metrics-3", 100, 160, 61.2).describe() == (
        "metrics-3: stuck at 100 of 160 for 61 s"
    )


def test_the_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        StallDetector(timeout_s=0.0)
