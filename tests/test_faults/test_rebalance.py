"""Scenario 3: a second worker joins and leaves the group again and again under traffic.

Every partition keeps being consumed (each membership change is followed, within a bound
this test measures and reports, by output for metrics sent after it on every partition),
nothing is lost, and no command is applied twice.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import defaultdict
from collections.abc import Callable

import pytest

from config.settings import Settings
from fragrance_ops.worker_process import WorkerProcess
from producers.partitioning import partition_for_key
from schemas import Topic, topic_name
from tests.test_faults.support import (
    FIGURES,
    PROFILE,
    TRAINING_OVERRIDES,
    Seen,
    SimTrainer,
    TopicRecorder,
    TrainerPlan,
    check_training,
    configured,
    describe_missing_training_outputs,
    missing_training_outputs,
    runs_on_every_partition,
    stop_trainers,
    training_oracle,
    wait_until_applied,
    worker_settings_env,
)
from tests.test_streams.conftest import TEST_PARTITIONS

pytestmark = [pytest.mark.integration, pytest.mark.faults]

SCENARIO = "3 rebalances"
#: Not an expectation: a rebalance slower than this means the group is stuck (faust#133).
SANITY_BOUND_S = 60.0


def progressed_since(
    records: list[Seen], since: float, sent_at: dict[tuple[str, int], list[float]]
) -> bool:
    """Whether every partition produced output for a metric sent at or after ``since``."""
    partitions = set()
    for record in records:
        if record.at < since:
            continue
        stats = record.json()
        run, step = stats["run_id"], stats["step"]
        if any(at >= since for at in sent_at.get((run, step), ())):
            partitions.add(partition_for_key(run.encode(), TEST_PARTITIONS))
    return len(partitions) == TEST_PARTITIONS


def longest_stall(records: list[Seen], start: float, end: float) -> float:
    """The longest time any partition went without output within [start, end]: how long a
    membership change stopped its consumption (traffic flows at about 80 metrics/s/run)."""
    arrivals: dict[int, list[float]] = defaultdict(list)
    for record in records:
        run = record.json()["run_id"]
        arrivals[partition_for_key(run.encode(), TEST_PARTITIONS)].append(record.at)
    stall = 0.0
    for times in arrivals.values():
        times.sort()
        before = [t for t in times if t < start]
        inside = [t for t in times if start <= t <= end]
        points = [before[-1] if before else start, *inside, end]
        stall = max(stall, *(b - a for a, b in itertools.pairwise(points)))
    return stall


@pytest.mark.timeout(PROFILE.test_timeout_s)
def test_workers_joining_and_leaving_keep_every_partition_flowing(
    fault_worker: Callable[..., WorkerProcess], ops_settings: Settings, kafka_bootstrap: str
) -> None:
    rng = random.Random(PROFILE.seed)
    settings = configured(ops_settings, TRAINING_OVERRIDES)
    prefix = settings.kafka.topic_prefix
    stats_topic = topic_name(Topic.REWARD_STATS, prefix)
    metrics_topic = topic_name(Topic.METRICS, prefix)
    env = worker_settings_env(TRAINING_OVERRIDES)
    steady, joining = fault_worker(**env), fault_worker(**env)
    steady.start()
    plans = [
        TrainerPlan(run, [rng.randint(400, 700) for _ in range(3)], phase=rng.uniform(0, 6))
        for run in runs_on_every_partition("rebalanced", TEST_PARTITIONS)
    ]
    trainers = [SimTrainer(plan, settings, pause_s=PROFILE.step_pause_s) for plan in plans]
    settles: dict[str, list[float]] = defaultdict(list)
    ready_s: list[float] = []

    def sent_at() -> dict[tuple[str, int], list[float]]:
        times: dict[tuple[str, int], list[float]] = defaultdict(list)
        for trainer in trainers:
            for sent in trainer.transport.records():
                if sent.topic == metrics_topic:
                    # the step is in the payload; the run is the key
                    step = int(sent.value.split(b'"step":', 1)[1].split(b",", 1)[0])
                    times[(trainer.run_id, step)].append(sent.at)
        return times

    def measure(kind: str, changed_at: float, flowing_after: float) -> None:
        """Wait until every partition flows again after ``flowing_after``; record the longest
        stall since ``changed_at``."""

        def flowing(records: list[Seen]) -> bool:
            stats = [r for r in records if r.topic == stats_topic]
            return progressed_since(stats, flowing_after, sent_at())

        records = recorder.wait(
            flowing, SANITY_BOUND_S, f"every partition consumed again after {kind}"
        )
        stats = [r for r in records if r.topic == stats_topic]
        settles[kind].append(longest_stall(stats, changed_at, time.monotonic()))

    with TopicRecorder(kafka_bootstrap, [stats_topic, topic_name(Topic.COMMANDS, prefix)]) as (
        recorder
    ):
        for trainer in trainers:
            trainer.start()
        try:
            time.sleep(2.0)
            for cycle in range(PROFILE.rebalance_cycles):
                changed_at = time.monotonic()
                joining.start()
                ready = time.monotonic()
                ready_s.append(ready - changed_at)
                time.sleep(1.0)  # Faust assigns after "ready": let the rebalance begin
                measure("join", changed_at, ready + 1.0)
                time.sleep(rng.uniform(0.5, 1.5))
                changed_at = time.monotonic()
                if PROFILE.name == "long" and cycle % 2:
                    joining.kill()  # its partitions move after the session timeout
                    kind = "leave (SIGKILL)"
                else:
                    joining.stop()  # LeaveGroup: they move at once
                    kind = "leave"
                measure(kind, changed_at, changed_at)
                time.sleep(rng.uniform(0.5, 1.5))
            stop_trainers(trainers)
            oracle = training_oracle(settings, trainers)
            records = recorder.wait(
                lambda records: not any(missing_training_outputs(oracle, records, prefix)),
                120,
                "every expected output",
                lambda records: describe_missing_training_outputs(oracle, records, prefix),
            )
            wait_until_applied(trainers, oracle.commands)
        finally:
            for trainer in trainers:
                trainer.close()
            joining.stop()
            steady.stop()

    assert steady.starts == 1
    for trainer in trainers:
        assert trainer.unanswered == [], f"{trainer.run_id}: spikes never answered"
    figures = check_training(oracle, records, prefix, trainers)
    FIGURES.record(
        SCENARIO,
        membership_changes=sum(len(v) for v in settles.values()),
        joining_worker_ready_s=ready_s,
        **{f"longest_stall_s_{kind}": values for kind, values in settles.items()},
        longest_stall_s_max=max(max(v) for v in settles.values()),
        **figures,
        rollbacks_applied=sum(t.rollbacks for t in trainers),
    )
