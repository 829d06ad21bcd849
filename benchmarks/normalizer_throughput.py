"""Throughput of the reward normalizer against a plain confluent-kafka loop, in one run.

    python benchmarks/normalizer_throughput.py                  # embedded broker (Tansu)
    python benchmarks/normalizer_throughput.py --broker apache  # Apache Kafka (KRaft, JVM)
    python benchmarks/normalizer_throughput.py --bootstrap host:9092

Prints:
  * the SDK's cost per ``TrainerClient.log_step`` call (validate, encode, enqueue), in us
  * events/s through the worker (one process, every processor loaded)
  * events/s through a plain confluent-kafka consume -> normalize -> produce loop on the
    same input topic, using the same window rule, and the ratio worker / plain.

Both rates are measured the same way: records out / (last output's CreateTime - first
output's CreateTime), so start-up and group joins are excluded from both.
This is a benchmark, not a test: figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from harness import broker, fresh_settings, running_worker

from config.settings import SdkSettings, Settings
from fragrance_ops.admin import create_contract_topics
from producers import KafkaTransport, TrainerClient
from rules.reward_window import RewardWindow
from schemas import Topic, topic_name


def fill(settings: Settings, events: int, runs: int) -> float:
    """Publish ``events`` metrics over ``runs`` runs through the SDK; returns us per call."""
    # One process hosting many runs shares one producer (a trainer process has one).
    transport = KafkaTransport(settings)
    clients = [
        TrainerClient(
            f"bench-run-{i}", settings=settings, transport=transport, receive_commands=False
        )
        for i in range(runs)
    ]
    per_call: list[float] = []
    step = 0
    sent = 0
    while sent < events:
        started = time.perf_counter()
        for client in clients:
            client.log_step(step, loss=0.5, reward=float((step * 7919 + sent) % 1000) / 100.0)
        per_call.append((time.perf_counter() - started) / len(clients))
        sent += len(clients)
        step += 1
    assert transport.close(60) == 0
    assert transport.stats.dropped == 0, transport.stats
    return statistics.median(per_call) * 1e6


def output_rate(bootstrap: str, topic: str, expected: int, timeout_s: float) -> float:
    """events/s from the CreateTime span of ``expected`` output records."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex}"})
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    first, last, seen = float("inf"), 0.0, 0
    deadline = time.monotonic() + timeout_s
    while seen < expected and time.monotonic() < deadline:
        for message in consumer.consume(10_000, timeout=0.5):
            if message.error() is None:
                created = message.timestamp()[1] / 1000.0
                first, last, seen = min(first, created), max(last, created), seen + 1
    consumer.close()
    if seen < expected:
        raise SystemExit(f"only {seen} of {expected} outputs on {topic} in {timeout_s}s")
    return expected / max(last - first, 1e-9)


def plain_loop(bootstrap: str, source: str, sink: str, expected: int, window: int) -> None:
    """The baseline: confluent-kafka consume, orjson decode, the same window rule, produce."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"plain-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": True,
        }
    )
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 5, "partitioner": "murmur2_random"}
    )
    consumer.subscribe([source])
    windows: dict[str, RewardWindow] = {}
    done = 0
    while done < expected:
        for message in consumer.consume(2000, timeout=0.5):
            if message.error() is not None:
                continue
            metric = orjson.loads(message.value())
            run = metric["run_id"]
            rule = windows.get(run)
            if rule is None:
                rule = windows[run] = RewardWindow(window)
            stats = rule.add(metric["reward"], step=metric["step"])
            if stats is not None:
                out = {
                    "run_id": run,
                    "step": metric["step"],
                    "reward": stats.reward,
                    "normalized_reward": stats.normalized_reward,
                    "mean": stats.mean,
                    "std": stats.std,
                    "count": stats.count,
                    "ts": time.time(),
                }
                while True:
                    try:
                        producer.produce(sink, orjson.dumps(out), message.key())
                        break
                    except BufferError:
                        producer.poll(0.05)
            done += 1
        producer.poll(0)
    producer.flush(30)
    consumer.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", choices=["tansu", "apache"], default="tansu")
    parser.add_argument("--bootstrap", help="use this Kafka instead of starting one")
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--partitions", type=int, default=8)
    args = parser.parse_args()

    with broker(args.broker, args.bootstrap) as (bootstrap, embedded):
        settings = fresh_settings(
            bootstrap,
            embedded,
            args.partitions,
            "bench",
            sdk=SdkSettings(queue_max_messages=2_000_000),
        )
        prefix = settings.kafka.topic_prefix
        metrics = topic_name(Topic.METRICS, prefix)
        print(
            f"broker: {args.bootstrap or args.broker} at {bootstrap}; "
            f"{args.events} metrics over {args.runs} runs, {args.partitions} partitions"
        )

        publish_us = fill(settings, args.events, args.runs)
        print(f"SDK log_step: {publish_us:.1f} us per call (median)")

        plain_kafka = settings.kafka.model_copy(update={"topic_prefix": f"{prefix}plain."})
        create_contract_topics(plain_kafka)
        plain_sink = topic_name(Topic.REWARD_STATS, plain_kafka.topic_prefix)
        plain_loop(bootstrap, metrics, plain_sink, args.events, settings.reward.window_size)
        plain = output_rate(bootstrap, plain_sink, args.events, 120)
        print(f"plain confluent-kafka loop: {plain:,.0f} events/s")

        with running_worker(settings):
            rate = output_rate(bootstrap, topic_name(Topic.REWARD_STATS, prefix), args.events, 600)
        print(f"fragrance-ops worker: {rate:,.0f} events/s")
        print(f"ratio worker / plain: {rate / plain:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
