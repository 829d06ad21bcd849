"""Scenario 6: duplicated and reordered input gives the outputs of clean input.

The same inputs go to two fresh deployments (topics and worker of their own): once clean,
once dirty: every metric re-sent later out of order, the ratings replayed in another
order, every LLM outcome sent twice. Reward statistics, commands (ids included), breaker
transitions and retune proposals must be the same.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer

from config.settings import Settings
from fragrance_ops.admin import create_contract_topics
from fragrance_ops.status import read_values
from fragrance_ops.worker_process import WorkerProcess
from producers import KafkaTransport
from schemas import CheckpointSaved, LlmOutcome, Rating, StepMetric, Topic, encode, topic_name
from tests.test_faults.support import FIGURES, PROFILE, configured, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.integration]

RUNS = ("dup-run-a", "dup-run-b")
STEPS = 400
SPIKE = 250


def clean_inputs() -> list[tuple[Topic, bytes, bytes]]:
    """(topic, key, value) in a producer's natural order."""
    events: list[Any] = []
    for run_id in RUNS:
        for step in range(STEPS):
            if step and step % 100 == 0:
                events.append(
                    CheckpointSaved(
                        run_id=run_id, step=step, uri=f"file:///{run_id}/{step}.pt", ts=1.0
                    )
                )
            loss = 9.0 if step == SPIKE else 1.0 + (step % 5) * 0.01
            reward = 1.0 + (step % 3) * 0.01
            events.append(StepMetric(run_id=run_id, step=step, loss=loss, reward=reward, ts=1.0))
    rng = random.Random(7)
    for index in range(100):
        value = float(rng.choices([1, 2, 3, 4], [0.1, 0.45, 0.35, 0.1])[0])
        events.append(
            Rating(
                rating=value,
                user_id=f"u{index}",
                formula_id="f",
                ts=1.0,
                run_id=RUNS[0],
                rating_id=f"r{index}",
            )
        )
    for index in range(3):
        events.append(
            LlmOutcome(
                model="dup-model",
                ok=False,
                mode="creative",
                latency_ms=9.0,
                error="x",
                ts=1.0,
                call_id=f"c{index}",
            )
        )
    return [(event.TOPIC, event.key().encode(), encode(event)) for event in events]


def dirty(
    inputs: list[tuple[Topic, bytes, bytes]], replays: int
) -> list[tuple[Topic, bytes, bytes]]:
    """Every metric re-sent later (out of order), ratings replayed shuffled, outcomes twice."""
    rng = random.Random(11)
    out: list[tuple[Topic, bytes, bytes]] = []
    recent: list[tuple[Topic, bytes, bytes]] = []
    for record in inputs:
        out.append(record)
        if record[0] is Topic.METRICS:
            recent.append(record)
            if len(recent) == 10:  # the last ten again, shuffled, after newer ones
                again = recent[:]
                rng.shuffle(again)
                out.extend(again)
                recent.clear()
        elif record[0] is Topic.LLM_OUTCOMES:
            out.append(record)
    ratings = [record for record in inputs if record[0] is Topic.RATINGS]
    for _ in range(replays):
        rng.shuffle(ratings)
        out.extend(ratings)
    return out


def outputs(
    settings: Settings,
    make_worker: Callable[..., WorkerProcess],
    kafka_bootstrap: str,
    records: list[tuple[Topic, bytes, bytes]],
) -> dict[str, Any]:
    prefix = f"{settings.kafka.topic_prefix}{uuid.uuid4().hex[:6]}."
    settings = configured(settings, {"kafka.topic_prefix": prefix})
    create_contract_topics(settings.kafka)
    worker = make_worker(KAFKA__TOPIC_PREFIX=prefix, WORKER__APP_ID=f"app-{prefix.rstrip('.')}")
    worker.start()
    transport = KafkaTransport(settings)
    for topic, key, value in records:
        transport.produce(topic_name(topic, prefix), key, value)
    assert transport.close(60) == 0

    reader = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": uuid.uuid4().hex})

    def read(topic: Topic) -> list[dict[str, Any]]:
        """Everything on the topic now (up to its high watermarks)."""
        return [orjson.loads(v) for v in read_values(reader, topic_name(topic, prefix), None, 10)]

    wait_for(
        lambda: (
            len(read(Topic.REWARD_STATS)) >= len(RUNS) * STEPS
            and any(c["type"] == "retune" for c in read(Topic.COMMANDS))
            and len(read(Topic.LLM_CONTROL)) >= 1
        ),
        120,
        "the outputs of every input",
    )
    time.sleep(2)  # anything extra a duplicate would cause
    worker.stop()
    try:
        return summarize(read)
    finally:
        reader.close()


def summarize(read: Callable[[Topic], list[dict[str, Any]]]) -> dict[str, Any]:
    stats = sorted(
        (s["run_id"], s["step"], s["mean"], s["std"], s["normalized_reward"])
        for s in read(Topic.REWARD_STATS)
    )
    commands = read(Topic.COMMANDS)
    return {
        "stats": stats,
        "commands": sorted((c["type"], c["command_id"]) for c in commands),
        "retunes": sorted(orjson.dumps(c["changes"]) for c in commands if c["type"] == "retune"),
        "controls": [(c["state"], c["mode"], c["epoch"]) for c in read(Topic.LLM_CONTROL)],
        "dead_letters": len(read(Topic.DEAD_LETTER)),
    }


def test_duplicated_and_reordered_input_gives_the_outputs_of_clean_input(
    fault_worker: Callable[..., WorkerProcess], ops_settings: Settings, kafka_bootstrap: str
) -> None:
    inputs = clean_inputs()
    noisy = dirty(inputs, PROFILE.replays)
    clean_out = outputs(ops_settings, fault_worker, kafka_bootstrap, inputs)
    dirty_out = outputs(ops_settings, fault_worker, kafka_bootstrap, noisy)
    assert len(clean_out["stats"]) == len(RUNS) * STEPS
    assert [kind for kind, _ in clean_out["commands"]].count("rollback") == len(RUNS)
    assert clean_out["retunes"]
    assert clean_out["controls"] == [("open", "balanced", 1)]
    assert dirty_out == clean_out
    FIGURES.record(
        "6. duplicated and reordered input",
        clean_events=len(inputs),
        dirty_events=len(noisy),
        duplicates_sent=len(noisy) - len(inputs),
        commands_compared=len(clean_out["commands"]),
        stats_compared=len(clean_out["stats"]),
        differences=0,
    )
