"""The LLM breaker end to end: SDK replicas, the broker, the worker process."""

from __future__ import annotations

import time
from collections.abc import Callable

import orjson
import pytest

from config.settings import Settings
from fragrance_ops.worker_process import WorkerProcess
from producers.llm import LlmClient
from schemas import Topic, topic_name
from tests.helpers.kafka import consume_until

pytestmark = pytest.mark.integration

MODEL = "qwen-fragrance"


def with_open_s(settings: Settings, open_s: float) -> Settings:
    return settings.model_copy(
        update={"breaker": settings.breaker.model_copy(update={"open_s": open_s})}
    )


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        time.sleep(0.05)


def following(llm: LlmClient, state: str, mode: str, probe: str | None = None) -> bool:
    status = llm.status()
    return (
        status["following_stream"]
        and (status["state"], status["mode"]) == (state, mode)
        and (probe is None or llm.choose_mode() == probe)
    )


def control_events(kafka_bootstrap: str, settings: Settings, count: int) -> list[dict[str, object]]:
    topic = topic_name(Topic.LLM_CONTROL, settings.kafka.topic_prefix)
    messages = consume_until(kafka_bootstrap, topic, lambda got: len(got) >= count, 30)
    return [orjson.loads(message.value()) for message in messages]


def failing(prompt: str, *, mode: str) -> str:
    raise TimeoutError(f"{mode} timed out")


def test_three_failures_downshift_every_replica_and_probes_recover_step_by_step(
    make_worker: Callable[..., WorkerProcess],
    ops_settings: Settings,
    kafka_bootstrap: str,
) -> None:
    settings = with_open_s(ops_settings, 2.0)
    with make_worker(BREAKER__OPEN_S="2"):
        first = LlmClient(MODEL, settings=settings)
        second = LlmClient(MODEL, settings=settings)
        for _ in range(3):
            with pytest.raises(TimeoutError):
                first.wrap(failing)("citrus")
        assert first.mode == "balanced"  # the local fast path, before the stream answers
        wait_for(lambda: following(second, "open", "balanced"), 10, "the second replica follows")
        assert second.cache_ttl_s == 300.0
        # Half-open after 2 s: the probes (creative) fail twice -> a step further down.
        wait_for(lambda: following(second, "half_open", "balanced"), 10, "half-open")
        for _ in range(2):
            mode = second.choose_mode()
            assert mode == "creative"
            second.record(ok=False, mode=mode, latency_ms=30.0, error="still failing")
        wait_for(lambda: following(first, "open", "fast"), 10, "fast")
        # Half-open again, probing balanced; successes step up one mode at a time.
        wait_for(lambda: following(first, "half_open", "fast"), 10, "half-open at fast")
        for probe in ("balanced", "balanced"):
            mode = first.choose_mode()
            assert mode == probe
            first.record(ok=True, mode=mode, latency_ms=20.0)
        wait_for(lambda: following(first, "half_open", "balanced"), 10, "balanced, probing")
        for _ in range(2):
            first.record(ok=True, mode=first.choose_mode(), latency_ms=20.0)
        # Each replica follows the stream on its own thread: wait for both.
        wait_for(
            lambda: all(following(llm, "closed", "creative") for llm in (first, second)),
            10,
            "recovered",
        )
        assert (first.cache_ttl_s, second.cache_ttl_s) == (3600.0, 3600.0)
        # A replica started later reads the current state before its first call.
        third = LlmClient(MODEL, settings=settings)
        assert third.status()["following_stream"] is True
        assert third.status()["state"] == "closed"
        events = control_events(kafka_bootstrap, settings, 6)
        for client in (first, second, third):
            client.close()
    assert [(e["state"], e["mode"], e.get("probe_mode"), e["cache_ttl_s"]) for e in events] == [
        ("open", "balanced", None, 300.0),
        ("half_open", "balanced", "creative", 300.0),
        ("open", "fast", None, 300.0),
        ("half_open", "fast", "balanced", 300.0),
        ("half_open", "balanced", "creative", 300.0),
        ("closed", "creative", None, 3600.0),
    ]
    assert [e["epoch"] for e in events] == [1, 2, 3, 4, 5, 6]


def test_time_recovery_returns_every_replica_to_creative_with_no_traffic(
    make_worker: Callable[..., WorkerProcess],
    ops_settings: Settings,
    kafka_bootstrap: str,
) -> None:
    settings = with_open_s(ops_settings, 2.0)
    settings = settings.model_copy(
        update={"breaker": settings.breaker.model_copy(update={"recovery": "time"})}
    )
    with make_worker(BREAKER__OPEN_S="2", BREAKER__RECOVERY="time"):
        caller = LlmClient(MODEL, settings=settings)
        idle = LlmClient(MODEL, settings=settings)  # never calls the model
        for _ in range(3):
            caller.record(ok=False, mode="creative", latency_ms=10.0, error="boom")
        wait_for(lambda: following(idle, "open", "balanced"), 10, "the downshift")
        # No call at all from here: the worker's timer ends the hold and publishes it (the
        # replicas' own view of a stale decision would wait control_grace_s, 30 s).
        wait_for(lambda: following(idle, "closed", "creative"), 10, "time recovery")
        assert (idle.cache_ttl_s, caller.mode, caller.cache_ttl_s) == (3600.0, "creative", 3600.0)
        events = control_events(kafka_bootstrap, settings, 2)
        for client in (caller, idle):
            client.close()
    assert [(e["state"], e["mode"], e["cache_ttl_s"], e["epoch"]) for e in events] == [
        ("open", "balanced", 300.0, 1),
        ("closed", "creative", 3600.0, 2),
    ]
    assert events[1]["reason"] == "held balanced for 2 s: recovered"
    assert isinstance(events[0]["until"], float)
    assert isinstance(events[1]["ts"], float)
    assert events[1]["ts"] >= events[0]["until"]


def test_each_model_s_breaker_takes_its_own_settings(
    make_worker: Callable[..., WorkerProcess],
    ops_settings: Settings,
    kafka_bootstrap: str,
) -> None:
    per_model = '{"qwen-fragrance": {"failure_threshold": 5}}'
    with make_worker(BREAKER__MODELS=per_model):
        # Clients with the plain settings: their local breakers trip at 3, so what the stream
        # decides for qwen-fragrance shows in llm.control, not in the clients.
        qwen = LlmClient(MODEL, settings=ops_settings)
        other = LlmClient("other-model", settings=ops_settings)
        for _ in range(3):
            qwen.record(ok=False, mode="creative", latency_ms=10.0, error="boom")
            other.record(ok=False, mode="creative", latency_ms=10.0, error="boom")
        (first,) = control_events(kafka_bootstrap, ops_settings, 1)
        assert (first["model"], first["mode"]) == ("other-model", "balanced")
        topic = topic_name(Topic.LLM_CONTROL, ops_settings.kafka.topic_prefix)
        with pytest.raises(AssertionError, match="condition not met"):  # not at 3 failures
            consume_until(kafka_bootstrap, topic, lambda got: len(got) >= 2, 3)
        for _ in range(2):  # the 4th and 5th, in creative (the mode the stream holds)
            qwen.record(ok=False, mode="creative", latency_ms=10.0, error="boom")
        events = control_events(kafka_bootstrap, ops_settings, 2)
        for client in (qwen, other):
            client.close()
    by_model = {event["model"]: event for event in events}
    assert (by_model[MODEL]["state"], by_model[MODEL]["mode"]) == ("open", "balanced")
    assert "5 consecutive failures" in str(by_model[MODEL]["reason"])
    assert "3 consecutive failures" in str(by_model["other-model"]["reason"])


def test_a_downshift_survives_a_worker_sigkill_and_ends_on_time_once(
    make_worker: Callable[..., WorkerProcess],
    ops_settings: Settings,
    kafka_bootstrap: str,
) -> None:
    settings = with_open_s(ops_settings, 8.0)
    worker = make_worker(BREAKER__OPEN_S="8")
    worker.start()
    llm = LlmClient(MODEL, settings=settings)
    for _ in range(3):
        llm.record(ok=False, mode="creative", latency_ms=10.0, error="boom")
    wait_for(lambda: following(llm, "open", "balanced"), 10, "downshift")
    worker.kill()
    worker.start()
    wait_for(lambda: following(llm, "half_open", "balanced"), 30, "recovery after restart")
    time.sleep(2.0)  # would a restarted worker repeat a transition? give it time to
    events = control_events(kafka_bootstrap, settings, 2)
    llm.close()
    worker.stop()
    opened, probing = events[0], events[1]
    assert [e["epoch"] for e in events] == [1, 2]  # nothing forgotten, nothing repeated
    assert (probing["state"], probing["probe_mode"]) == ("half_open", "creative")
    assert isinstance(opened["until"], float)
    assert isinstance(probing["ts"], float)
    assert probing["ts"] >= opened["until"]  # not before the hold ended


def test_failures_counted_before_a_worker_sigkill_still_count_after_it(
    make_worker: Callable[..., WorkerProcess],
    ops_settings: Settings,
    kafka_bootstrap: str,
) -> None:
    worker = make_worker()
    worker.start()
    llm = LlmClient(MODEL, settings=ops_settings)
    for _ in range(2):
        llm.record(ok=False, mode="creative", latency_ms=10.0, error="boom")
    assert llm.flush(10) == 0
    time.sleep(3)  # processed, and the breaker's counters written with the batch
    worker.kill()
    worker.start()
    llm.record(ok=False, mode="creative", latency_ms=10.0, error="boom")  # the third
    (downshift,) = control_events(kafka_bootstrap, ops_settings, 1)
    llm.close()
    worker.stop()
    assert (downshift["state"], downshift["mode"]) == ("open", "balanced")
    assert "3 consecutive failures" in str(downshift["reason"])
