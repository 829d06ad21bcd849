"""Latency from an LLM failure to every replica following the breaker's decision.

    python benchmarks/llm_breaker_latency.py                  # embedded broker (Tansu)
    python benchmarks/llm_breaker_latency.py --broker apache  # Apache Kafka (KRaft, JVM)

``--models`` (20) LLM clients, one per model, publish ``--rate`` (2,000) outcomes/s in total
through the LLM SDK. Every so often a model gets 3 failures in a row; one sample runs from
publishing the 3rd failure to the moment that model's client follows the resulting
``llm.control`` event (the client's local breaker has downshifted already; this measures
the shared decision). The breaker is held ``--open-s`` (1 s) and recovers through probes
before the model fails again.

Measured twice in one run, with the same clients: against the fragrance-ops worker, and
against a plain confluent-kafka service (consume outcomes, count consecutive failures,
produce a control event; close again after ``--open-s``). Also printed: the SDK's cost per
wrapped call (the wrapper's time minus the bare generate function's), in microseconds.
This is a benchmark, not a test: figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import uuid

import orjson
from confluent_kafka import Consumer, Producer
from harness import (
    add_worker_setting_option,
    broker,
    fresh_settings,
    latency_summary,
    running_service,
    running_worker,
    subscribe_then_ready,
    worker_settings,
)

from config.settings import BreakerSettings, SdkSettings, Settings
from producers import KafkaTransport
from producers.llm import LlmClient
from schemas import LlmControl, Topic, encode, topic_name


def drive(settings: Settings, models: int, rate: float, samples_per_model: int) -> list[float]:
    transport = KafkaTransport(settings)
    tag = uuid.uuid4().hex[:6]
    clients = [
        LlmClient(f"model-{tag}-{index}", settings=settings, transport=transport)
        for index in range(models)
    ]
    failing: dict[int, float] = {}  # model index -> when its 3rd failure was published
    next_failure = {index: time.monotonic() + 1.0 + index * 0.05 for index in range(models)}
    latencies: list[list[float]] = [[] for _ in range(models)]
    started, sent = time.perf_counter(), 0
    deadline = time.monotonic() + 30.0 + samples_per_model * 10.0
    while time.monotonic() < deadline:
        if all(len(samples) >= samples_per_model for samples in latencies):
            break
        due = int((time.perf_counter() - started) * rate)
        while sent < due:
            index = sent % models
            client = clients[index]
            now = time.monotonic()
            if index not in failing and now >= next_failure[index] and client.mode == "creative":
                for _ in range(3):
                    client.record(ok=False, mode="creative", latency_ms=900.0, error="timeout")
                failing[index] = time.perf_counter()
            else:
                client.record(ok=True, mode=client.choose_mode(), latency_ms=120.0)
            sent += 1
        for index, failed_at in list(failing.items()):
            status = clients[index].status()
            if status["following_stream"] and status["state"] == "open":
                latencies[index].append(time.perf_counter() - failed_at)
                del failing[index]
                next_failure[index] = time.monotonic() + 3.0  # after the hold and probes
        time.sleep(0.0005)
    for client in clients:
        client._control.close()  # the shared transport is closed once, below
    transport.close(10)
    return [latency for samples in latencies for latency in samples[:samples_per_model]]


def plain_service(
    bootstrap: str, prefix: str, open_s: float, ready: threading.Event, stop: threading.Event
) -> None:
    """The baseline: 3 consecutive failures -> open; ``open_s`` later -> closed."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"plain-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",  # fresh topics; a slow group join loses nothing
        }
    )
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 1, "partitioner": "murmur2_random"}
    )
    subscribe_then_ready(consumer, topic_name(Topic.LLM_OUTCOMES, prefix), ready)
    control = topic_name(Topic.LLM_CONTROL, prefix)
    streak: dict[str, int] = {}
    epoch: dict[str, int] = {}
    reopen: dict[str, float] = {}

    def publish(model: str, state: str, mode: str, ttl: float) -> None:
        epoch[model] = epoch.get(model, 0) + 1
        event = LlmControl(
            model=model,
            state=state,  # type: ignore[arg-type]
            mode=mode,  # type: ignore[arg-type]
            cache_ttl_s=ttl,
            until=None,
            reason="plain",
            ts=time.time(),
            epoch=epoch[model],
        )
        producer.produce(control, encode(event), model.encode())

    while not stop.is_set():
        for message in consumer.consume(1000, timeout=0.001):
            if message.error() is not None:
                continue
            outcome = orjson.loads(message.value())
            model = outcome["model"]
            if model in reopen or outcome["mode"] != "creative":
                continue
            streak[model] = 0 if outcome["ok"] else streak.get(model, 0) + 1
            if streak[model] >= 3:
                streak[model] = 0
                reopen[model] = time.monotonic() + open_s
                publish(model, "open", "balanced", 300.0)
        for model, due in list(reopen.items()):
            if time.monotonic() >= due:
                del reopen[model]
                publish(model, "closed", "creative", 3600.0)
        producer.poll(0)
    producer.flush(10)
    consumer.close()


def wrapper_overhead_us(settings: Settings, calls: int) -> float:
    """Median per-call cost of ``LlmClient.wrap`` over the bare function, in us."""
    transport = KafkaTransport(settings)
    client = LlmClient(f"overhead-{uuid.uuid4().hex[:6]}", settings=settings, transport=transport)

    def generate(prompt: str, *, mode: str = "creative") -> str:
        return prompt

    wrapped = client.wrap(generate)
    rounds = []
    for _ in range(5):
        begin = time.perf_counter()
        for _ in range(calls):
            generate("p")
        bare = time.perf_counter() - begin
        begin = time.perf_counter()
        for _ in range(calls):
            wrapped("p")
        rounds.append((time.perf_counter() - begin - bare) / calls * 1e6)
    client.close()
    return statistics.median(rounds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", choices=["tansu", "apache"], default="tansu")
    parser.add_argument("--bootstrap", help="use this Kafka instead of starting one")
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--rate", type=float, default=2000.0, help="outcomes/s over all models")
    parser.add_argument("--samples-per-model", type=int, default=10)
    parser.add_argument("--open-s", type=float, default=1.0)
    parser.add_argument("--partitions", type=int, default=8)
    add_worker_setting_option(parser)
    args = parser.parse_args()

    with broker(args.broker, args.bootstrap) as (bootstrap, embedded):
        groups = {
            "breaker": BreakerSettings(open_s=args.open_s),
            "sdk": SdkSettings(control_wait_s=5.0),
        }
        print(
            f"broker: {args.bootstrap or args.broker} at {bootstrap}; {args.models} models, "
            f"{args.rate:.0f} outcomes/s, open for {args.open_s:g} s"
        )
        overhead = fresh_settings(bootstrap, embedded, args.partitions, "over", **groups)
        print(f"SDK wrap: {wrapper_overhead_us(overhead, 20_000):.1f} us per call")
        plain_settings = fresh_settings(bootstrap, embedded, args.partitions, "plain", **groups)
        prefix = plain_settings.kafka.topic_prefix
        with running_service(plain_service, bootstrap, prefix, args.open_s):
            plain = latency_summary(
                "plain confluent-kafka service",
                "downshifts",
                drive(plain_settings, args.models, args.rate, args.samples_per_model),
            )
        settings = fresh_settings(bootstrap, embedded, args.partitions, "llm", **groups)
        with running_worker(
            settings, **{"BREAKER__OPEN_S": str(args.open_s), **worker_settings(args)}
        ):
            ops = latency_summary(
                "fragrance-ops worker",
                "downshifts",
                drive(settings, args.models, args.rate, args.samples_per_model),
            )
        print(f"ratio worker / plain: p50 {ops[0] / plain[0]:.2f}, p99 {ops[1] / plain[1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
