"""The reward normalizer end to end: SDK -> broker -> worker process -> trainer.reward-stats."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable

import numpy as np
import orjson
import pytest
from confluent_kafka import Message, Producer

from config.settings import Settings
from fragrance_ops.worker_process import WorkerProcess
from producers import TrainerClient
from rules.reward_window import RewardWindow
from schemas import Topic, topic_name
from tests.helpers.kafka import consume_until
from tests.helpers.reference import window_stats

pytestmark = pytest.mark.integration

WINDOW = 1000


def make_rewards(seed: int, steps_by_run: dict[str, int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        run_id: rng.normal(loc=10.0 * (i + 1), scale=3.0 + i, size=steps)
        for i, (run_id, steps) in enumerate(steps_by_run.items())
    }


def publish(settings: Settings, rewards: dict[str, np.ndarray], start: int, stop: int) -> None:
    clients = {
        run: TrainerClient(run, settings=settings, receive_commands=False) for run in rewards
    }
    for step in range(start, stop):
        for run, client in clients.items():
            if step < len(rewards[run]):
                client.log_step(step, loss=1.0, reward=float(rewards[run][step]))
    for client in clients.values():
        client.close()
        assert client.stats.dropped == 0


def distinct_steps(messages: list[Message]) -> set[tuple[str, int]]:
    steps = set()
    for message in messages:
        stat = orjson.loads(message.value())
        steps.add((stat["run_id"], stat["step"]))
    return steps


def assert_matches_numpy(messages: list[Message], rewards: dict[str, np.ndarray]) -> None:
    """Every reward-stats record (duplicates included) equals numpy over the same window."""
    for message in messages:
        stat = orjson.loads(message.value())
        run, step = stat["run_id"], stat["step"]
        assert message.key() == run.encode()
        mean, std, count = window_stats(rewards[run], step, WINDOW)
        assert stat["count"] == count, (run, step)
        assert stat["reward"] == rewards[run][step]
        assert stat["mean"] == pytest.approx(mean, rel=1e-9), (run, step)
        assert stat["std"] == pytest.approx(std, rel=1e-9), (run, step)
        assert stat["normalized_reward"] == pytest.approx(
            (rewards[run][step] - mean) / std if std > 0 else 0.0, rel=1e-9, abs=1e-12
        )


def test_three_runs_20000_metrics_match_numpy(
    make_worker: Callable[..., WorkerProcess], ops_settings: Settings, kafka_bootstrap: str
) -> None:
    rewards = make_rewards(1, {"run-a": 7000, "run-b": 7000, "run-c": 6000})
    with make_worker():
        publish(ops_settings, rewards, 0, 7000)
        stats_topic = topic_name(Topic.REWARD_STATS, ops_settings.kafka.topic_prefix)
        messages = consume_until(
            kafka_bootstrap, stats_topic, lambda got: len(got) >= 20_000, timeout=180
        )
    assert len(messages) == 20_000
    assert len(distinct_steps(messages)) == 20_000
    assert_matches_numpy(messages, rewards)


def test_sigkill_midway_continues_every_window_exactly(
    make_worker: Callable[..., WorkerProcess], ops_settings: Settings, kafka_bootstrap: str
) -> None:
    rewards = make_rewards(2, {"run-a": 3000, "run-b": 3000, "run-c": 2500})
    total = sum(len(r) for r in rewards.values())
    stats_topic = topic_name(Topic.REWARD_STATS, ops_settings.kafka.topic_prefix)
    worker = make_worker()
    worker.start()
    publish(ops_settings, rewards, 0, 1500)
    consume_until(kafka_bootstrap, stats_topic, lambda got: len(got) >= 2000, timeout=120)
    worker.kill()
    publish(ops_settings, rewards, 1500, 3000)
    worker.start()
    messages = consume_until(
        kafka_bootstrap, stats_topic, lambda got: len(distinct_steps(got)) >= total, timeout=180
    )
    worker.stop()
    assert len(distinct_steps(messages)) == total
    # Duplicates after the crash are allowed (at-least-once output); each must carry the
    # statistics of the uncrashed window: no reset, no double counting.
    assert_matches_numpy(messages, rewards)


BAD_PAYLOADS: list[Callable[[int], bytes]] = [
    lambda i: b'{"run_id": "run-x", "step": ' + str(i).encode() + b", ",  # truncated JSON
    lambda i: orjson.dumps({"run_id": "run-x", "loss": 1.0, "reward": 2.0, "ts": 1.0, "n": i}),
    lambda i: orjson.dumps(
        {"run_id": "run-x", "step": str(i), "loss": 1.0, "reward": 1.0, "ts": 1.0}
    ),
    lambda i: b'{"run_id":"run-x","step":%d,"loss":1e999,"reward":1.0,"ts":1.0}' % i,
    lambda i: b'{"run_id":"run-x","step":%d,"loss":1.0,"reward":NaN,"ts":1.0}' % i,
    lambda i: orjson.dumps(
        {"run_id": "run-x", "step": -i - 1, "loss": 1.0, "reward": 1.0, "ts": 1.0}
    ),
    lambda i: f'{{"run_id":"r","step":{i},"loss":1,"reward":1,"ts":1}}'.encode("utf-16"),
    lambda i: b'{"run_id":"\xff\xfe%d","step":1,"loss":1,"reward":1,"ts":1}' % i,
    lambda i: orjson.dumps([i, "not an object"]),
    lambda i: orjson.dumps({"run_id": "run-x", "step": i, "loss": 1.0, "reward": True, "ts": 1.0}),
]


def bad_payload(i: int) -> bytes:
    return BAD_PAYLOADS[i % len(BAD_PAYLOADS)](i)


def test_malformed_metrics_are_dead_lettered_and_good_ones_processed(
    make_worker: Callable[..., WorkerProcess], ops_settings: Settings, kafka_bootstrap: str
) -> None:
    prefix = ops_settings.kafka.topic_prefix
    rewards = make_rewards(3, {"run-a": 5000, "run-b": 5000})
    bad = [bad_payload(i) for i in range(1000)]
    assert len(set(bad)) == 1000
    with make_worker():
        producer = Producer({"bootstrap.servers": kafka_bootstrap, "partitioner": "murmur2_random"})
        metrics_topic = topic_name(Topic.METRICS, prefix)
        good_steps = 0
        for step in range(5000):
            for run, values in rewards.items():
                metric = {
                    "run_id": run,
                    "step": step,
                    "loss": 1.0,
                    "reward": float(values[step]),
                    "ts": 1.0,
                }
                producer.produce(metrics_topic, orjson.dumps(metric), run.encode())
                good_steps += 1
                if good_steps % 10 == 0:
                    producer.produce(metrics_topic, bad[good_steps // 10 - 1], b"run-a")
            producer.poll(0)
        assert producer.flush(30) == 0
        dead = consume_until(
            kafka_bootstrap,
            topic_name(Topic.DEAD_LETTER, prefix),
            lambda got: len(got) >= 1000,
            timeout=120,
        )
        stats = consume_until(
            kafka_bootstrap,
            topic_name(Topic.REWARD_STATS, prefix),
            lambda got: len(got) >= 10_000,
            timeout=120,
        )
    letters = [orjson.loads(message.value()) for message in dead]
    assert sorted(base64.b64decode(letter["payload"]) for letter in letters) == sorted(bad)
    for letter, message in zip(letters, dead, strict=True):
        assert letter["source_topic"] == metrics_topic
        assert letter["error"], letter
        assert message.key() == b"run-a"
        assert dict(message.headers() or [])["error.class"] == b"InvalidEvent"
    reasons = {letter["error"].split(":")[0] for letter in letters}
    assert any("JSON" in reason for reason in reasons)
    assert any("greater than or equal to 0" in reason for reason in reasons)
    assert len(stats) == 10_000
    assert len(distinct_steps(stats)) == 10_000
    assert_matches_numpy(stats, rewards)


def test_the_trainer_reads_the_newest_window_statistics_of_its_own_run_from_now_on(
    make_worker: Callable[..., WorkerProcess], ops_settings: Settings, kafka_bootstrap: str
) -> None:
    rewards = make_rewards(3, {"reader": 400, "other": 400})
    stats_topic = topic_name(Topic.REWARD_STATS, ops_settings.kafka.topic_prefix)
    with make_worker():
        # History on the partition: 200 steps of this run (an earlier attempt), 400 of another.
        history = {"reader": rewards["reader"][:200], "other": rewards["other"]}
        publish(ops_settings, history, 0, 400)
        consume_until(
            kafka_bootstrap, stats_topic, lambda got: ("reader", 199) in distinct_steps(got)
        )
        with TrainerClient(
            "reader", settings=ops_settings, receive_commands=False, receive_reward_stats=True
        ) as client:
            reader = client._stats_reader
            assert reader is not None
            assert reader.wait_caught_up(60)  # at the partition's end
            assert client.reward_stats is None  # the history was not read
            for step in range(200, 400):
                client.log_step(step, loss=1.0, reward=float(rewards["reader"][step]))
            client.flush()
            deadline = time.monotonic() + 60
            while (stats := client.reward_stats) is None or stats.step < 399:
                assert time.monotonic() < deadline, f"newest stats read: {stats}"
                time.sleep(0.05)
    # The worker's window (all 400 rewards of the run), as the rule computes it, to the bit.
    window = RewardWindow(WINDOW)
    for step, reward in enumerate(rewards["reader"]):
        expected = window.add(float(reward), step=step)
    assert expected is not None
    assert (stats.run_id, stats.reward, stats.count) == ("reader", expected.reward, 400)
    assert (stats.mean, stats.std) == (expected.mean, expected.std)
    assert stats.normalized_reward == expected.normalized_reward
