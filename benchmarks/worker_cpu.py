"""The worker's CPU per event at a steady rate, its idle CPU subtracted.

    python benchmarks/worker_cpu.py --broker apache  # Apache Kafka (KRaft, JVM)
    python benchmarks/worker_cpu.py                  # embedded broker (Tansu)

``--keys`` (20) runs publish ``--rate-per-key`` (10) metrics/s each for ``--seconds`` (30),
through the trainer SDK, with a checkpoint every 50 steps; then the same for LLM outcomes
(20 models, through the LLM SDK) and for ratings (20 target runs, through the rating SDK).
For each, the worker's CPU time (every thread, from ``/proc/<pid>/stat``) from the first
event until its consumer group has committed the last one, less its idle CPU over the same
wall time (measured first, with no input), divided by the events.

The same metrics go through a plain confluent-kafka loop in its own process (consume,
decode, the reward window rule, produce the statistics) in the same run: its CPU per
metric, measured the same way, is printed beside the worker's.
This is a benchmark, not a test: figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition
from harness import (
    add_worker_setting_option,
    broker,
    fresh_settings,
    running_worker,
    worker_settings,
)

from config.settings import Settings
from producers import KafkaTransport, RatingClient, TrainerClient
from producers.llm import LlmClient
from rules.reward_window import RewardWindow
from schemas import Topic, topic_name

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
CHECKPOINT_EVERY = 50


def cpu_seconds(pid: int) -> float:
    """User + system CPU of every thread of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as stat:
        text = stat.read()
    utime, stime = text[text.rindex(")") + 2 :].split()[11:13]
    return (int(utime) + int(stime)) / _TICKS_PER_S


@dataclass(frozen=True)
class Load:
    name: str
    topic: Topic
    publish: Callable[[Settings, int, float, float], int]  # -> events published


def publish_metrics(settings: Settings, keys: int, rate: float, seconds: float) -> int:
    transport = KafkaTransport(settings)
    tag = uuid.uuid4().hex[:6]
    clients = [
        TrainerClient(
            f"cpu-{tag}-{index}", settings=settings, transport=transport, receive_commands=False
        )
        for index in range(keys)
    ]

    def send(index: int, step: int) -> None:
        client = clients[index]
        if step > 0 and step % CHECKPOINT_EVERY == 0:
            client.checkpoint_saved(step, f"file:///bench/{client.run_id}/{step}.pt")
        client.log_step(
            step,
            loss=1.0 + (step % 7) * 0.01,
            reward=1.0 + (step % 5) * 0.01,
            policy_loss=0.5,
            value_loss=0.4,
            entropy=1.2,
            checkpoint_step=(step - step % CHECKPOINT_EVERY) or None,
        )

    sent = paced(keys, rate, seconds, send)
    assert transport.close(30) == 0, transport.stats
    return sent


def publish_outcomes(settings: Settings, keys: int, rate: float, seconds: float) -> int:
    transport = KafkaTransport(settings)
    tag = uuid.uuid4().hex[:6]
    clients = [
        LlmClient(f"cpu-{tag}-{index}", settings=settings, transport=transport)
        for index in range(keys)
    ]

    def send(index: int, step: int) -> None:
        # One failure in 20: counted, never three in a row (no downshift to follow).
        ok = (step + index) % 20 != 0
        clients[index].record(
            ok=ok, mode="creative", latency_ms=120.0, error=None if ok else "timeout"
        )

    sent = paced(keys, rate, seconds, send)
    for client in clients:
        client.close()
    transport.close(30)
    return sent


def publish_ratings(settings: Settings, keys: int, rate: float, seconds: float) -> int:
    client = RatingClient(settings=settings)
    tag = uuid.uuid4().hex[:6]

    def send(index: int, step: int) -> None:
        client.rate(
            1.0 + (step * 7 + index) % 5,
            user_id=f"user-{step % 50}",
            formula_id=f"formula-{tag}-{index}-{step}",
            run_id=f"cpu-{tag}-{index}",
        )

    sent = paced(keys, rate, seconds, send)
    assert client.flush(30) == 0, client.stats
    client.close()
    return sent


def paced(keys: int, rate: float, seconds: float, send: Callable[[int, int], None]) -> int:
    """``send(key index, step)`` for each key ``rate`` times a second, evenly spread."""
    total = int(keys * rate * seconds)
    started = time.perf_counter()
    for sent in range(total):
        due = started + sent / (keys * rate)
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        send(sent % keys, sent // keys)
    return total


def committed_all(settings: Settings, group: str, topic: str, timeout_s: float) -> None:
    """Wait until ``group`` has committed every record of ``topic``."""
    consumer = Consumer({"bootstrap.servers": settings.kafka.bootstrap_servers, "group.id": group})
    partitions = [
        TopicPartition(topic, p)
        for p in consumer.list_topics(topic, timeout=10).topics[topic].partitions
    ]
    ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in partitions}
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            done = consumer.committed(partitions, timeout=10)
            if all(tp.offset >= ends[tp.partition] or not ends[tp.partition] for tp in done):
                return
            time.sleep(0.2)
        raise SystemExit(f"{group} did not commit all of {topic} within {timeout_s}s")
    finally:
        consumer.close()


def plain_loop(
    bootstrap: str, source: str, sink: str, expected: int, idle_s: float, report: Any
) -> None:
    """The baseline: consume metrics, decode, the reward window rule, produce the stats.

    Once it has its partitions it measures its idle CPU for ``idle_s`` and puts it on
    ``report`` (CPU s per s); after the ``expected`` records, the CPU and the wall time
    from the first record to the last output delivered."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"plain-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
        }
    )
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 1, "partitioner": "murmur2_random"}
    )
    assigned: list[bool] = []
    consumer.subscribe([source], on_assign=lambda *_: assigned.append(True))
    while not assigned:
        consumer.consume(1, timeout=0.1)
    cpu, until = time.process_time(), time.monotonic() + idle_s
    while time.monotonic() < until:
        consumer.consume(1000, timeout=0.1)
    report.put((time.process_time() - cpu) / idle_s)
    windows: dict[str, RewardWindow] = {}
    first: tuple[float, float] | None = None
    done = 0
    while done < expected:
        for message in consumer.consume(1000, timeout=0.1):
            if message.error() is not None:
                continue
            if first is None:
                first = (time.process_time(), time.monotonic())
            metric = orjson.loads(message.value())
            window = windows.setdefault(metric["run_id"], RewardWindow(1000))
            stats = window.add(metric["reward"], step=metric["step"])
            if stats is not None:
                out = {"run_id": metric["run_id"], "step": metric["step"], "mean": stats.mean}
                producer.produce(sink, orjson.dumps(out), message.key())
            done += 1
        producer.poll(0)
    producer.flush(30)
    assert first is not None
    report.put((time.process_time() - first[0], time.monotonic() - first[1]))
    consumer.close()


def measure(
    label: str, pid: int, idle_per_s: float, run: Callable[[], int], wait: Callable[[], None]
) -> float:
    """us of ``pid``'s CPU per event over ``run`` and ``wait``, idle CPU subtracted."""
    cpu, wall = cpu_seconds(pid), time.monotonic()
    events = run()
    wait()
    used = cpu_seconds(pid) - cpu
    elapsed = time.monotonic() - wall
    busy = max(0.0, used - idle_per_s * elapsed)
    per_event = busy / events * 1e6
    print(
        f"{label}: {events} events in {elapsed:.1f} s; CPU {used:.2f} s "
        f"(idle share {idle_per_s * elapsed:.2f} s): {per_event:,.0f} us per event "
        f"({used / events * 1e6:,.0f} us idle included)"
    )
    return per_event


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", choices=["tansu", "apache"], default="tansu")
    parser.add_argument("--bootstrap", help="use this Kafka instead of starting one")
    parser.add_argument("--keys", type=int, default=20, help="runs, models, rated runs")
    parser.add_argument("--rate-per-key", type=float, default=10.0, help="events/s per key")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--idle-seconds", type=float, default=15.0)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument(
        "--loads", default="metrics,outcomes,ratings", help="which loads, comma-separated"
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the plain confluent-kafka loop"
    )
    add_worker_setting_option(parser)
    args = parser.parse_args()
    loads = [
        load
        for load in (
            Load("metrics", Topic.METRICS, publish_metrics),
            Load("outcomes", Topic.LLM_OUTCOMES, publish_outcomes),
            Load("ratings", Topic.RATINGS, publish_ratings),
        )
        if load.name in args.loads.split(",")
    ]
    rate = args.keys * args.rate_per_key

    with broker(args.broker, args.bootstrap) as (bootstrap, embedded):
        settings = fresh_settings(bootstrap, embedded, args.partitions, "cpu")
        prefix = settings.kafka.topic_prefix
        print(
            f"broker: {args.bootstrap or args.broker} at {bootstrap}; {args.keys} keys x "
            f"{args.rate_per_key:g} events/s = {rate:g} events/s for {args.seconds:g} s each"
        )
        with running_worker(settings, **worker_settings(args)) as worker:
            pid = worker.pid
            assert pid is not None
            time.sleep(5.0)  # past the first commits and timers after readiness
            before = cpu_seconds(pid)
            time.sleep(args.idle_seconds)
            idle_per_s = (cpu_seconds(pid) - before) / args.idle_seconds
            print(f"worker idle: {idle_per_s * 1e3:.1f} ms of CPU per second")
            group = f"bench-{prefix}"  # the worker's app id (harness.running_worker)
            results = {}
            for load in loads:
                source = topic_name(load.topic, prefix)
                results[load.name] = measure(
                    f"fragrance-ops worker, {load.name}",
                    pid,
                    idle_per_s,
                    lambda load=load: load.publish(
                        settings, args.keys, args.rate_per_key, args.seconds
                    ),
                    lambda source=source: committed_all(settings, group, source, 300),
                )

        if args.no_baseline:
            return 0
        # The baseline, on the same metrics input, in a process of its own.
        plain_settings = fresh_settings(bootstrap, embedded, args.partitions, "cpuplain")
        plain_prefix = plain_settings.kafka.topic_prefix
        expected = int(rate * args.seconds)
        spawn = multiprocessing.get_context("spawn")
        report = spawn.Queue()
        plain = spawn.Process(
            target=plain_loop,
            args=(
                bootstrap,
                topic_name(Topic.METRICS, plain_prefix),
                topic_name(Topic.REWARD_STATS, plain_prefix),
                expected,
                args.idle_seconds,
                report,
            ),
        )
        plain.start()
        plain_idle = report.get(timeout=120)
        publish_metrics(plain_settings, args.keys, args.rate_per_key, args.seconds)
        used, elapsed = report.get(timeout=120)
        plain.join(30)
        plain_us = max(0.0, used - plain_idle * elapsed) / expected * 1e6
        print(f"plain confluent-kafka loop, metrics: {plain_us:,.0f} us per event")
        print(
            "summary (us of CPU per event): "
            + ", ".join(f"{name} {value:,.0f}" for name, value in results.items())
            + f"; plain loop metrics {plain_us:,.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
