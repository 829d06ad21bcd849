"""Scenario 9: a worker started behind a backlog drains it, without a stall or a restart.

A worker that falls behind (an outage, a deploy, a rebalance with a long lag) must catch
up, not crash-loop: issue 14 saw a worker started on 300,000 metrics stall after about
107,000 (the stall watchdog found every metrics partition stuck for 61 s) and stall again
after each restart. Here the backlog (50,000 metrics in the short profile, 300,000 in the
long one, of 100 runs on 8 partitions) is on the broker before the worker starts, with the
suite's impatient watchdog (15 s); the worker must drain it in one life, and every reward
statistic must be the one the rules give for the runs' metrics in order.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest

from config.settings import KafkaSettings, Settings
from fragrance_ops.admin import create_contract_topics
from fragrance_ops.worker_process import WorkerProcess
from schemas import StepMetric, Topic, encode, topic_name
from tests.helpers.kafka import produce_records
from tests.test_faults.conftest import FAULT_WORKER_DEFAULTS
from tests.test_faults.support import (
    FIGURES,
    PROFILE,
    Sent,
    TopicRecorder,
    TrainingOracle,
    smooth_loss,
    smooth_reward,
    stats_view,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

SCENARIO = "9 catch-up behind a backlog"
RUNS = 100
PARTITIONS = 8


@pytest.mark.timeout(PROFILE.test_timeout_s)
def test_a_worker_started_behind_a_backlog_drains_it_in_one_life(
    make_worker: Callable[..., WorkerProcess], ops_settings: Settings, kafka_bootstrap: str
) -> None:
    prefix = ops_settings.kafka.topic_prefix
    create_contract_topics(
        KafkaSettings(bootstrap_servers=kafka_bootstrap, topic_prefix=prefix, partitions=PARTITIONS)
    )
    metrics_topic = topic_name(Topic.METRICS, prefix)
    stats_topic = topic_name(Topic.REWARD_STATS, prefix)
    rng = random.Random(PROFILE.seed)
    phases = {f"backlog-{n}": rng.uniform(0, 6.28) for n in range(RUNS)}
    now = time.time()
    backlog = [
        (
            run.encode(),
            encode(
                StepMetric(
                    run_id=run,
                    step=step,
                    loss=smooth_loss(step, phase),
                    reward=smooth_reward(step, phase),
                    ts=now,
                )
            ),
        )
        for step in range(PROFILE.backlog_metrics // RUNS)
        for run, phase in phases.items()
    ]
    produce_records(kafka_bootstrap, metrics_topic, backlog)
    expected = TrainingOracle(ops_settings).feed_all(
        (Sent(metrics_topic, key, value, 0.0) for key, value in backlog), prefix
    )
    wanted = expected.distinct_stats()
    assert len(wanted) == len(backlog)

    worker = make_worker(**FAULT_WORKER_DEFAULTS, KAFKA__PARTITIONS=str(PARTITIONS))
    with TopicRecorder(kafka_bootstrap, [stats_topic]) as recorder:
        worker.start()
        records = recorder.wait(
            lambda records: len({stats_view(r.json()) for r in records}) >= len(wanted),
            PROFILE.test_timeout_s / 2,
            f"a reward statistic for each of the {len(backlog)} metrics",
            lambda: f"{len(recorder.records())} statistics so far; log:\n{worker.tail()}",
        )
        assert worker.running, worker.tail()
        log = worker.log_since_start()
        worker.stop()

    assert "input stalled" not in log, log[-5000:]
    assert worker.starts == 1
    assert {stats_view(r.json()) for r in records} == wanted  # every one exact, none wrong
    created = sorted(r.at for r in records)
    FIGURES.record(
        SCENARIO,
        backlog_metrics=len(backlog),
        runs=RUNS,
        partitions=PARTITIONS,
        drained_in_s=created[-1] - created[0],
        statistics_per_s=len(records) / max(created[-1] - created[0], 1e-9),
        statistics_repeated=len(records) - len(wanted),
        worker_lives=worker.starts,
    )
