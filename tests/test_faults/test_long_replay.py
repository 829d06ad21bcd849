"""Scenario 1, made deterministic: a replay longer than any bounded memory of ids.

The worker writes its state at checkpoints and commits offsets after them, so a worker that
restarts may read again events its restored state has applied: killed between a checkpoint
and its commit, or after commits that failed, or after an operator reset the group's
offsets (or Kafka expired them while the group was away). Here the worker applies 1,500
outcomes of one model, 3,200 ratings re-keyed to the default target (whose windows
remember 3,000 fingerprints), 40 retune acks (the run remembers 32) and two announcements
of the run with different window sizes, commits all of it,
and is SIGKILLed; the group's offsets are then reset to the beginning. The restarted
worker reads everything again, and again every re-keyed copy the replayed re-keying
produces. Nothing may change: the stored state of the breaker, the rating windows, the
run's operations, settings and reward window stays byte for byte what it was, and no
transition, proposal or command comes out.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from confluent_kafka import (
    Consumer,
    Message,
    TopicPartition,
)
from prometheus_client.parser import text_string_to_metric_families

from config.settings import Settings
from fragrance_ops.brokers.base import free_port
from fragrance_ops.worker_process import WorkerProcess
from rules.training import APPLIED_RETUNES_KEPT
from schemas import CommandAck, RunAnnounced, StepMetric, Topic, encode, topic_name
from tests.helpers.kafka import produce_records, set_group_offsets
from tests.test_faults.support import (
    FIGURES,
    PROFILE,
    RetuneOracle,
    TopicRecorder,
    rating_values,
    uncommitted,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

SCENARIO = "1 replay beyond id memories"
MODEL = "replayed-model"
OUTCOMES = 1500  # > breaker.dedupe_window (1,024)
RATINGS = 3200  # > retune.seen_ratings_max (3,000)
RUN = "replayed-run"
RETUNE_ACKS = 40  # > APPLIED_RETUNES_KEPT (32)
STEPS = 100  # metrics before the acks, and as many after them


def scrape(port: int, name: str, label: str) -> dict[str, float]:
    """The counter ``name`` by ``label``, scraped from the worker."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            text = reply.read().decode()
    except OSError:
        return {}  # not serving yet
    return {
        sample.labels[label]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == name
        for sample in family.samples
        if sample.name.endswith("_total")
    }


def replayed(port: int) -> dict[str, float]:
    return scrape(port, "fragrance_ops_replayed_events", "agent")


def reset_offsets(bootstrap: str, group: str, topics: list[str], timeout_s: float) -> None:
    """Reset ``group``'s offsets of ``topics`` to their beginning, once it has no member."""
    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{group}-reader"})
    try:
        partitions = [
            TopicPartition(topic, p, 0)
            for topic in topics
            for p in reader.list_topics(topic, timeout=10).topics[topic].partitions
        ]
    finally:
        reader.close()
    set_group_offsets(bootstrap, group, partitions, timeout_s)


def origin(message: Message) -> str:
    """How the stored state names a delivered record's partition (``streams.live``)."""
    return f"{message.partition()}:{message.topic()}"


def latest_by_key(recorder: TopicRecorder, topic: str) -> dict[bytes, bytes]:
    return {r.key or b"": r.value for r in recorder.records(topic)}


def metrics(steps: range, now: float) -> list[tuple[bytes, bytes]]:
    return [
        (RUN.encode(), encode(StepMetric(run_id=RUN, step=step, loss=1.0, reward=1.0, ts=now)))
        for step in steps
    ]


def retune_acks(now: float) -> list[tuple[bytes, bytes]]:
    """Acks of applied retunes, each a new entropy_coef (the run's operations rescale the
    entropy schedule to it, once per retune)."""
    return [
        (
            RUN.encode(),
            encode(
                CommandAck(
                    command_id=f"retune-{n}",
                    run_id=RUN,
                    status="applied",
                    detail="retune applied",
                    ts=now,
                    after={"entropy_coef": 0.001 + n * 1e-4},
                    command_type="retune",
                )
            ),
        )
        for n in range(RETUNE_ACKS)
    ]


def announce(bootstrap: str, topic: str, settings: dict[str, int], now: float) -> None:
    value = encode(RunAnnounced(run_id=RUN, ts=now, settings=settings))
    produce_records(bootstrap, topic, [(RUN.encode(), value)])


@pytest.mark.timeout(PROFILE.test_timeout_s)
def test_a_replay_longer_than_any_id_memory_changes_nothing(
    fault_worker: Callable[..., WorkerProcess], ops_settings: Settings, kafka_bootstrap: str
) -> None:
    prefix = ops_settings.kafka.topic_prefix
    app_id = f"app-{prefix.rstrip('.')}"  # make_worker's
    port = free_port()
    worker = fault_worker(BREAKER__OPEN_S="3600", METRICS__PORT=str(port))
    worker.start()
    breaker_log = f"{app_id}-llm-breakers-changelog"
    windows_log = f"{app_id}-feedback-windows-changelog"
    operations_log = f"{app_id}-run-operations-changelog"
    settings_log = f"{app_id}-run-settings-changelog"
    reward_windows_log = f"{app_id}-reward-windows-changelog"
    outputs = [topic_name(Topic.LLM_CONTROL, prefix), topic_name(Topic.COMMANDS, prefix)]
    dead_letters = topic_name(Topic.DEAD_LETTER, prefix)
    outcomes_topic, ratings_topic = (
        topic_name(t, prefix) for t in (Topic.LLM_OUTCOMES, Topic.RATINGS)
    )
    metrics_topic, acks_topic, runs_topic = (
        topic_name(t, prefix) for t in (Topic.METRICS, Topic.ACKS, Topic.RUNS)
    )
    target = ops_settings.retune.default_target.encode()
    now = time.time()
    # Failures never three in a row: the breaker stays closed, and only its state records
    # how many outcomes (and which call ids) it has applied.
    outcomes = [
        orjson.dumps(
            {"model": MODEL, "ok": n % 3 == 2, "mode": "creative", "latency_ms": 50.0}
            | {"ts": now, "call_id": f"call-{n}"}
            | ({} if n % 3 == 2 else {"error": "timeout"})
        )
        for n in range(OUTCOMES)
    ]
    # One formula: its ratings are re-keyed to the default target in their order.
    values = rating_values(PROFILE.seed, "low")
    ratings = [
        orjson.dumps(
            {"rating": next(values), "user_id": f"user-{n}", "formula_id": "f-replayed"}
            | {"ts": now, "rating_id": f"rating-{n}"}
        )
        for n in range(RATINGS)
    ]
    proposals = RetuneOracle(ops_settings)
    for rating in ratings:
        proposals.feed(rating)
    assert len(proposals.proposals) > 10
    assert RETUNE_ACKS > APPLIED_RETUNES_KEPT

    changelogs = [breaker_log, windows_log, operations_log, settings_log, reward_windows_log]
    with TopicRecorder(kafka_bootstrap, [*outputs, dead_letters, *changelogs]) as recorder:
        sent = produce_records(
            kafka_bootstrap, outcomes_topic, [(MODEL.encode(), value) for value in outcomes]
        )
        rated = produce_records(
            kafka_bootstrap, ratings_topic, [(b"f-replayed", value) for value in ratings]
        )
        last_applied = {
            (breaker_log, MODEL.encode()): sent[-1],
            (windows_log, target): rated[-1],  # its origin, through the re-keying
        }

        def operations() -> dict[str, Any]:
            state = latest_by_key(recorder, operations_log).get(RUN.encode())
            return orjson.loads(state) if state is not None else {}

        # The acks between the run's metrics, in this order (three topics): each ack
        # rescales the schedule at the newest step seen, and a replayed ack would be applied
        # at the last one.
        def apply_metrics(steps: range) -> None:
            produce_records(kafka_bootstrap, metrics_topic, metrics(steps, now))
            recorder.wait(
                lambda _: operations().get("detector", {}).get("last") == [0, steps[-1]],
                60,
                f"metrics up to step {steps[-1]} applied",
            )

        # The run announced twice: a replayed first announcement must not shrink the window
        # the second one set (it would drop rewards for good).
        announce(kafka_bootstrap, runs_topic, {"reward.window_size": 50}, now)
        apply_metrics(range(STEPS))
        announce(kafka_bootstrap, runs_topic, {"reward.window_size": 1000}, now)
        acked = produce_records(kafka_bootstrap, acks_topic, retune_acks(now))
        recorder.wait(
            lambda _: (
                operations().get("acks_applied", {}).get(origin(acked[-1])) == acked[-1].offset()
            ),
            60,
            "every retune ack applied",
        )
        apply_metrics(range(STEPS, 2 * STEPS))

        def applied(_records: Any) -> bool:
            for (changelog, key), message in last_applied.items():
                state = latest_by_key(recorder, changelog).get(key)
                if state is None or orjson.loads(state)["applied"].get(origin(message)) != (
                    message.offset()
                ):
                    return False
            return proposed() >= set(proposals.proposals)

        def proposed() -> set[str]:
            commands = (r.json() for r in recorder.records(outputs[1]))
            return {c["command_id"] for c in commands if c["type"] == "retune"}

        recorder.wait(applied, 120, "every outcome and rating applied, every proposal out")
        assert not recorder.records(dead_letters)
        assert proposed() == set(proposals.proposals)

        def stored() -> dict[str, object]:
            return {
                "breaker": latest_by_key(recorder, breaker_log)[MODEL.encode()],
                "windows": latest_by_key(recorder, windows_log)[target],
                "operations": latest_by_key(recorder, operations_log)[RUN.encode()],
                "settings": latest_by_key(recorder, settings_log)[RUN.encode()],
                "reward_window": latest_by_key(recorder, reward_windows_log)[RUN.encode()],
                "outputs": len([r for r in recorder.records() if r.topic in outputs]),
            }

        # Everything committed: the state stored covers every input.
        by_target = f"{prefix}{app_id}-ratings-by-target"  # every copy on one partition
        inputs = [outcomes_topic, ratings_topic, by_target, metrics_topic, acks_topic, runs_topic]
        totals = dict(
            zip(inputs, (OUTCOMES, RATINGS, RATINGS, 2 * STEPS, RETUNE_ACKS, 2), strict=True)
        )
        wait_for(
            lambda: all(uncommitted(kafka_bootstrap, app_id, t, n) == 0 for t, n in totals.items()),
            60,
            "every input committed",
        )
        before = stored()
        assert replayed(port) == {}  # nothing replayed in the first life

        worker.kill()
        reset_offsets(kafka_bootstrap, app_id, inputs, 60)
        # Every input is read again; each rating twice at the windows (the copy re-keyed
        # before the kill, and the one the replayed re-keying makes now). Each must be
        # recognised and skipped.
        replays = {
            "llm-breakers": OUTCOMES,
            "feedback": 2 * RATINGS,
            "training": RETUNE_ACKS + 2,  # and both announcements
        }
        assert replays["llm-breakers"] > 1024  # beyond the breaker's call-id memory
        assert replays["feedback"] > 2 * 3000  # beyond the windows' fingerprint memory
        assert replays["training"] > APPLIED_RETUNES_KEPT  # beyond the retune-id memory
        worker.start()
        wait_for(
            lambda: all(replayed(port).get(agent, 0) >= count for agent, count in replays.items()),
            60,
            f"every replayed input recognised: {replays}",
            lambda: (
                f"skipped: {replayed(port)}, read: "
                f"{scrape(port, 'fragrance_ops_events', 'topic')}, dead letters: "
                f"{scrape(port, 'fragrance_ops_dead_letters', 'topic')}"
            ),
        )
        # State is written at checkpoints, before the commit that follows them: once the
        # replay is committed, any state it changed is on the changelogs.
        wait_for(
            lambda: all(uncommitted(kafka_bootstrap, app_id, t) == 0 for t in inputs),
            60,
            "the replay committed",
        )
        time.sleep(2.0)  # for the recorder to read what the replay's checkpoint wrote
        after = stored()
    worker.stop()
    assert after == before, "a replay changed the state or emitted outputs"
    FIGURES.record(
        SCENARIO,
        outcomes_replayed=replays["llm-breakers"],
        rating_copies_replayed=replays["feedback"],
        retune_acks_replayed=replays["training"],
        proposals=len(proposals.proposals),
        state_changed_by_replay=0,
    )
