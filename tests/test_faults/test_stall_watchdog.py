"""The stall watchdog's crash path, with a real worker: it crashes with the reason logged,
and a worker started after it processes everything (nothing was lost).

What counts as a stall is the rule's business (``tests/test_streams/test_rules/
test_progress.py``). A stall cannot be made on demand with a healthy broker and Faust, so
the watchdog is made impatient instead: every batch waits for its outputs, which the output
producer holds for 2 s (``worker.output_linger_ms``), four times ``worker.stall_timeout_s``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import orjson
import pytest

from fragrance_ops.settings import Settings
from fragrance_ops.worker_process import WorkerProcess
from schemas import Topic, topic_name
from tests.helpers.kafka import produce_records
from tests.test_faults.support import FIGURES, PROFILE, TopicRecorder, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults]

SCENARIO = "stall watchdog"
RUN = "watched-run"
METRICS = 10_000


@pytest.mark.timeout(PROFILE.test_timeout_s)
def test_a_stalled_worker_crashes_with_its_reason_and_loses_nothing(
    fault_worker: Callable[..., WorkerProcess], ops_settings: Settings, kafka_bootstrap: str
) -> None:
    prefix = ops_settings.kafka.topic_prefix
    impatient = fault_worker(WORKER__STALL_TIMEOUT_S="0.5", WORKER__OUTPUT_LINGER_MS="2000")
    impatient.start()
    now = time.time()
    metrics = [
        (
            RUN.encode(),
            orjson.dumps({"run_id": RUN, "step": s, "loss": 1.0, "reward": 1.0, "ts": now}),
        )
        for s in range(METRICS)
    ]
    began = time.monotonic()
    with TopicRecorder(kafka_bootstrap, [topic_name(Topic.REWARD_STATS, prefix)]) as recorder:
        produce_records(kafka_bootstrap, topic_name(Topic.METRICS, prefix), metrics)
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
