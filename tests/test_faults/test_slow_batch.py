"""Scenario 2: a slow batch at the head of a partition when the worker is killed.

faust-streaming#606: offsets committed while an agent was still processing what they cover,
so a crash lost those events. Here thousands of metrics of new runs sit at the head of one
partition: the worker takes them in one batch that needs seconds (every run is new state,
a reward window, an entropy command), while Faust commits every 100 ms for the partitions
that keep flowing. The worker is SIGKILLed once part of that batch's outputs are out, and
after the restart every event of the batch is processed: no offset ran ahead of the work.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from config.settings import Settings
from fragrance_ops.worker_process import WorkerProcess
from producers.partitioning import partition_for_key
from schemas import StepMetric, Topic, encode, topic_name
from tests.helpers.kafka import produce_records
from tests.test_faults.support import (
    FIGURES,
    PROFILE,
    Background,
    Sent,
    TopicRecorder,
    TrainingOracle,
    command_view,
    stats_view,
)
from tests.test_streams.conftest import TEST_PARTITIONS

pytestmark = [pytest.mark.integration, pytest.mark.faults]

SCENARIO = "2 slow batch at a partition's head"
SLOW_PARTITION = 0


def runs_on_partition(prefix: str, partition: int, count: int) -> list[str]:
    runs: list[str] = []
    n = 0
    while len(runs) < count:
        run_id = f"{prefix}-{n}"
        if partition_for_key(run_id.encode(), TEST_PARTITIONS) == partition:
            runs.append(run_id)
        n += 1
    return runs


def metric(run_id: str, step: int, reward: float) -> bytes:
    return encode(StepMetric(run_id=run_id, step=step, loss=1.0, reward=reward, ts=time.time()))


@pytest.mark.timeout(PROFILE.test_timeout_s)
def test_a_batch_in_flight_when_killed_is_processed_after_restart(
    fault_worker: Callable[..., WorkerProcess], ops_settings: Settings, kafka_bootstrap: str
) -> None:
    rng = random.Random(PROFILE.seed)
    prefix = ops_settings.kafka.topic_prefix
    metrics_topic = topic_name(Topic.METRICS, prefix)
    stats_topic = topic_name(Topic.REWARD_STATS, prefix)
    commands_topic = topic_name(Topic.COMMANDS, prefix)
    heavy = PROFILE.slow_batch_runs
    worker = fault_worker(
        WORKER__BATCH_MAX_EVENTS=str(heavy),
        # One fetch may hand the agent the whole head of the partition, and Faust commits
        # every 100 ms: a commit that covered unfinished events would be caught.
        WORKER__FAUST_OPTIONS=orjson.dumps(
            {
                "broker_commit_interval": 0.1,
                "broker_max_poll_records": heavy,
                "stream_buffer_maxsize": 2 * heavy,
            }
        ).decode(),
    )
    sent: list[Sent] = []
    slow_runs = runs_on_partition("slow", SLOW_PARTITION, heavy)
    head = [(run.encode(), metric(run, 0, rng.uniform(-1, 1))) for run in slow_runs]
    produce_records(kafka_bootstrap, metrics_topic, head)
    sent += [Sent(metrics_topic, key, value, 0.0) for key, value in head]

    # The other partitions keep flowing, so their offsets keep being committed.
    light = [
        run
        for run in (f"light-{n}" for n in range(40))
        if partition_for_key(run.encode(), TEST_PARTITIONS) != SLOW_PARTITION
    ][:6]
    light_steps = dict.fromkeys(light, 0)

    def trickle() -> None:
        records = []
        for run in light:
            value = metric(run, light_steps[run], rng.uniform(0, 5))
            light_steps[run] += 1
            records.append((run.encode(), value))
        produce_records(kafka_bootstrap, metrics_topic, records)
        sent.extend(Sent(metrics_topic, key, value, 0.0) for key, value in records)

    slow_keys = {run.encode() for run in slow_runs}
    kills: list[float] = []
    with TopicRecorder(kafka_bootstrap, [stats_topic, commands_topic]) as recorder:
        flow = Background("trickle", trickle, 0.05).start()
        worker.start()
        try:
            for round_ in range(PROFILE.slow_batch_kills):
                # Kill once a further slice of the head batch is out, but not all of it.
                target = heavy * (round_ + 1) // (PROFILE.slow_batch_kills + 2)

                def head_out(records: list[Any]) -> int:
                    return len(
                        {r.key for r in records if r.topic == stats_topic and r.key in slow_keys}
                    )

                recorder.wait(
                    lambda records, target=target: head_out(records) >= target,
                    120,
                    f"{target} of the head batch's outputs",
                )
                seen = head_out(recorder.records())
                worker.kill()
                kills.append(seen / heavy)
                assert seen < heavy, "the batch finished before the kill: make it heavier"
                worker.start()
            restarted = time.monotonic()
            recorder.wait(
                lambda records: head_out(records) >= heavy,
                120,
                "every metric of the head batch processed after the restart",
            )
            finished_s = max(r.at for r in recorder.records() if r.key in slow_keys) - restarted
        finally:
            flow.close()
        expected = TrainingOracle(ops_settings).feed_all(sent, prefix)
        records = recorder.wait(
            lambda records: (
                expected.distinct_stats()
                <= {stats_view(r.json()) for r in records if r.topic == stats_topic}
            ),
            120,
            "every reward statistic",
        )
        worker.stop()

    stats = [r for r in records if r.topic == stats_topic]
    assert {stats_view(r.json()) for r in stats} == expected.distinct_stats()
    commands = {}
    for record in records:
        if record.topic == commands_topic:
            view = command_view(record.json())
            assert commands.setdefault(view["command_id"], view) == view
    assert commands == expected.commands
    head_records = [r for r in stats if r.key in slow_keys]
    FIGURES.record(
        SCENARIO,
        head_batch_events=heavy,
        kills=len(kills),
        fraction_out_when_killed=[round(k, 2) for k in kills],
        rest_of_head_processed_within_s_of_restart=finished_s,
        events_checked=expected.metrics,
        commands_checked=len(expected.commands),
        head_outputs_repeated_after_restart=len(head_records) - heavy,
        losses=len(expected.distinct_stats() - {stats_view(r.json()) for r in stats}),
    )
