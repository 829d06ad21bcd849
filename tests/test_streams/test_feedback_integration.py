"""Feedback retuning end to end: the rating SDK, the broker, the worker, a trainer."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from config.settings import Settings
from fragrance_ops.worker_process import WorkerProcess
from producers import RatingClient, TrainerClient
from producers.reference import PPOConfig, ReferencePPOTrainer
from producers.reference.ppo import StepReport
from schemas import Topic, topic_name
from tests.helpers.kafka import consume_until, produce_records

pytestmark = pytest.mark.integration


def low_ratings(count: int = 100, seed: int = 7) -> list[float]:
    """Mean about 2.5, variance about 0.65: only the low-mean rule has a case."""
    rng = random.Random(seed)
    return [float(v) for v in rng.choices([1, 2, 3, 4, 5], [0.1, 0.4, 0.4, 0.1, 0.0], k=count)]


def send(ratings: RatingClient, values: list[float], run_id: str, start: int = 0) -> None:
    for index, value in enumerate(values, start):
        ratings.rate(
            value,
            user_id=f"user-{index}",
            formula_id=f"formula-{index % 17}",
            run_id=run_id,
            rating_id=f"{run_id}-rating-{index}",  # the app's own id: resends count once
        )
    assert ratings.flush(30) == 0


def retunes(kafka_bootstrap: str, settings: Settings, count: int) -> list[dict[str, object]]:
    topic = topic_name(Topic.COMMANDS, settings.kafka.topic_prefix)
    messages = consume_until(
        kafka_bootstrap,
        topic,
        lambda got: sum(b'"retune"' in (m.value() or b"") for m in got) >= count,
        30,
    )
    decoded = [orjson.loads(message.value()) for message in messages]
    return [command for command in decoded if command["type"] == "retune"]


def test_low_ratings_propose_one_entropy_raise_even_when_sent_twice(
    make_worker: Callable[..., WorkerProcess], ops_settings: Settings, kafka_bootstrap: str
) -> None:
    values = low_ratings()
    with make_worker(), RatingClient(settings=ops_settings) as ratings:
        send(ratings, values, "run-low")
        send(ratings, values, "run-low")  # the same 100 ratings again
        (proposal,) = retunes(kafka_bootstrap, ops_settings, 1)
        time.sleep(2)  # would a second proposal follow? give the worker time to say so
        assert len(retunes(kafka_bootstrap, ops_settings, 1)) == 1
    assert proposal["run_id"] == "run-low"
    assert proposal["changes"] == {"entropy_coef": 0.02}  # 0.01 (the default) x 2
    window = proposal["window"]
    assert isinstance(window, dict)
    assert window["size"] == 100
    assert window["mean"] == pytest.approx(sum(values) / 100)
    assert "low_mean" in str(proposal["rationale"])


def test_a_worker_killed_mid_window_closes_it_at_the_same_rating(
    make_worker: Callable[..., WorkerProcess], ops_settings: Settings, kafka_bootstrap: str
) -> None:
    values = low_ratings(seed=11)
    worker = make_worker()
    worker.start()
    with RatingClient(settings=ops_settings) as ratings:
        send(ratings, values[:60], "run-killed")
        time.sleep(3)  # processed and its state written (or not: both must work)
        worker.kill()
        worker.start()
        send(ratings, values[60:], "run-killed", start=60)
        (proposal,) = retunes(kafka_bootstrap, ops_settings, 1)
    worker.stop()
    window = proposal["window"]
    assert isinstance(window, dict)
    assert window["size"] == 100
    assert window["mean"] == pytest.approx(sum(values) / 100)


def test_malformed_ratings_are_dead_lettered_with_reasons(
    make_worker: Callable[..., WorkerProcess], ops_settings: Settings, kafka_bootstrap: str
) -> None:
    prefix = ops_settings.kafka.topic_prefix
    bad = [
        b'{"rating": 7, "user_id": "u", "formula_id": "f", "ts": 1.0}',
        b'{"rating": 4, "formula_id": "f", "ts": 1.0}',
        b'{"rating": "five", "user_id": "u", "formula_id": "f", "ts": 1.0}',
        b"not json",
    ]
    with make_worker():
        produce_records(
            kafka_bootstrap, topic_name(Topic.RATINGS, prefix), [(b"f", value) for value in bad]
        )
        letters = consume_until(
            kafka_bootstrap,
            topic_name(Topic.DEAD_LETTER, prefix),
            lambda got: len(got) >= len(bad),
            30,
        )
    reasons = [orjson.loads(letter.value())["error"] for letter in letters]
    fields = [orjson.loads(letter.value()).get("field") for letter in letters]
    assert fields[:3] == ["rating", "user_id", "rating"]
    assert all(reasons)


def test_a_proposal_reaches_the_reference_trainer_and_changes_its_learning_rate(
    make_worker: Callable[..., WorkerProcess],
    ops_settings: Settings,
    kafka_bootstrap: str,
    tmp_path: Path,
) -> None:
    # Many 1s and 5s: variance 2.65, mean 3.45 -> lower the learning rate only, at 100.
    values = [1.0] * 25 + [2.0] * 5 + [3.0] * 10 + [4.0] * 20 + [5.0] * 40
    random.Random(3).shuffle(values)
    with make_worker(), RatingClient(settings=ops_settings) as ratings:
        trainer = ReferencePPOTrainer(
            TrainerClient("ppo-rated", settings=ops_settings),
            tmp_path / "ppo-rated",
            config=PPOConfig(rollout_steps=256),
        )
        sent = False

        def rate_then_wait(report: StepReport) -> None:
            nonlocal sent
            if report.step == 20 and not sent:  # the stream knows the run's rate by now
                send(ratings, values, "ppo-rated")
                sent = True
            time.sleep(0.01)

        deadline = time.monotonic() + 60
        while trainer.ops.learning_rate == 1e-3 and time.monotonic() < deadline:
            trainer.train(trainer.ops.step + 50, on_step=rate_then_wait)
        assert trainer.ops.learning_rate == pytest.approx(5e-4)
        assert [group["lr"] for group in trainer.optimizer.param_groups] == [pytest.approx(5e-4)]
        trainer.ops.client.close()
        acks = consume_until(
            kafka_bootstrap,
            topic_name(Topic.ACKS, ops_settings.kafka.topic_prefix),
            lambda got: any(b'"retune"' in (m.value() or b"") for m in got),
            30,
        )
    retune_acks = [
        orjson.loads(m.value()) for m in acks if b'"command_type":"retune"' in (m.value() or b"")
    ]
    (ack,) = retune_acks
    assert ack["status"] == "applied"
    assert ack["before"] == {"learning_rate": pytest.approx(1e-3)}
    assert ack["after"] == {"learning_rate": pytest.approx(5e-4)}


def test_ratings_without_a_run_are_windowed_under_the_default_target(
    make_worker: Callable[..., WorkerProcess], ops_settings: Settings, kafka_bootstrap: str
) -> None:
    values = low_ratings(seed=5)
    with make_worker(), RatingClient(settings=ops_settings) as ratings:
        for index, value in enumerate(values):  # keyed by formula: spread over partitions
            ratings.rate(value, user_id=f"user-{index}", formula_id=f"formula-{index}")
        assert ratings.flush(30) == 0
        (proposal,) = retunes(kafka_bootstrap, ops_settings, 1)
    assert proposal["run_id"] == ops_settings.retune.default_target
    window = proposal["window"]
    assert isinstance(window, dict)
    assert window["size"] == 100
    assert window["mean"] == pytest.approx(sum(values) / 100)
