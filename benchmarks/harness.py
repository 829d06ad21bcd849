"""What the benchmarks share: a broker, settings, a worker process, latency summaries."""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from config.settings import KafkaSettings, Settings
from fragrance_ops.admin import create_contract_topics
from fragrance_ops.brokers import ApacheKafkaBroker, TansuBroker
from fragrance_ops.worker_process import WorkerProcess, worker_env


@contextlib.contextmanager
def broker(kind: str, bootstrap: str | None) -> Iterator[tuple[str, bool]]:
    """(bootstrap servers, embedded?): the given Kafka, or a fresh local broker."""
    if bootstrap:
        yield bootstrap, False
        return
    local = TansuBroker() if kind == "tansu" else ApacheKafkaBroker()
    local.start()
    try:
        yield local.bootstrap_servers, kind == "tansu"
    finally:
        local.stop()


def fresh_settings(
    bootstrap: str, embedded: bool, partitions: int, name: str, **groups: Any
) -> Settings:
    """Settings on topics of their own (a random prefix), created already."""
    settings = Settings(
        kafka=KafkaSettings(
            bootstrap_servers=bootstrap,
            topic_prefix=f"{name}{uuid.uuid4().hex[:6]}.",
            partitions=partitions,
            embedded_broker=embedded,
        ),
        **groups,
    )
    create_contract_topics(settings.kafka)
    return settings


@contextlib.contextmanager
def running_worker(settings: Settings, **env: str) -> Iterator[WorkerProcess]:
    """A worker process for ``settings``' topics; ``env``: more FRAGRANCE_OPS_ settings."""
    kafka = settings.kafka
    with tempfile.TemporaryDirectory() as tmp:
        worker = WorkerProcess(
            worker_env(
                KAFKA__BOOTSTRAP_SERVERS=kafka.bootstrap_servers or "",
                KAFKA__TOPIC_PREFIX=kafka.topic_prefix,
                KAFKA__PARTITIONS=str(kafka.partitions),
                KAFKA__EMBEDDED_BROKER=str(kafka.embedded_broker).lower(),
                WORKER__APP_ID=f"bench-{kafka.topic_prefix}",
                WORKER__DATA_DIR=tmp,
                METRICS__PORT="0",
                **env,
            ),
            Path(tmp) / "worker.log",
        )
        worker.start()
        try:
            yield worker
        finally:
            worker.stop()


def latency_summary(name: str, what: str, latencies: list[float]) -> tuple[float, float]:
    """Print and return p50 and p99 in milliseconds."""
    ordered = sorted(latencies)
    p50 = statistics.median(ordered) * 1e3
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3
    print(f"{name}: {len(ordered)} {what}, p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    return p50, p99


@contextlib.contextmanager
def running_service(target: Callable[..., None], *args: Any) -> Iterator[None]:
    """``target(*args, ready, stop)`` in a thread (a plain baseline service); waits until
    it sets ``ready`` (its consumer has its partitions); stopped and joined on exit."""
    ready, stop = threading.Event(), threading.Event()
    service = threading.Thread(target=target, args=(*args, ready, stop), daemon=True)
    service.start()
    if not ready.wait(120):
        raise SystemExit("the plain service got no partitions within 120 s")
    try:
        yield
    finally:
        stop.set()
        service.join()


def subscribe_then_ready(consumer: Any, topic: str, ready: threading.Event) -> None:
    """Subscribe; ``ready`` is set once the group has assigned partitions."""
    consumer.subscribe([topic], on_assign=lambda _consumer, partitions: ready.set())


def add_worker_setting_option(parser: argparse.ArgumentParser) -> None:
    """``--worker-setting NAME=VALUE`` (repeatable): settings for the benchmarked worker."""
    parser.add_argument(
        "--worker-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a worker setting, e.g. WORKER__BATCH_WITHIN_S=0.02 (repeatable)",
    )


def worker_settings(args: argparse.Namespace) -> dict[str, str]:
    """The ``--worker-setting`` values, as ``running_worker``'s keyword settings."""
    return dict(setting.split("=", 1) for setting in args.worker_setting)
