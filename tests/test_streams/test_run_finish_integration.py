"""The end of a run against Apache Kafka: a finished run's state and metric series are gone
after the retention, a restarted worker still drops what it holds and recovers the rest
exactly, a finish read again after the drop changes nothing, and a later event of the run
starts it afresh."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable

import orjson
import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    Message,
    TopicPartition,
)
from prometheus_client.parser import text_string_to_metric_families

from config.settings import Settings
from fragrance_ops.brokers import free_port
from fragrance_ops.worker_process import WorkerProcess
from producers import TrainerClient
from producers.ratings import RatingClient
from rules.reward_window import RewardWindow
from schemas import Topic, topic_name
from tests.helpers.kafka import set_group_offsets

pytestmark = pytest.mark.integration

RETENTION_S = 10.0
STEPS = 30
DONE, LIVE, KILLED = "done-run", "live-run", "killed-run"
TABLES = ("run-settings", "reward-windows", "run-operations", "feedback-windows")


def done_reward(step: int) -> float:
    return 1.0 + step * 0.1


def live_reward(step: int) -> float:
    return 2.0 + step * 0.05


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s:g} s: {what}"
        time.sleep(0.25)


def read_to_end(bootstrap: str, topics: list[str]) -> list[Message]:
    """Every record of ``topics`` (tombstones included), from their beginning to their end
    now, in one consumer (each partition in order)."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "unused", "enable.auto.commit": False}
    )
    try:
        ends = {}
        for topic in topics:
            for p in consumer.list_topics(topic, timeout=10).topics[topic].partitions:
                tp = TopicPartition(topic, p)
                ends[(topic, p)] = consumer.get_watermark_offsets(tp, timeout=10)[1]
        consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in ends])
        messages: list[Message] = []
        position = dict.fromkeys(ends, -1)
        deadline = time.monotonic() + 30
        while any(position[tp] < end - 1 for tp, end in ends.items()):
            assert time.monotonic() < deadline, f"{topics} not read to their end"
            for message in consumer.consume(1000, timeout=0.2):
                if message.error() is None:
                    messages.append(message)
                    position[(message.topic() or "", message.partition() or 0)] = (
                        message.offset() or 0
                    )
        return messages
    finally:
        consumer.close()


class Changelogs:
    """The worker's table changelogs, read as a restoring worker would."""

    def __init__(self, bootstrap: str, app_id: str) -> None:
        self.bootstrap = bootstrap
        self.tables = {f"{app_id}-{table}-changelog": table for table in TABLES}

    def history(self, run_id: str) -> dict[str, list[Message]]:
        """Per table that ever held the run's key, its records in order."""
        key = run_id.encode()
        history: dict[str, list[Message]] = {}
        for message in read_to_end(self.bootstrap, list(self.tables)):
            if message.key() == key:
                history.setdefault(self.tables[message.topic() or ""], []).append(message)
        return history

    def latest(self, run_id: str) -> dict[str, bytes | None]:
        """Per table that ever held the run's key, its newest value (None: a tombstone)."""
        return {table: records[-1].value() for table, records in self.history(run_id).items()}

    def dropped(self, run_id: str) -> bool:
        latest = self.latest(run_id)
        return set(latest) == set(TABLES) and all(value is None for value in latest.values())


def series(port: int, run_id: str) -> set[str]:
    """Names of the worker's samples labelled with the run (run_id, or target)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        sample.name
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if run_id in (sample.labels.get("run_id"), sample.labels.get("target"))
    }


def reward_stats(bootstrap: str, prefix: str, run_id: str, step: int) -> dict[str, object]:
    """The worker's statistics after the run's metric at ``step`` (the newest, if several)."""
    topic = topic_name(Topic.REWARD_STATS, prefix)
    found: list[dict[str, object]] = []

    def arrived() -> bool:
        records = (orjson.loads(m.value()) for m in read_to_end(bootstrap, [topic]))
        found[:] = [r for r in records if (r["run_id"], r["step"]) == (run_id, step)]
        return bool(found)

    wait_for(arrived, 60, f"reward statistics of {run_id} at step {step}")
    return found[-1]


def replay_from(bootstrap: str, group: str, message: Message, timeout_s: float = 60) -> None:
    """Set ``group``'s offset of ``message``'s partition to it (read again), once the group
    has no member (a killed worker's session must end first)."""
    at = TopicPartition(message.topic() or "", message.partition() or 0, message.offset() or 0)
    set_group_offsets(bootstrap, group, [at], timeout_s)


def events_read(port: int, topic: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "fragrance_ops_events"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels["topic"] == topic
    )


def test_a_finished_run_is_dropped_after_the_retention_and_nothing_brings_it_back(
    make_worker: Callable[..., WorkerProcess],
    ops_settings: Settings,
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    port = free_port("127.0.0.1")
    app_id = f"app-{topic_prefix.rstrip('.')}"  # make_worker's
    changelogs = Changelogs(kafka_bootstrap, app_id)
    runs_topic = topic_name(Topic.RUNS, topic_prefix)
    worker = make_worker(WORKER__FINISHED_RUN_RETENTION_S=str(RETENTION_S), METRICS__PORT=str(port))
    worker.start()
    done = TrainerClient(DONE, settings=ops_settings, receive_commands=False)
    live = TrainerClient(LIVE, settings=ops_settings, receive_commands=False)
    ratings = RatingClient(settings=ops_settings)
    try:
        for client, reward in ((done, done_reward), (live, live_reward)):
            client.announce({"reward.window_size": 100})
            for step in range(STEPS):
                client.log_step(step, loss=1.0, reward=reward(step), entropy=0.5)
            client.flush()
        for user in range(3):  # a rating window for each run
            ratings.rate(2, user_id=f"user-{user}", formula_id="f-1", run_id=DONE)
            ratings.rate(4, user_id=f"user-{user}", formula_id="f-1", run_id=LIVE)
        ratings.flush()
        for run_id in (DONE, LIVE):
            wait_for(
                lambda run_id=run_id: (
                    set(changelogs.latest(run_id)) == set(TABLES)
                    and "fragrance_ops_feedback_window_ratings" in series(port, run_id)
                ),
                60,
                f"{run_id}'s state in every table and its series",
            )
        assert {"fragrance_ops_rl_value", "fragrance_ops_run_last_metric_timestamp_seconds"} < (
            series(port, DONE)
        )

        # The end of the run: finished at once, dropped after the retention of quiet.
        done.finish()
        done.flush()
        wait_for(
            lambda: b'"finished"' in (changelogs.latest(DONE)["run-settings"] or b""),
            30,
            "the finish in the run's stored settings",
        )
        assert "fragrance_ops_run_finished_timestamp_seconds" in series(port, DONE)
        assert not changelogs.dropped(DONE)  # kept for the retention
        wait_for(lambda: changelogs.dropped(DONE), 60, f"tombstones for {DONE} in every table")
        finish = next(
            m
            for m in read_to_end(kafka_bootstrap, [runs_topic])
            if m.key() == DONE.encode() and b'"finished"' in (m.value() or b"")
        )
        tombstones = {table: records[-1] for table, records in changelogs.history(DONE).items()}
        for table, tombstone in tombstones.items():  # producer clocks, same machine
            assert tombstone.timestamp()[1] - finish.timestamp()[1] >= RETENTION_S * 1000, table
        # The rating window went first, the run's own state once that was on the broker.
        rating_window_gone = tombstones["feedback-windows"].timestamp()[1]
        assert all(t.timestamp()[1] >= rating_window_gone for t in tombstones.values())
        assert series(port, DONE) == set()
        assert {"fragrance_ops_rl_value", "fragrance_ops_feedback_window_ratings"} < series(
            port, LIVE
        )
        assert all(value is not None for value in changelogs.latest(LIVE).values())

        # Another run finishes and the worker is SIGKILLed before its retention is over.
        killed = TrainerClient(KILLED, settings=ops_settings, receive_commands=False)
        killed.announce()
        for step in range(5):
            killed.log_step(step, loss=1.0, reward=1.0)
        killed.finish()
        killed.close()
        wait_for(
            lambda: b'"finished"' in (changelogs.latest(KILLED).get("run-settings") or b""),
            30,
            f"the finish of {KILLED} stored",
        )
        worker.kill()
        assert not any(value is None for value in changelogs.latest(KILLED).values())
        # The finish of the dropped run read again, at its own offset, by the next life.
        replay_from(kafka_bootstrap, app_id, finish)
        worker.start()
        wait_for(lambda: events_read(port, runs_topic) >= 1, 60, "the finish read again")

        # The killed run is still dropped: the restarted worker found it in its table.
        wait_for(
            lambda: all(
                value is None
                for table, value in changelogs.latest(KILLED).items()
                if table != "feedback-windows"  # it was never rated
            ),
            60,
            f"tombstones for {KILLED}",
        )

        # What the changelogs give back is what the first life had: the live run's window
        # goes on exactly; the dropped run, a finish read again included, is not there, so
        # its late metric starts a new window.
        live.log_step(STEPS, loss=1.0, reward=live_reward(STEPS))
        live.flush()
        expected = RewardWindow(100)
        for step in range(STEPS + 1):
            stats = expected.add(live_reward(step), step=step)
        assert stats is not None
        got = reward_stats(kafka_bootstrap, topic_prefix, LIVE, STEPS)
        assert (got["count"], got["mean"], got["std"]) == (stats.count, stats.mean, stats.std)
        done.log_step(STEPS, loss=1.0, reward=done_reward(STEPS))
        done.flush()
        late = reward_stats(kafka_bootstrap, topic_prefix, DONE, STEPS)
        assert (late["count"], late["mean"], late["normalized_reward"]) == (
            1,
            done_reward(STEPS),
            0.0,
        )
        wait_for(
            lambda: changelogs.latest(DONE)["reward-windows"] is not None,
            30,
            "the new window of the late metric stored",
        )
        # Written at the checkpoint that stored the late metric's window, after the finish
        # was read again: that finish created nothing. The run's settings record is the new
        # run's: never announced, not finished, heard of at its late metric.
        latest = changelogs.latest(DONE)
        settings_record = latest["run-settings"]
        assert settings_record is not None
        assert orjson.loads(settings_record) == {
            "overrides": None,
            "algorithm": "ppo",
            "announced_at": None,
            "partition": orjson.loads(settings_record)["partition"],
            "last_metric_at": pytest.approx(time.time(), abs=120),
        }
        assert latest["feedback-windows"] is None
        assert "fragrance_ops_run_finished_timestamp_seconds" not in series(port, DONE)
    finally:
        for client in (done, live):
            client.close()
        ratings.close()
        worker.stop()
