"""The trainer's in-process reward window equals the worker's, to the bit, on the same stream:
SDK -> broker -> worker process -> trainer.reward-stats, against producers.reward_window."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import orjson
import pytest

from config.settings import Settings
from fragrance_ops.worker_process import WorkerProcess
from producers import TrainerClient
from producers.reward_window import TrainerRewardWindow
from rules.reward_window import WindowStats
from schemas import Topic, topic_name
from tests.helpers.kafka import consume_until

pytestmark = pytest.mark.integration

RUN = "window-run"


def rewards(seed: int, steps: int) -> list[float]:
    rng = np.random.default_rng(seed)
    values = [float(r) for r in rng.normal(3.0, 2.0, size=steps)]
    for k in range(17, steps, 97):  # non-finite rewards mixed in: the worker skips them
        values[k] = [math.nan, math.inf, -math.inf][k % 3]
    return values


def test_in_process_window_equals_the_workers_reward_stats(
    make_worker: Callable[..., WorkerProcess], ops_settings: Settings, kafka_bootstrap: str
) -> None:
    first, retry = rewards(5, 1200), rewards(6, 500)
    # attempt 0: steps 0..1199, then a replay of 1100..1199 (a resent batch); attempt 1 (after
    # a rollback to step 1000): steps 1000..1499. The window (1,000) wraps in both attempts.
    feed = (
        [(0, step, reward) for step, reward in enumerate(first)]
        + [(0, step, first[step]) for step in range(1100, 1200)]
        + [(1, 1000 + k, reward) for k, reward in enumerate(retry)]
    )
    window = TrainerRewardWindow(settings=ops_settings)
    expected: list[WindowStats] = []
    steps: list[int] = []
    for attempt, step, reward in feed:
        stats = window.add(reward, step=step, attempt=attempt)
        if stats is not None:
            expected.append(stats)
            steps.append(step)
    assert 0 < len(expected) < len(feed)  # some rewards were skipped
    stats_topic = topic_name(Topic.REWARD_STATS, ops_settings.kafka.topic_prefix)
    with make_worker():
        for attempt in (0, 1):
            with TrainerClient(
                RUN, settings=ops_settings, attempt=attempt, receive_commands=False
            ) as client:
                for entry_attempt, step, reward in feed:
                    if entry_attempt == attempt:
                        client.log_step(step, loss=1.0, reward=reward)
                client.flush()
                assert client.stats.dropped == 0
        messages = consume_until(
            kafka_bootstrap,
            stats_topic,
            lambda got: len(got) >= len(expected),
            timeout=120,
            to_end=True,  # nothing more may follow
        )
    records = [orjson.loads(message.value()) for message in messages]
    assert all(record["run_id"] == RUN for record in records)
    # One partition holds the run: its records are in the order the worker fed its window.
    assert [record["step"] for record in records] == steps
    for record, stats in zip(records, expected, strict=True):
        assert record["reward"] == stats.reward, record
        assert record["normalized_reward"] == stats.normalized_reward, record
        assert record["mean"] == stats.mean, record
        assert record["std"] == stats.std, record
        assert record["count"] == stats.count, record
    assert records[-1]["count"] == 1000
