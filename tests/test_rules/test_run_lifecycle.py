"""The end of a run: a finished run is dropped once quiet for the retention, in its order."""

from __future__ import annotations

import orjson
import pytest

from rules.run_lifecycle import RunLifecycle

RETENTION = 60.0


def finished(at: float = 100.0, final: tuple[int, int] | None = (0, 99)) -> RunLifecycle:
    lifecycle = RunLifecycle(reached=(0, 99))
    lifecycle.on_finish(at, final)
    return lifecycle


def test_a_running_run_never_expires_and_keeps_nothing() -> None:
    lifecycle = RunLifecycle()
    assert not lifecycle.on_input(10.0)  # nothing to store
    assert not lifecycle.on_metric((0, 5), 10.0)
    assert not lifecycle.expired(1e9, RETENTION, held_since=0.0)
    assert lifecycle.to_state() is None


def test_a_finished_run_expires_after_the_retention_of_quiet() -> None:
    lifecycle = finished(at=100.0)
    assert not lifecycle.expired(100.0 + RETENTION - 0.001, RETENTION, held_since=0.0)
    assert lifecycle.expired(100.0 + RETENTION, RETENTION, held_since=0.0)


def test_a_late_input_pushes_the_drop_back() -> None:
    lifecycle = finished(at=100.0)
    assert lifecycle.on_input(130.0)  # a straggling ack: the stored state changes
    assert not lifecycle.expired(100.0 + RETENTION, RETENTION, held_since=0.0)
    assert lifecycle.expired(130.0 + RETENTION, RETENTION, held_since=0.0)
    assert lifecycle.on_metric((0, 98), 150.0)  # an older metric read late: quiet again
    assert lifecycle.reached == (0, 99)
    assert lifecycle.expired(150.0 + RETENTION, RETENTION, held_since=0.0)
    assert not lifecycle.expired(150.0 + RETENTION - 1, RETENTION, held_since=0.0)


def test_metrics_behind_the_finish_hold_the_run_after_a_takeover() -> None:
    """Read ahead of its last metrics (another topic): a worker taking the run over waits a
    retention before dropping it, so the metrics it still has to read are the run's."""
    lifecycle = RunLifecycle(reached=(0, 40))
    lifecycle.on_finish(100.0, (0, 99))
    taken_over = 500.0  # the worker restarted long after the finish
    assert not lifecycle.expired(taken_over + 1, RETENTION, held_since=taken_over)
    lifecycle.on_metric((0, 99), taken_over + 2)  # the backlog reaches the last metric
    assert lifecycle.reached == (0, 99)
    assert not lifecycle.expired(taken_over + 2 + RETENTION - 1, RETENTION, held_since=taken_over)
    assert lifecycle.expired(taken_over + 2 + RETENTION, RETENTION, held_since=taken_over)


def test_a_last_metric_that_never_comes_delays_the_drop_by_one_retention_at_most() -> None:
    lifecycle = RunLifecycle(reached=(0, 40))
    lifecycle.on_finish(100.0, (0, 99))
    # Within the life that applied the finish (held since before it): the retention.
    assert lifecycle.expired(100.0 + RETENTION, RETENTION, held_since=50.0)
    # After a takeover: a retention from the takeover.
    assert not lifecycle.expired(400.0 + RETENTION - 1, RETENTION, held_since=400.0)
    assert lifecycle.expired(400.0 + RETENTION, RETENTION, held_since=400.0)


def test_a_newer_attempt_reaches_the_last_metric_of_an_older_one() -> None:
    lifecycle = RunLifecycle(reached=(1, 10))
    lifecycle.on_finish(100.0, (0, 99))
    assert lifecycle.expired(100.0 + RETENTION, RETENTION, held_since=1e9)


def test_a_finish_that_names_no_metric_waits_for_none() -> None:
    lifecycle = RunLifecycle()
    lifecycle.on_finish(100.0, None)
    assert lifecycle.expired(100.0 + RETENTION, RETENTION, held_since=1e9)


def test_an_announcement_after_the_finish_resumes_the_run() -> None:
    lifecycle = finished(at=100.0)
    lifecycle.on_start()
    assert not lifecycle.finished
    assert not lifecycle.expired(1e9, RETENTION, held_since=0.0)
    assert lifecycle.to_state() is None
    assert lifecycle.reached == (0, 99)  # what was read stays read


def test_a_second_finish_keeps_the_first_time_and_restarts_the_quiet() -> None:
    lifecycle = finished(at=100.0, final=(0, 99))
    lifecycle.on_finish(140.0, None)
    assert lifecycle.finished_at == 100.0
    assert lifecycle.final == (0, 99)
    assert not lifecycle.expired(100.0 + RETENTION, RETENTION, held_since=0.0)
    assert lifecycle.expired(140.0 + RETENTION, RETENTION, held_since=0.0)


def test_the_state_round_trips_through_json() -> None:
    lifecycle = RunLifecycle(reached=(2, 7))
    lifecycle.on_finish(100.5, (2, 9))
    lifecycle.on_input(101.25)
    state = orjson.loads(orjson.dumps(lifecycle.to_state()))
    restored = RunLifecycle.from_state(state)
    assert restored == lifecycle
    for now in (161.0, 161.25, 1000.0):
        for held_since in (0.0, 150.0):
            assert restored.expired(now, RETENTION, held_since=held_since) == lifecycle.expired(
                now, RETENTION, held_since=held_since
            )
    assert RunLifecycle.from_state(None) == RunLifecycle()


def test_an_unknown_state_version_is_refused() -> None:
    state = finished().to_state()
    assert state is not None
    with pytest.raises(ValueError, match="version"):
        RunLifecycle.from_state(state | {"version": 99})
