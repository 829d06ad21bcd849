"""The demo: a worker and simulated trainers talking only through Kafka.

Every line it prints about normalization comes from a real ``trainer.reward-stats`` event
that the worker produced.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
import uuid
from pathlib import Path

import orjson
import typer
from confluent_kafka import OFFSET_END, Consumer, TopicPartition

from fragrance_ops.admin import create_contract_topics
from fragrance_ops.kafka import confluent_config
from fragrance_ops.settings import Settings
from fragrance_ops.worker_process import WorkerProcess, worker_env
from producers import TrainerClient
from schemas import Topic, topic_name

PRINT_EVERY_STEPS = 250


def simulated_reward(step: int, rng: random.Random, offset: float) -> float:
    """A PPO-like learning curve: rising, noisy, with the occasional outlier."""
    reward = offset + 5.0 * (1.0 - math.exp(-step / 800.0)) + rng.gauss(0.0, 0.6)
    return reward + (rng.choice([-6.0, 6.0]) if rng.random() < 0.01 else 0.0)


def _stats_consumer(settings: Settings) -> Consumer:
    topic = topic_name(Topic.REWARD_STATS, settings.kafka.topic_prefix)
    consumer = Consumer(
        {
            **confluent_config(settings.kafka),
            "group.id": f"fragrance-ops-demo-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_END) for p in partitions])
    return consumer


def run_demo(settings: Settings, *, steps: int, runs: int, seed: int) -> int:
    """Run the demo; returns the exit status (0 when every step was normalized)."""
    create_contract_topics(settings.kafka)
    workdir = Path(tempfile.mkdtemp(prefix="fragrance-ops-demo-"))
    env = worker_env(
        KAFKA__BOOTSTRAP_SERVERS=settings.kafka.bootstrap_servers or "",
        KAFKA__EMBEDDED_BROKER=str(settings.kafka.embedded_broker).lower(),
        KAFKA__TOPIC_PREFIX=settings.kafka.topic_prefix,
        WORKER__DATA_DIR=str(workdir / "worker"),
    )
    worker = WorkerProcess(env, workdir / "worker.log")
    typer.echo("starting the worker ...")
    worker.start()
    consumer = _stats_consumer(settings)
    rng = random.Random(seed)
    run_ids = [f"demo-{seed}-{i}-{uuid.uuid4().hex[:6]}" for i in range(runs)]
    clients = [
        TrainerClient(run_id, settings=settings, receive_commands=False) for run_id in run_ids
    ]
    latest: dict[str, dict[str, float]] = {}
    seen = 0
    started = time.monotonic()
    try:
        for client in clients:
            client.announce({})
        typer.echo(f"training {runs} simulated runs for {steps} steps each ...")
        for step in range(steps):
            for index, client in enumerate(clients):
                reward = simulated_reward(step, rng, offset=2.0 * index)
                client.log_step(step, loss=1.0 / (1.0 + step / 100.0), reward=reward)
            seen += _drain(consumer, set(run_ids), latest, timeout_s=0.0)
        for client in clients:
            client.flush()
        deadline = time.monotonic() + 60.0
        while seen < steps * runs and time.monotonic() < deadline:
            seen += _drain(consumer, set(run_ids), latest, timeout_s=0.5)
    finally:
        for client in clients:
            client.close()
        consumer.close()
        worker.stop()
    elapsed = time.monotonic() - started
    typer.echo(
        f"\n{seen} of {steps * runs} metrics normalized by the worker in {elapsed:.1f}s "
        f"(window {settings.reward.window_size})"
    )
    for run_id, stats in sorted(latest.items()):
        typer.echo(
            f"  {run_id}: last step {int(stats['step'])}, reward mean {stats['mean']:.3f}, "
            f"std {stats['std']:.3f}"
        )
    return 0 if seen >= steps * runs else 1


def _drain(
    consumer: Consumer, run_ids: set[str], latest: dict[str, dict[str, float]], timeout_s: float
) -> int:
    """Read available reward-stats; print every PRINT_EVERY_STEPS-th step of each run."""
    received = 0
    for message in consumer.consume(10_000, timeout=timeout_s):
        if message.error() is not None:
            continue
        stats = orjson.loads(message.value() or b"{}")
        if stats.get("run_id") not in run_ids:
            continue
        received += 1
        latest[stats["run_id"]] = stats
        if stats["step"] % PRINT_EVERY_STEPS == 0:
            typer.echo(
                f"{stats['run_id']}  step {stats['step']:>6}  reward {stats['reward']:8.3f}  "
                f"normalized {stats['normalized_reward']:+7.3f}  "
                f"mean {stats['mean']:7.3f}  std {stats['std']:6.3f}  n={stats['count']}"
            )
    return received
