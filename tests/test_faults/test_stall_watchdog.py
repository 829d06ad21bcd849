"""The stall watchdog's crash path, with a real worker: it crashes with the reason logged,
and a worker started after it processes everything (nothing was lost).

What counts as a stall is the rule's business (``tests/test_rules/
test_progress.py``). A stall cannot be made on demand with a healthy broker and Faust, so
the watchdog is made impatient instead (``worker.stall_timeout_s`` 0.5 s) and commits
rare (every 10 s): once the group has committed, records fetched and processed stay
uncommitted until the next commit, seconds later; for the watchdog that is what records
dropped on their way to the agents look like.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from config.settings import Settings
from fragrance_ops.worker_process import WorkerProcess
from schemas import Topic, topic_name
from tests.helpers.kafka import produce_records
from tests.test_faults.support import FIGURES, PROFILE, TopicRecorder, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults]

SCENARIO = "stall watchdog"
RUN = "watched-run"
METRICS = 10_000
COMMIT_INTERVAL_S = 10.0


def committed_records(bootstrap: str, settings: Settings, topic: str) -> int:
    """Records of ``topic`` the worker's group has committed (``make_worker``'s app id)."""
    group = f"app-{settings.kafka.topic_prefix.rstrip('.')}"
    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        partitions = reader.list_topics(topic, timeout=10).topics[topic].partitions
        offsets = reader.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        return sum(max(tp.offset, 0) for tp in offsets)
    finally:
        reader.close()


@pytest.mark.timeout(PROFILE.test_timeout_s)
def test_a_stalled_worker_crashes_with_its_reason_and_loses_nothing(
    fault_worker: Callable[..., WorkerProcess], ops_settings: Settings, kafka_bootstrap: str
) -> None:
    prefix = ops_settings.kafka.topic_prefix
    impatient = fault_worker(
        WORKER__STALL_TIMEOUT_S="0.5",
        # Far longer than the test takes to produce the burst after the first commit.
        WORKER__FAUST_OPTIONS=orjson.dumps({"broker_commit_interval": COMMIT_INTERVAL_S}).decode(),
    )
    impatient.start()
    now = time.time()
    metrics = [
        (
            RUN.encode(),
            orjson.dumps({"run_id": RUN, "step": s, "loss": 1.0, "reward": 1.0, "ts": now}),
        )
        for s in range(METRICS)
    ]
    metrics_topic = topic_name(Topic.METRICS, prefix)
    with TopicRecorder(kafka_bootstrap, [topic_name(Topic.REWARD_STATS, prefix)]) as recorder:
        # Until the group's first commit the watchdog has no committed offset to compare.
        produce_records(kafka_bootstrap, metrics_topic, metrics[:1])
        wait_for(
            lambda: committed_records(kafka_bootstrap, ops_settings, metrics_topic) == 1,
            60,
            "the first metric committed",
        )
        began = time.monotonic()
        produce_records(kafka_bootstrap, metrics_topic, metrics[1:])
        wait_for(lambda: not impatient.running, 60, "the impatient worker crashed")
        crashed_after_s = time.monotonic() - began
        log = impatient.log_since_start()
        assert "input stalled, crashing so the supervisor restarts me" in log, log[-5000:]
        assert "WorkerStalled" in log
        impatient.stop()
        patient = fault_worker()
        patient.start()
        recorder.wait(
            lambda records: {r.json()["step"] for r in records} >= set(range(METRICS)),
            120,
            "a reward-stats record for every metric from the worker started after the crash",
        )
        patient.stop()
    FIGURES.record(SCENARIO, metrics=METRICS, crashed_after_seconds=crashed_after_s)
