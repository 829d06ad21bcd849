"""The LLM SDK without a broker: wrapping, the local fast path, following llm.control."""

from __future__ import annotations

import asyncio
import socket

import pytest

from config.settings import KafkaSettings, SdkSettings, Settings
from producers import InMemoryTransport
from producers.llm import LlmClient
from producers.response_cache import InProcessCache
from schemas import Topic
from tests.helpers.llm import MODEL, Clock, control, outcomes


def failing(prompt: str, *, mode: str) -> str:
    raise TimeoutError(f"{mode} timed out on {prompt!r}")


def test_a_wrapped_call_runs_in_the_current_mode_and_publishes_its_outcome() -> None:
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport)
    generate = llm.wrap(lambda prompt, *, mode: f"{mode}: {prompt}")
    assert generate("citrus") == "creative: citrus"
    with pytest.raises(TimeoutError, match="creative timed out"):  # the caller's own error
        llm.wrap(failing)("rose")
    ok, failed = outcomes(transport)
    assert (ok["ok"], ok["mode"], ok["model"], ok.get("error")) == (True, "creative", MODEL, None)
    assert isinstance(ok["latency_ms"], float)
    assert (failed["ok"], failed["error"]) == (False, "TimeoutError: creative timed out on 'rose'")
    assert ok["call_id"] != failed["call_id"]


def test_async_generate_is_wrapped_too() -> None:
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport)

    async def generate(prompt: str, *, mode: str) -> str:
        await asyncio.sleep(0)
        return f"{mode}:{prompt}"

    assert asyncio.run(llm.wrap(generate)("musk")) == "creative:musk"
    assert outcomes(transport)[0]["ok"] is True


def test_local_failures_downshift_at_once_then_the_stream_decides() -> None:
    transport = InMemoryTransport()
    clock = Clock()
    llm = LlmClient(MODEL, transport=transport, clock=clock)
    generate = llm.wrap(failing)
    for _ in range(3):
        with pytest.raises(TimeoutError):
            generate("x")
    assert (llm.mode, llm.cache_ttl_s) == ("balanced", 300.0)  # before any stream decision
    assert llm.stats.local_trips == 1
    assert llm.status()["following_stream"] is False
    # The stream's decision arrives: the replica converges to it.
    transport.deliver(Topic.LLM_CONTROL, MODEL.encode(), control("open", "fast", epoch=4))
    assert llm.mode == "fast"
    assert llm.status()["following_stream"] is True


def test_half_open_sends_the_probe_budget_in_the_probe_mode() -> None:
    transport = InMemoryTransport()
    transport.deliver(
        Topic.LLM_CONTROL,
        MODEL.encode(),
        control("half_open", "balanced", epoch=2, probe_mode="creative"),
    )
    llm = LlmClient(MODEL, transport=transport)  # a new replica reads the state first
    assert [llm.choose_mode() for _ in range(5)] == ["creative"] * 3 + ["balanced"] * 2
    transport.deliver(
        Topic.LLM_CONTROL,
        MODEL.encode(),
        control("half_open", "balanced", epoch=3, probe_mode="creative"),
    )
    assert llm.choose_mode() == "creative"  # a new round, a new budget
    transport.deliver(
        Topic.LLM_CONTROL, MODEL.encode(), control("closed", "creative", epoch=4, ttl=3600.0)
    )
    assert (llm.choose_mode(), llm.cache_ttl_s) == ("creative", 3600.0)
    # A stale event (an older epoch) changes nothing.
    transport.deliver(Topic.LLM_CONTROL, MODEL.encode(), control("open", "fast", epoch=1))
    assert llm.mode == "creative"


def test_the_local_breaker_recovers_on_its_own_clock_without_the_stream() -> None:
    transport = InMemoryTransport()
    clock = Clock()
    settings = Settings().model_copy(
        update={"breaker": Settings().breaker.model_copy(update={"open_s": 10.0})}
    )
    llm = LlmClient(MODEL, settings=settings, transport=transport, clock=clock)
    for _ in range(3):
        llm.record(ok=False, mode="creative", latency_ms=5.0, error="boom")
    assert llm.mode == "balanced"
    clock.now += 10.0
    assert llm.choose_mode() == "creative"  # half-open: a probe
    llm.record(ok=True, mode="creative", latency_ms=5.0)
    llm.record(ok=True, mode="creative", latency_ms=5.0)
    assert (llm.mode, llm.cache_ttl_s) == ("creative", 3600.0)


def test_with_time_recovery_the_local_breaker_returns_to_creative_without_a_call() -> None:
    transport = InMemoryTransport()
    clock = Clock()
    settings = Settings(breaker={"open_s": 10.0, "recovery": "time"})
    llm = LlmClient(MODEL, settings=settings, transport=transport, clock=clock)
    for _ in range(3):
        llm.record(ok=False, mode="creative", latency_ms=5.0, error="boom")
    assert (llm.mode, llm.cache_ttl_s) == ("balanced", 300.0)
    clock.now += 10.0
    assert (llm.mode, llm.cache_ttl_s, llm.status()["state"]) == ("creative", 3600.0, "closed")
    assert llm.stats.probes == 0


def test_the_local_breaker_and_failure_policy_take_the_model_s_own_settings() -> None:
    settings = Settings(
        breaker={
            "models": {MODEL: {"failure_threshold": 5, "ignore_exceptions": ["builtins.KeyError"]}}
        }
    )
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, settings=settings, transport=transport)
    other = LlmClient("other-model", settings=settings, transport=transport)
    for client in (llm, other):
        for _ in range(3):
            client.record(ok=False, mode="creative", latency_ms=1.0, error="boom")
    assert (llm.mode, other.mode) == ("creative", "balanced")
    for _ in range(2):
        llm.record(ok=False, mode="creative", latency_ms=1.0, error="boom")
    assert llm.mode == "balanced"

    def missing(prompt: str, *, mode: str) -> str:
        raise KeyError(prompt)

    with pytest.raises(KeyError):
        llm.wrap(missing)("x")
    with pytest.raises(KeyError):
        other.wrap(missing)("x")
    assert (llm.stats.ignored, other.stats.ignored) == (1, 0)


def test_the_cache_ttl_follows_the_control_stream_for_new_entries() -> None:
    transport = InMemoryTransport()
    clock = Clock()
    cache = InProcessCache(timer=clock)
    llm = LlmClient(MODEL, transport=transport, cache=cache)
    llm.cache_put("old", b"stored at 3600")
    transport.deliver(Topic.LLM_CONTROL, MODEL.encode(), control("open", "balanced", epoch=1))
    llm.cache_put("new", b"stored at 300")
    clock.now += 301
    assert (llm.cache_get("old"), llm.cache_get("new")) == (b"stored at 3600", None)


def test_kafka_unreachable_never_blocks_or_raises_into_the_call_path() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once closed
    settings = Settings(
        kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}"),
        sdk=SdkSettings(control_wait_s=0.2, close_timeout_s=0.1),
    )
    with LlmClient(MODEL, settings=settings) as llm:
        generate = llm.wrap(lambda prompt, *, mode: mode)
        assert [generate("x") for _ in range(50)] == ["creative"] * 50
        for _ in range(3):
            llm.record(ok=False, mode="creative", latency_ms=1.0, error="down")
        assert generate("x") == "balanced"  # the local breaker serves alone
        assert llm.status()["following_stream"] is False


def test_a_stale_stream_decision_gives_way_to_the_local_breaker() -> None:
    transport = InMemoryTransport()
    clock = Clock()
    transport.deliver(Topic.LLM_CONTROL, MODEL.encode(), control("open", "balanced", epoch=1))
    llm = LlmClient(MODEL, transport=transport, clock=clock)  # the hold ends at 2,000
    assert (llm.mode, llm.status()["following_stream"]) == ("balanced", True)
    clock.now = 2_000.0 + llm.settings.sdk.control_grace_s + 1  # no newer decision came
    assert llm.status()["following_stream"] is False
    assert llm.choose_mode() == "creative"  # the local breaker probes on its own clock
    llm.record(ok=True, mode="creative", latency_ms=5.0)
    llm.record(ok=True, mode="creative", latency_ms=5.0)
    assert (llm.mode, llm.cache_ttl_s) == ("creative", 3600.0)


def test_the_caller_s_own_errors_neither_count_nor_are_published() -> None:
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport)

    def refusing(prompt: str, *, mode: str) -> str:
        raise ValueError(f"prompt {prompt!r} refused by validation")

    generate = llm.wrap(refusing)
    for _ in range(5):  # more than the failure threshold
        with pytest.raises(ValueError, match="refused by validation"):
            generate("x")
    assert outcomes(transport) == []
    assert (llm.mode, llm.stats.local_trips, llm.stats.ignored) == ("creative", 0, 5)


def test_wrap_can_name_what_counts_for_one_function() -> None:
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport)
    generate = llm.wrap(failing, record=[ConnectionError])  # a timeout is not recorded here
    with pytest.raises(TimeoutError):
        generate("x")
    (outcome,) = outcomes(transport)
    assert (outcome["ok"], outcome.get("error")) == (True, None)  # the call answered
    named = llm.wrap(failing, record=["builtins.ConnectionError"])  # names work too
    with pytest.raises(TimeoutError):
        named("x")
    assert [outcome["ok"] for outcome in outcomes(transport)] == [True, True]
    strict = llm.wrap(failing, ignore=[])
    for _ in range(3):
        with pytest.raises(TimeoutError):
            strict("x")
    assert llm.mode == "balanced"


def test_the_settings_name_the_exceptions_and_a_wrong_name_fails_at_once() -> None:
    settings = Settings(breaker={"ignore_exceptions": ["builtins.TimeoutError"]})
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, settings=settings, transport=transport)
    with pytest.raises(TimeoutError):
        llm.wrap(failing)("x")
    assert outcomes(transport) == []
    with pytest.raises(ValueError, match="not found"):
        LlmClient(
            MODEL,
            settings=Settings(breaker={"record_exceptions": ["openai.NoSuchError"]}),
            transport=InMemoryTransport(),
        )


def test_an_exception_the_policy_cannot_judge_is_a_failure_and_reaches_the_caller() -> None:
    class Odd(Exception):
        @property
        def response(self) -> object:
            raise RuntimeError("a lazy attribute that fails")

    def odd(prompt: str, *, mode: str) -> str:
        raise Odd(prompt)

    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport)
    with pytest.raises(Odd):  # the caller's exception, not the SDK's
        llm.wrap(odd)("x")
    (outcome,) = outcomes(transport)
    assert outcome["ok"] is False
    assert llm.stats.sdk_errors == 1
