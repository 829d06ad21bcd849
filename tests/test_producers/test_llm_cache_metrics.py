"""wrap()'s response cache, the SDK's Prometheus metrics and state-change listeners."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from config.settings import Settings
from producers import InMemoryTransport
from producers.llm import Caching, LlmClient
from producers.llm_metrics import LlmMetrics
from producers.response_cache import InProcessCache, RedisCache
from rules.breaker import Transition
from schemas import Topic
from tests.helpers.llm import MODEL, Clock, control, outcomes

ROOT = Path(__file__).parents[2]


class Model:
    """A model that counts its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, prompt: str, *, mode: str) -> str:
        self.calls.append((prompt, mode))
        return f"{mode}: {prompt}"


# --- the cache ------------------------------------------------------------------------------


def test_wrap_serves_from_the_cache_by_mode_and_prompt() -> None:
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport, clock=Clock())  # control events end at 2,000
    model = Model()
    generate = llm.wrap(model, cache=True)
    assert [generate("citrus"), generate("citrus"), generate("rose")] == [
        "creative: citrus",
        "creative: citrus",
        "creative: rose",
    ]
    assert model.calls == [("citrus", "creative"), ("rose", "creative")]
    assert len(outcomes(transport)) == 2  # a cached answer is not a call of the model
    assert (llm.stats.cache_hits, llm.stats.cache_misses) == (1, 2)
    # A downshift: another mode, another entry.
    transport.deliver(Topic.LLM_CONTROL, MODEL.encode(), control("open", "balanced", 1, 300.0))
    assert generate("citrus") == "balanced: citrus"
    assert model.calls[-1] == ("citrus", "balanced")


def test_entries_get_the_ttl_the_control_stream_sets_when_stored() -> None:
    transport = InMemoryTransport()
    timer = Clock()
    llm = LlmClient(MODEL, transport=transport, cache=InProcessCache(timer=timer), clock=Clock())
    model = Model()
    generate = llm.wrap(model, cache=True)

    def downshift(epoch: int) -> None:
        transport.deliver(
            Topic.LLM_CONTROL, MODEL.encode(), control("open", "balanced", epoch, 300.0)
        )

    generate("healthy")  # creative, stored for 3,600 s
    downshift(1)
    generate("degraded")  # balanced, stored for 300 s
    transport.deliver(Topic.LLM_CONTROL, MODEL.encode(), control("closed", "creative", 2, 3600.0))
    timer.now += 301
    generate("healthy")  # still cached
    downshift(3)
    generate("degraded")  # expired: called again
    assert model.calls == [
        ("healthy", "creative"),
        ("degraded", "balanced"),
        ("degraded", "balanced"),
    ]


def test_probes_always_reach_the_model_and_refresh_the_cache() -> None:
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport, clock=Clock())
    model = Model()
    generate = llm.wrap(model, cache=True)
    generate("citrus")  # cached in creative
    transport.deliver(
        Topic.LLM_CONTROL,
        MODEL.encode(),
        control("half_open", "balanced", 1, 300.0, probe_mode="creative"),
    )
    assert [generate("citrus") for _ in range(4)] == ["creative: citrus"] * 3 + ["balanced: citrus"]
    assert model.calls.count(("citrus", "creative")) == 4  # 3 probes called the model
    assert generate("citrus") == "balanced: citrus"  # after the probes: from the cache
    assert model.calls.count(("citrus", "balanced")) == 1


def test_failures_are_not_cached_and_a_custom_key_and_codec_apply() -> None:
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport)
    answers = iter([ConnectionError("down"), {"text": "amber"}])
    calls = []

    def model(prompt: dict[str, str], *, mode: str, user: str) -> dict[str, str]:
        calls.append(user)
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    caching = Caching(key=lambda prompt, *, user: prompt["text"])  # per prompt, not per user
    generate = llm.wrap(model, cache=caching)
    with pytest.raises(ConnectionError):
        generate({"text": "warm"}, user="a")
    assert generate({"text": "warm"}, user="b") == {"text": "amber"}
    assert generate({"text": "warm"}, user="c") == {"text": "amber"}
    assert calls == ["a", "b"]
    skip = llm.wrap(Model(), cache=Caching(key=lambda prompt: None))  # None: not cached
    skip("x")
    skip("x")
    assert llm.stats.cache_hits == 1


def test_an_async_wrap_serves_from_the_cache_too() -> None:
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport)
    calls = []

    async def model(prompt: str, *, mode: str) -> str:
        calls.append(prompt)
        await asyncio.sleep(0)
        return prompt.upper()

    generate = llm.wrap(model, cache=True)

    async def main() -> list[str]:
        return [await generate("musk"), await generate("musk")]

    assert asyncio.run(main()) == ["MUSK", "MUSK"]
    assert calls == ["musk"]


def test_an_unreachable_redis_cache_never_fails_the_call() -> None:
    transport = InMemoryTransport()
    cache = RedisCache("redis://127.0.0.1:1/0", retry_after_s=60.0)  # nothing listens there
    llm = LlmClient(MODEL, transport=transport, cache=cache)
    model = Model()
    generate = llm.wrap(model, cache=True)
    assert [generate("x"), generate("x")] == ["creative: x", "creative: x"]
    assert len(model.calls) == 2  # served without the cache
    assert cache.errors >= 1
    cache.close()


def test_a_cached_answer_is_served_from_a_real_redis(redis_url: str) -> None:
    transport = InMemoryTransport()
    cache = RedisCache(redis_url, prefix=f"test-llm-{time.monotonic_ns()}:")
    model = Model()
    first = LlmClient(MODEL, transport=transport, cache=cache)
    second = LlmClient(MODEL, transport=transport, cache=cache)  # another replica
    assert first.wrap(model, cache=True)("oud") == "creative: oud"
    assert second.wrap(model, cache=True)("oud") == "creative: oud"
    assert len(model.calls) == 1
    cache.clear()
    cache.close()


# --- metrics --------------------------------------------------------------------------------


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    assert value is not None, f"{name}{labels} not exported"
    return value


def test_the_sdk_exports_cache_calls_failures_trips_and_latency() -> None:
    registry = CollectorRegistry()
    metrics = LlmMetrics(registry)
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport, metrics=metrics)
    model = Model()
    generate = llm.wrap(model, cache=True)
    generate("a")
    generate("a")
    generate("b")

    def failing(prompt: str, *, mode: str) -> str:
        raise TimeoutError("slow")

    for _ in range(3):
        with pytest.raises(TimeoutError):
            llm.wrap(failing)("x")

    def chunks(prompt: str, *, mode: str) -> Iterator[str]:
        yield "a"
        yield "b"

    assert list(llm.wrap_stream(chunks)("x")) == ["a", "b"]  # served in balanced
    model_label = {"model": MODEL}
    assert sample(registry, "fragrance_ops_llm_cache_hits_total", **model_label) == 1
    assert sample(registry, "fragrance_ops_llm_cache_misses_total", **model_label) == 2
    assert sample(registry, "fragrance_ops_llm_cache_size", **model_label) == 2
    creative = {"model": MODEL, "mode": "creative"}
    balanced = {"model": MODEL, "mode": "balanced"}
    assert sample(registry, "fragrance_ops_llm_calls_total", **creative) == 5
    assert sample(registry, "fragrance_ops_llm_failures_total", **creative) == 3
    assert sample(registry, "fragrance_ops_llm_calls_total", **balanced) == 1
    assert sample(registry, "fragrance_ops_llm_local_trips_total", **model_label) == 1
    assert sample(registry, "fragrance_ops_llm_latency_seconds_count", **creative) == 5
    assert sample(registry, "fragrance_ops_llm_first_token_seconds_count", **balanced) == 1
    assert registry.get_sample_value("fragrance_ops_llm_first_token_seconds_count", creative) in (
        None,
        0.0,
    )
    exposition = generate_latest(registry).decode()
    assert 'fragrance_ops_llm_cache_size{model="qwen-fragrance"} 2.0' in exposition
    llm.close()
    assert registry.get_sample_value("fragrance_ops_llm_cache_size", model_label) is None


def test_deadlines_are_counted_per_mode() -> None:
    registry = CollectorRegistry()
    llm = LlmClient(MODEL, transport=InMemoryTransport(), metrics=LlmMetrics(registry))

    async def hanging(prompt: str, *, mode: str) -> str:
        await asyncio.sleep(10)
        return mode

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await llm.wrap(hanging, deadline_s=0.05)("x")

    asyncio.run(main())
    labels = {"model": MODEL, "mode": "creative"}
    assert sample(registry, "fragrance_ops_llm_deadlines_exceeded_total", **labels) == 1
    assert sample(registry, "fragrance_ops_llm_failures_total", **labels) == 1


def test_the_default_metrics_are_made_once_per_process() -> None:
    assert LlmMetrics.default() is LlmMetrics.default()


def test_the_sdk_imports_and_serves_without_prometheus_openai_or_litellm() -> None:
    script = (
        "import sys\n"
        "for name in ('prometheus_client', 'openai', 'litellm'):\n"
        "    sys.modules[name] = None  # import fails\n"
        "from producers import InMemoryTransport\n"
        "from producers.llm import LlmClient\n"
        "llm = LlmClient('m', transport=InMemoryTransport())\n"
        "print(llm.wrap(lambda p, *, mode: mode, cache=True)('x'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "creative\n"


# --- listeners ------------------------------------------------------------------------------


def test_listeners_hear_each_change_from_the_stream_and_the_local_breaker() -> None:
    transport = InMemoryTransport()
    clock = Clock()
    settings = Settings(breaker={"open_s": 10.0, "recovery": "time"})
    llm = LlmClient(MODEL, transport=transport, clock=clock, settings=settings)
    heard: list[tuple[str, str, float, str]] = []

    def listener(new: Transition, old: Transition) -> None:
        heard.append((old.mode, new.mode, new.cache_ttl_s, new.state))

    remove = llm.on_change(listener)
    for _ in range(3):  # a local trip: heard at the third failure
        llm.record(ok=False, mode="creative", latency_ms=1.0, error="boom")
    assert heard == [("creative", "balanced", 300.0, "open")]
    clock.now += 10.0  # local time recovery, noticed at the next use
    assert llm.mode == "creative"
    transport.deliver(Topic.LLM_CONTROL, MODEL.encode(), control("open", "fast", 5, 300.0))
    assert llm.choose_mode() == "fast"
    assert heard[1:] == [
        ("balanced", "creative", 3600.0, "closed"),
        ("creative", "fast", 300.0, "open"),
    ]
    assert llm.mode == "fast"
    assert len(heard) == 3  # no change, nothing heard
    remove()
    transport.deliver(Topic.LLM_CONTROL, MODEL.encode(), control("closed", "creative", 6, 3600.0))
    assert llm.mode == "creative"
    assert len(heard) == 3


def test_a_failing_listener_never_reaches_the_call() -> None:
    transport = InMemoryTransport()
    llm = LlmClient(MODEL, transport=transport, clock=Clock())

    def broken(new: Transition, old: Transition) -> None:
        raise RuntimeError("listener bug")

    llm.on_change(broken)
    transport.deliver(Topic.LLM_CONTROL, MODEL.encode(), control("open", "balanced", 1, 300.0))
    assert llm.wrap(Model())("x") == "balanced: x"
    assert llm.stats.sdk_errors == 1
