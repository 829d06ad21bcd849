"""Scenario 7: producers' clocks skewed by plus or minus 10 minutes.

Producers' ``ts`` fields are never the worker's clock: downshift durations (the breaker's
hold) and rating windows (their timeout) are the same whatever the replicas' and the
rating app's clocks say.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from config.settings import Settings
from fragrance_ops.worker_process import WorkerProcess
from producers.llm import LlmClient
from schemas import Topic, topic_name
from tests.helpers.kafka import produce_records
from tests.test_faults.support import (
    FIGURES,
    PROFILE,
    Seen,
    TopicRecorder,
    configured,
    rating_values,
    smooth_loss,
    smooth_reward,
    worker_settings_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

SCENARIO = "7 producer clock skew"
SKEWS = {"behind": -600.0, "exact": 0.0, "ahead": 600.0}
OPEN_S, WINDOW_S, TICK_S = 3.0, 4.0, 0.5
OVERRIDES: dict[str, Any] = {
    "breaker.open_s": OPEN_S,
    "breaker.tick_interval_s": TICK_S,
    "retune.window_timeout_s": WINDOW_S,
    "retune.tick_interval_s": TICK_S,
}
#: How late a timer-driven step may come on a loaded 2-core machine (the tick, plus slack).
LATE_S = 5.0


@pytest.mark.timeout(PROFILE.test_timeout_s)
def test_skewed_producer_clocks_change_no_downshift_duration_and_no_window(
    fault_worker: Callable[..., WorkerProcess], ops_settings: Settings, kafka_bootstrap: str
) -> None:
    settings = configured(ops_settings, OVERRIDES)
    prefix = settings.kafka.topic_prefix
    control_topic = topic_name(Topic.LLM_CONTROL, prefix)
    commands_topic = topic_name(Topic.COMMANDS, prefix)
    worker = fault_worker(**worker_settings_env(OVERRIDES))
    worker.start()
    values = [v for _, v in zip(range(40), rating_values(PROFILE.seed, "low"), strict=False)]
    with TopicRecorder(kafka_bootstrap, [control_topic, commands_topic]) as recorder:
        replicas = {
            name: LlmClient(
                f"skew-{name}", settings=settings, clock=lambda skew=skew: time.time() + skew
            )
            for name, skew in SKEWS.items()
        }
        sent_at = time.time()
        for name, replica in replicas.items():
            for _ in range(3):
                replica.record(ok=False, mode="creative", latency_ms=5.0, error="down")
            # 40 ratings per target, stamped by a skewed clock: too few for evidence, so
            # each window closes on its timeout, measured by the worker's clock.
            produce_records(
                kafka_bootstrap,
                topic_name(Topic.RATINGS, prefix),
                [
                    (
                        f"skew-{name}".encode(),
                        orjson.dumps(
                            {"rating": value, "user_id": f"u{i}", "formula_id": "f"}
                            | {"ts": time.time() + SKEWS[name], "run_id": f"skew-{name}"}
                            | {"rating_id": f"{name}-{i}"}
                        ),
                    )
                    for i, value in enumerate(values)
                ],
            )

        def done(records: list[Seen]) -> bool:
            probing = {r.json()["model"] for r in records if r.json().get("state") == "half_open"}
            retunes = {r.json()["run_id"] for r in records if r.json().get("type") == "retune"}
            return len(probing) == len(retunes) == len(SKEWS)

        records = recorder.wait(done, 60, "every breaker probing and every window closed")
        for replica in replicas.values():
            replica.close()
        worker.stop()

    holds, windows = {}, {}
    for name in SKEWS:
        events = [r.json() for r in records if r.topic == control_topic]
        opened = next(e for e in events if e["model"] == f"skew-{name}" and e["state"] == "open")
        probing = next(
            e for e in events if e["model"] == f"skew-{name}" and e["state"] == "half_open"
        )
        assert abs(opened["ts"] - sent_at) < LATE_S + 5, "the worker's clock, not the replica's"
        assert opened["until"] - opened["ts"] == pytest.approx(OPEN_S, abs=0.1)
        hold = probing["ts"] - opened["ts"]
        assert OPEN_S <= hold <= OPEN_S + LATE_S
        holds[name] = hold
        (retune,) = [
            r.json()
            for r in records
            if r.topic == commands_topic and r.json()["run_id"] == f"skew-{name}"
        ]
        window = retune["window"]
        assert window["closed_by"] == "timeout"
        assert abs(window["opened_at"] - sent_at) < LATE_S + 5
        assert WINDOW_S <= window["closed_at"] - window["opened_at"] <= WINDOW_S + LATE_S
        windows[name] = window["closed_at"] - window["opened_at"]
        decided = {k: window[k] for k in ("size", "mean", "variance", "rules")}
        assert decided == {
            "size": len(values),
            "mean": pytest.approx(sum(values) / len(values)),
            "variance": window["variance"],
            "rules": window["rules"],
        }
    stats = {
        name: tuple(
            (w["size"], w["mean"], w["variance"], tuple(sorted(w["rules"].items())))
            for w in [
                next(
                    r.json()["window"]
                    for r in records
                    if r.topic == commands_topic and r.json()["run_id"] == f"skew-{name}"
                )
            ]
        )
        for name in SKEWS
    }
    assert len(set(stats.values())) == 1, "the same ratings judged differently under skew"
    FIGURES.record(
        SCENARIO,
        skews_s=list(SKEWS.values()),
        downshift_hold_s=[holds[n] for n in SKEWS],
        configured_hold_s=OPEN_S,
        window_open_s=[windows[n] for n in SKEWS],
        configured_window_timeout_s=WINDOW_S,
    )


@pytest.mark.timeout(PROFILE.test_timeout_s)
def test_a_run_resumed_on_a_host_with_a_slower_clock_keeps_its_checkpoints(
    fault_worker: Callable[..., WorkerProcess], ops_settings: Settings, kafka_bootstrap: str
) -> None:
    """Steps 0-160 on a host 10 minutes ahead (checkpoints 50-150), then the run resumes
    (attempt 1) from step 151 on a host 10 minutes behind (checkpoints 200, 250) and its
    loss spikes at 280: the rollback goes to 250, the newest healthy checkpoint. (When the
    ledger ordered announcements by ``ts``, 200 and 250 were dropped as replays: the decision
    waited two intervals for 250, then rolled back to 150.)"""
    overrides = {"checkpoints.interval_steps": 50, "checkpoints.health_lookback_steps": 20}
    prefix = ops_settings.kafka.topic_prefix
    worker = fault_worker(**worker_settings_env(overrides))
    worker.start()
    now = time.time()
    key = b"skewed-resume"

    def metric(step: int, attempt: int, skew: float, checkpoint: int | None) -> bytes:
        loss = smooth_loss(step, 0.0) * (10.0 if step == 280 else 1.0)
        value = {"run_id": "skewed-resume", "step": step, "attempt": attempt, "loss": loss}
        value |= {"reward": smooth_reward(step, 0.0), "ts": now + skew + step * 0.01}
        if checkpoint is not None:
            value["checkpoint_step"] = checkpoint
        return orjson.dumps(value)

    def checkpoint(step: int, attempt: int, skew: float) -> bytes:
        uri = f"file:///skewed/step-{step}.pt"
        ts = now + skew + step * 0.01
        value = {"run_id": "skewed-resume", "step": step, "uri": uri, "ts": ts}
        return orjson.dumps(value | {"attempt": attempt})

    commands_topic = topic_name(Topic.COMMANDS, prefix)
    with TopicRecorder(kafka_bootstrap, [commands_topic]) as recorder:
        for attempt, skew, steps in ((0, 600.0, range(161)), (1, -600.0, range(151, 420))):
            last = 150 if attempt else None
            checkpoints, metrics = [], []
            for step in steps:
                if step and step % 50 == 0 and (attempt == 0 or step > 150):
                    checkpoints.append((key, checkpoint(step, attempt, skew)))
                    last = step
                metrics.append((key, metric(step, attempt, skew, last)))
            produce_records(kafka_bootstrap, topic_name(Topic.CHECKPOINTS, prefix), checkpoints)
            produce_records(kafka_bootstrap, topic_name(Topic.METRICS, prefix), metrics)
        records = recorder.wait(
            lambda records: any(r.json()["type"] in ("rollback", "halt") for r in records),
            30,
            "the spike's rollback",
        )
        worker.stop()
    (decision,) = [r.json() for r in records if r.json()["type"] in ("rollback", "halt")]
    assert (decision["type"], decision.get("checkpoint_step")) == ("rollback", 250)
