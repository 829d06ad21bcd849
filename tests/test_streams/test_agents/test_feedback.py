"""The feedback agent driven with in-memory ratings: proposals, re-keying to the target,
replays, bad input, the timer, and the run's hyperparameters from the training agent."""

from __future__ import annotations

import random

import pytest

from rules.commands import retune_command_id
from schemas import Rating, StepMetric, Topic
from streams.agents.feedback import Feedback, by_target_topic
from streams.agents.training import TrainingAgent
from streams.live import ORIGIN_HEADER
from tests.test_streams.test_agents.memory import Harness, Record

RUN = "run-low"


def low_ratings(count: int = 100, seed: int = 7) -> list[float]:
    """Mean about 2.5, variance about 0.65: only the low-mean rule has a case."""
    rng = random.Random(seed)
    return [float(v) for v in rng.choices([1, 2, 3, 4, 5], [0.1, 0.4, 0.4, 0.1, 0.0], k=count)]


def ratings(
    harness: Harness, values: list[float], *, run_id: str | None = RUN, start: int = 0
) -> list[Record]:
    return [
        harness.record(
            Rating(
                rating=value,
                user_id=f"user-{index}",
                formula_id=f"formula-{index % 17}",
                ts=harness.clock(),
                run_id=run_id,
                rating_id=f"rating-{index}",
            )
        )
        for index, value in enumerate(values, start)
    ]


def test_a_window_of_low_ratings_proposes_raising_the_entropy_coefficient() -> None:
    harness = Harness()
    feedback = harness.make(Feedback)
    values = low_ratings()
    harness.feed(feedback, ratings(harness, values[:99]))
    assert harness.commands() == []
    harness.feed(feedback, ratings(harness, values[99:], start=99))
    (proposal,) = harness.commands("retune")
    assert proposal["run_id"] == RUN
    assert proposal["command_id"] == retune_command_id(RUN, window_id=0)
    assert proposal["changes"] == {"entropy_coef": 0.02}  # the default 0.01, doubled
    assert proposal["issued_at"] == harness.clock()
    window = proposal["window"]
    assert (window["size"], window["closed_by"], window["sequence"]) == (100, "evidence", 0)
    assert window["mean"] == pytest.approx(sum(values) / 100)
    assert window["rules"]["low_mean"] == "fired"
    assert "low_mean" in proposal["rationale"]
    # The window closed at a time: checkpointed promptly; a new one starts empty.
    assert harness.checkpoints.requested == 1
    assert feedback.live.get(RUN.encode(), 0).size == 0
    assert harness.sample("fragrance_ops_feedback_windows_total", result="proposed") == 1


def test_a_proposal_starts_from_the_hyperparameters_the_run_reported() -> None:
    harness = Harness()
    training = harness.make(TrainingAgent)
    feedback = harness.make(Feedback)
    metric = StepMetric(
        run_id=RUN, step=0, loss=1.0, reward=0.5, ts=harness.clock(), entropy_coef=0.03
    )
    harness.feed(training, [harness.record(metric)])
    harness.feed(feedback, ratings(harness, low_ratings()))
    (proposal,) = harness.commands("retune")
    assert proposal["changes"] == {"entropy_coef": 0.06}


def test_replayed_ratings_change_nothing_and_the_window_closes_at_the_same_rating() -> None:
    values = low_ratings()
    clean = Harness()
    feedback = clean.make(Feedback)
    clean.feed(feedback, ratings(clean, values))
    (expected,) = clean.commands("retune")

    harness = Harness()
    feedback = harness.make(Feedback)
    first = ratings(harness, values[:60])
    harness.feed(feedback, first)
    harness.checkpoint(feedback)
    stored = dict(harness.stores["feedback-windows"].data)
    # Restarted from that checkpoint, the worker reads the 60 again (their commit was lost).
    feedback = harness.restart(Feedback)
    harness.feed(feedback, first)
    harness.checkpoint(feedback)
    assert harness.stores["feedback-windows"].data == stored
    assert harness.sample("fragrance_ops_replayed_events_total", agent="feedback") == 60
    assert harness.sample("fragrance_ops_ratings_total", status="duplicate") == 0  # not even read
    harness.feed(feedback, ratings(harness, values[60:], start=60))
    (proposal,) = harness.commands("retune")
    assert proposal == expected


def test_a_rating_naming_no_run_is_rekeyed_to_the_default_target() -> None:
    harness = Harness()
    feedback = harness.make(Feedback)
    (rating,) = ratings(harness, [2.0], run_id=None)
    assert rating.key == b"formula-0"
    harness.feed(feedback, [rating])
    by_target = by_target_topic(harness.settings)
    (copy,) = harness.output.on(by_target)
    assert copy.key == b"default"
    assert copy.value == rating.value
    assert copy.headers == [(ORIGIN_HEADER, f"0:0:{rating.topic}".encode())]
    assert harness.stores["feedback-windows"].data == {}
    assert feedback.live.get(b"default", 0).size == 0  # counted only from the copy
    # The copy, read back from the internal topic, is counted; a second copy of the same
    # original (the re-keying replayed) is recognised by the origin it names.
    assert copy.headers is not None
    headers = [(name, value) for name, value in copy.headers if isinstance(value, bytes)]
    copies = [
        harness.raw(by_target, copy.value, copy.key, partition=1, headers=headers) for _ in range(2)
    ]
    harness.feed(feedback, copies)
    assert feedback.live.get(b"default", 1).size == 1
    assert harness.sample("fragrance_ops_replayed_events_total", agent="feedback") == 1


def test_bad_ratings_are_dead_lettered_and_the_batch_goes_on() -> None:
    harness = Harness()
    feedback = harness.make(Feedback)
    source = harness.topic(Topic.RATINGS)
    good = ratings(harness, [2.0, 3.0])
    batch = [
        good[0],
        harness.raw(source, b'{"rating": 7, "user_id": "u", "formula_id": "f", "ts": 1}', b"f"),
        harness.raw(source, None, RUN.encode()),
        good[1],
    ]
    harness.feed(feedback, batch)
    dead = harness.dead_letters()
    assert [(d.offset, d.field) for d in dead] == [(2, "rating"), (3, None)]
    assert dead[1].error == "payload is empty (tombstone or null value)"
    assert dead[0].original_key == "Zg=="  # the original key, base64
    assert feedback.live.get(RUN.encode(), 0).size == 2


def test_the_timer_closes_a_window_whose_timeout_passed() -> None:
    harness = Harness()
    feedback = harness.make(Feedback)
    harness.feed(feedback, ratings(harness, low_ratings(40)))
    harness.checkpoint(feedback)
    harness.clock.advance(3599.0)
    harness.tick(feedback)
    assert harness.commands() == []
    assert harness.sample("fragrance_ops_feedback_window_ratings", target=RUN) == 40
    harness.clock.advance(1.0)
    harness.tick(feedback)
    (proposal,) = harness.commands("retune")
    assert (proposal["window"]["closed_by"], proposal["window"]["size"]) == ("timeout", 40)
    assert harness.sample("fragrance_ops_feedback_window_ratings", target=RUN) == 0


def test_a_run_s_window_is_dropped_with_the_run_once_quiet() -> None:
    harness = Harness()
    feedback = harness.make(Feedback)
    assert harness.ctx.run_state == [feedback]
    harness.feed(feedback, ratings(harness, [2.0, 3.0]))
    harness.checkpoint(feedback)
    since = harness.clock()
    assert not feedback.run_quiet(RUN, since - 1)
    assert feedback.run_quiet(RUN, since)
    assert feedback.drop_run(RUN, harness.sink)
    assert harness.sink.writes[-1] == ("feedback-windows", RUN.encode(), None, 0)
    assert harness.stores["feedback-windows"].data == {}
    assert not feedback.drop_run(RUN, harness.sink)  # nothing left to drop
