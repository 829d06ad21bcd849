"""Scenario 4: the broker (Apache Kafka) hard-stopped and started again under load.

The SDKs' producers buffer while it is down and deliver when it is back, without blocking
their callers; the worker resumes with no manual restart; nothing acknowledged is lost:
every input delivered is processed and every decision comes out once and is applied once.

The worker runs supervised, as in a deployment. After the broker came back, Faust's
consumer used to stop delivering some partitions with the process up and silent (as in
robinhood/faust#596 and faust-streaming/faust#523), and to lose records outright: both
were records Faust dropped in the rebalance, which the worker's transport now reads again
in order (``streams/faust_fixes/consumer.py``). Should the worker stall anyway, the stall watchdog
(``worker.stall_timeout_s``, 15 s in this suite) must crash it, and the supervisor's
restart carries on; any other exit fails the test.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from config.settings import Settings
from fragrance_ops.admin import create_contract_topics
from fragrance_ops.brokers import ApacheKafkaBroker
from fragrance_ops.worker_process import WorkerProcess
from producers import RatingClient
from producers.llm import LlmClient
from rules.breaker import BreakerPolicy
from schemas import Topic, topic_name
from tests.test_faults.support import (
    FIGURES,
    PROFILE,
    TRAINING_OVERRIDES,
    Background,
    BreakerOracle,
    CommandSink,
    RecordingTransport,
    RetuneOracle,
    Seen,
    SimTrainer,
    TopicRecorder,
    TrainerPlan,
    check_training,
    configured,
    control_view,
    flaky_outcomes,
    missing_training_outputs,
    rating_values,
    runs_on_every_partition,
    stall_restarts,
    stop_trainers,
    training_oracle,
    wait_until_applied,
    worker_settings_env,
)
from tests.test_streams.conftest import TEST_PARTITIONS

pytestmark = [pytest.mark.integration, pytest.mark.faults]

SCENARIO = "4 broker restart"
OVERRIDES: dict[str, Any] = TRAINING_OVERRIDES | {
    "breaker.open_s": 3600.0,
    # A batch waits for its outputs this long before the worker gives up and crashes.
    # Longer than any outage here: only the stall watchdog may restart the worker.
    "worker.output_flush_timeout_s": 120.0,
}


@pytest.mark.timeout(PROFILE.test_timeout_s)
def test_a_broker_restart_under_load_loses_nothing_acknowledged(
    fault_worker: Callable[..., WorkerProcess],
    ops_settings: Settings,
    own_broker: ApacheKafkaBroker,
) -> None:
    rng = random.Random(PROFILE.seed)
    bootstrap = own_broker.bootstrap_servers
    settings = configured(ops_settings, {**OVERRIDES, "kafka.bootstrap_servers": bootstrap})
    prefix = settings.kafka.topic_prefix
    create_contract_topics(settings.kafka)
    worker = fault_worker(KAFKA__BOOTSTRAP_SERVERS=bootstrap, **worker_settings_env(OVERRIDES))
    worker.start()
    worker.supervise()
    recorder = TopicRecorder(
        bootstrap,
        [topic_name(t, prefix) for t in (Topic.REWARD_STATS, Topic.COMMANDS, Topic.LLM_CONTROL)],
    ).__enter__()
    plans = [
        TrainerPlan(run, [rng.randint(300, 500) for _ in range(4)], phase=rng.uniform(0, 6))
        for run in runs_on_every_partition("outage", TEST_PARTITIONS)
    ]
    trainers = [SimTrainer(plan, settings, pause_s=PROFILE.step_pause_s) for plan in plans]
    sink = CommandSink("outage-rated", settings)
    llm_transport = RecordingTransport(settings)
    replica = LlmClient("outage-model", settings=settings, transport=llm_transport)
    calls = flaky_outcomes(PROFILE.seed)
    rating_transport = RecordingTransport(settings)
    ratings = RatingClient(settings=settings, transport=rating_transport)
    values = rating_values(PROFILE.seed, "low")
    slowest = Counter[str]()

    def call() -> None:
        ok, latency = next(calls)
        began = time.perf_counter()
        replica.record(ok=ok, mode=replica.choose_mode(), latency_ms=latency, error="boom")
        slowest["llm"] = max(slowest["llm"], int((time.perf_counter() - began) * 1e6))

    def rate() -> None:
        n = len(rating_transport.records())
        began = time.perf_counter()
        ratings.rate(next(values), user_id=f"u-{n}", formula_id="f", run_id="outage-rated")
        slowest["rating"] = max(slowest["rating"], int((time.perf_counter() - began) * 1e6))

    outages: list[float] = []
    try:
        for trainer in (*trainers, sink):
            trainer.start()
        loops = [Background("llm", call, 0.02).start(), Background("ratings", rate, 0.02)]
        loops[1].start()
        time.sleep(3.0)
        for _ in range(PROFILE.broker_outages):
            down = time.monotonic()
            own_broker.kill()  # SIGKILL: no controlled shutdown, no final flush
            time.sleep(PROFILE.outage_s)
            own_broker.start(timeout=120)
            outages.append(time.monotonic() - down)
            time.sleep(5.0)  # under load again
        for loop in loops:
            loop.close()
        stop_trainers(trainers)
        assert ratings.flush(120) == 0
        assert llm_transport.flush(120) == 0
        for transport in (llm_transport, rating_transport, *[t.transport for t in trainers]):
            assert transport.stats.dropped == 0, "an SDK dropped events"

        training = training_oracle(settings, [*trainers, sink])
        breakers = BreakerOracle(BreakerPolicy.from_settings(settings.breaker))
        for sent in llm_transport.records():
            breakers.feed(sent.value)
        windows = RetuneOracle(settings)
        for sent in rating_transport.records():
            windows.feed(sent.value)
        expected = training.commands | windows.proposals
        control_topic = topic_name(Topic.LLM_CONTROL, prefix)

        transitions = breakers.transitions["outage-model"]

        def missing(records: list[Seen]) -> tuple[set[Any], set[str], set[int]]:
            stats, ids = missing_training_outputs(training, records, prefix, windows.proposals)
            epochs = {r.json()["epoch"] for r in records if r.topic == control_topic}
            return stats, ids, {t["epoch"] for t in transitions} - epochs

        def describe(records: list[Seen]) -> str:
            stats, ids, epochs = missing(records)
            with TopicRecorder(bootstrap, recorder.topics) as fresh:
                time.sleep(10)
                again = missing(fresh.records())
            return (
                f"missing stats {len(stats)} {sorted(stats)[:5]}, commands {sorted(ids)[:5]}, "
                f"epochs {epochs}; a fresh consumer misses {[len(x) for x in again]} "
                f"(worker running: {worker.running}, exits: {len(worker.exits)})"
            )

        records = recorder.wait(
            lambda records: not any(missing(records)), 120, "every output", describe
        )
        wait_until_applied([*trainers, sink], expected)
    finally:
        for closer in (*trainers, sink):
            closer.close()
        replica.close()
        ratings.close()
        recorder.close()
        worker.stop()

    assert worker.starts == 1 + stall_restarts(worker), "the worker was restarted by hand"
    for trainer in trainers:
        assert trainer.unanswered == [], f"{trainer.run_id}: spikes never answered"
    figures = check_training(training, records, prefix, [*trainers, sink], expected)
    controls = {
        r.json()["epoch"]: control_view(r.json()) for r in records if r.topic == control_topic
    }
    assert [controls[e] for e in sorted(controls)] == breakers.transitions["outage-model"]
    FIGURES.record(
        SCENARIO,
        outages=len(outages),
        outage_seconds=outages,
        stall_watchdog_restarts=stall_restarts(worker),
        slowest_log_step_call_s=max(t.slowest_step_call_s for t in trainers),
        slowest_llm_record_call_ms=slowest["llm"] / 1000,
        slowest_rate_call_ms=slowest["rating"] / 1000,
        **figures,
        llm_outcomes_checked=breakers.outcomes,
        breaker_transitions_checked=len(controls),
        ratings_checked=windows.ratings,
        retune_proposals_checked=len(windows.proposals),
    )
