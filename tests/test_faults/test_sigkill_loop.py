"""Scenario 1: the worker SIGKILLed at random points while metrics, outcomes and ratings flow.

Every decision the rules imply is emitted, every command id is applied once by the SDK, and
no state is lost: reward statistics, breaker transitions and rating windows equal the pure
rules' answer for the same inputs (a crash-free run).
"""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import pytest

from config.settings import Settings
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
    describe_missing_training_outputs,
    flaky_outcomes,
    missing_training_outputs,
    rating_values,
    stall_restarts,
    stop_trainers,
    training_oracle,
    wait_until_applied,
    worker_settings_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

SCENARIO = "1 SIGKILL loop"
OVERRIDES: dict[str, Any] = TRAINING_OVERRIDES | {
    "reward.window_size": 300,  # windows wrap many times
    "breaker.open_s": 3600.0,  # only outcomes move a breaker: no clock in the comparison
}
RATED = ("rated-0", "rated-1")
KILLS = PROFILE.kills


def trainer_plans(rng: random.Random, runs: int) -> list[TrainerPlan]:
    """One run rolls back three times, then its fourth anomaly exhausts the budget (halt);
    the others roll back every 750-1000 steps, within budget."""
    plans = [TrainerPlan("kill-halting", [150, 160, 170, 180], phase=0.5)]
    for i in range(1, runs):
        gaps = [rng.randint(750, 1000) for _ in range(40)]
        plans.append(TrainerPlan(f"kill-run-{i}", gaps, phase=rng.uniform(0, 6)))
    return plans


@pytest.mark.timeout(PROFILE.test_timeout_s)
def test_sigkilled_worker_loses_nothing_and_applies_nothing_twice(
    fault_worker: Callable[..., WorkerProcess], ops_settings: Settings, kafka_bootstrap: str
) -> None:
    rng = random.Random(PROFILE.seed)
    settings = configured(ops_settings, OVERRIDES)
    prefix = settings.kafka.topic_prefix
    default_target = settings.retune.default_target
    worker = fault_worker(**worker_settings_env(OVERRIDES))
    worker.start()
    worker.supervise()  # restarts it if the stall watchdog crashes it (as a deployment would)
    recorder = TopicRecorder(
        kafka_bootstrap,
        [topic_name(t, prefix) for t in (Topic.REWARD_STATS, Topic.COMMANDS, Topic.LLM_CONTROL)],
    ).__enter__()

    trainers = [
        SimTrainer(plan, settings, pause_s=PROFILE.step_pause_s).start()
        for plan in trainer_plans(rng, PROFILE.runs)
    ]
    sinks = [CommandSink(run, settings).start() for run in (*RATED, default_target)]
    llm_transports = [RecordingTransport(settings) for _ in range(PROFILE.models)]
    replicas = [
        LlmClient(f"kill-model-{i}", settings=settings, transport=transport)
        for i, transport in enumerate(llm_transports)
    ]
    calls = [flaky_outcomes(PROFILE.seed + i) for i in range(PROFILE.models)]

    def call_every_model() -> None:
        for replica, outcomes in zip(replicas, calls, strict=True):
            ok, latency = next(outcomes)
            mode = replica.choose_mode()
            replica.record(ok=ok, mode=mode, latency_ms=latency, error=None if ok else "boom")

    rating_transport = RecordingTransport(settings)
    ratings = RatingClient(settings=settings, transport=rating_transport)
    streams = {
        RATED[0]: rating_values(PROFILE.seed + 100, "low"),
        RATED[1]: rating_values(PROFILE.seed + 101, "spread"),
        None: rating_values(PROFILE.seed + 102, "high"),  # the default target
    }
    sent_ratings = Counter[str]()

    def rate_every_target() -> None:
        for run_id, values in streams.items():
            n = sent_ratings[str(run_id)]
            sent_ratings[str(run_id)] += 1
            ratings.rate(
                next(values),
                user_id=f"user-{n % 400}",
                # One formula for the default target: its ratings keep their order when the
                # worker re-keys them to the target.
                formula_id=f"formula-{n % 9}" if run_id else "formula-default",
                run_id=run_id,
                rating_id=f"{run_id}-{n}",
            )

    llm_loop = Background("llm-replicas", call_every_model, 0.02).start()
    rating_loop = Background("ratings", rate_every_target, 0.02).start()

    restart_s: list[float] = []
    started = time.monotonic()
    try:
        for _ in range(KILLS):
            time.sleep(rng.uniform(*PROFILE.kill_gap_s))
            worker.kill()
            time.sleep(rng.uniform(0.0, 0.5))  # traffic keeps coming while it is down
            began = time.monotonic()
            worker.start()
            restart_s.append(time.monotonic() - began)
        chaos_s = time.monotonic() - started

        # Traffic stops; every input is flushed, then the oracles say what must come out.
        llm_loop.close()
        rating_loop.close()
        stop_trainers(trainers)
        assert ratings.flush(60) == 0
        for transport in llm_transports:
            assert transport.flush(60) == 0
        training = training_oracle(settings, [*trainers, *sinks])
        breakers = BreakerOracle(BreakerPolicy.from_settings(settings.breaker))
        for transport in llm_transports:
            for sent in transport.records():
                if sent.topic == topic_name(Topic.LLM_OUTCOMES, prefix):
                    breakers.feed(sent.value)
        windows = RetuneOracle(settings)
        for sent in rating_transport.records():
            windows.feed(sent.value)
        expected_commands = training.commands | windows.proposals
        control_topic = topic_name(Topic.LLM_CONTROL, prefix)
        expected_epochs = {
            (model, t["epoch"]) for model, ts in breakers.transitions.items() for t in ts
        }

        def missing(records: list[Seen]) -> tuple[set[Any], set[Any], set[Any]]:
            stats, ids = missing_training_outputs(training, records, prefix, windows.proposals)
            epochs = {
                (r.json()["model"], r.json()["epoch"]) for r in records if r.topic == control_topic
            }
            return stats, ids, expected_epochs - epochs

        def describe(records: list[Seen]) -> str:
            epochs = missing(records)[2]
            return (
                describe_missing_training_outputs(training, records, prefix, windows.proposals)
                + f"; epochs {sorted(epochs)[:5]}"
            )

        records = recorder.wait(
            lambda records: not any(missing(records)), 120, "every expected output", describe
        )
        wait_until_applied([*trainers, *sinks], expected_commands)
    finally:
        for closer in (*trainers, *sinks):
            closer.close()
        for replica in replicas:
            replica.close()
        ratings.close()
        recorder.close()
        worker.stop()

    assert worker.starts == KILLS + 1 + stall_restarts(worker)
    for trainer in trainers:
        assert trainer.unanswered == [], f"{trainer.run_id}: spikes never answered"
    for transport in (*llm_transports, rating_transport, *[c.transport for c in trainers]):
        assert transport.stats.dropped == 0
    # Reward statistics and commands (training and retune): the same decisions, each
    # applied exactly once.
    figures = check_training(training, records, prefix, [*trainers, *sinks], expected_commands)

    # Breakers: the same transitions in the same order, the same final state per model.
    by_model: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for record in records:
        if record.topic == control_topic:
            view = control_view(record.json())
            previous = by_model[view["model"]].setdefault(view["epoch"], view)
            assert previous == view, "a replay changed a breaker transition"
    for model, transitions in breakers.transitions.items():
        observed = [by_model[model][epoch] for epoch in sorted(by_model[model])]
        assert observed == transitions, model
        assert observed[-1] == breakers.final(model)
    assert set(by_model) <= set(breakers.transitions)

    FIGURES.record(
        SCENARIO,
        kills_survived=KILLS,
        stall_watchdog_restarts=stall_restarts(worker),
        chaos_seconds=chaos_s,
        restart_seconds_mean=sum(restart_s) / len(restart_s),
        restart_seconds_max=max(restart_s),
        **figures,
        llm_outcomes_checked=breakers.outcomes,
        breaker_transitions_checked=len(expected_epochs),
        ratings_checked=windows.ratings,
        retune_proposals_checked=len(windows.proposals),
        rollbacks_applied=sum(t.rollbacks for t in trainers),
        halts=sum(t.halted for t in trainers),
    )
