"""Fixtures for tests that run the real worker against the session's broker."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from config.settings import KafkaSettings, Settings
from fragrance_ops.worker_process import WorkerProcess, worker_env

TEST_PARTITIONS = 4


@pytest.fixture
def ops_settings(kafka_bootstrap: str, topic_prefix: str) -> Settings:
    """Settings for SDK clients in this test: the session broker, this test's topics."""
    return Settings(
        kafka=KafkaSettings(
            bootstrap_servers=kafka_bootstrap, topic_prefix=topic_prefix, partitions=TEST_PARTITIONS
        )
    )


@pytest.fixture
def make_worker(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory of worker processes sharing this test's topics and consumer group."""
    workers: list[WorkerProcess] = []

    def make(**settings: str) -> WorkerProcess:
        defaults = {
            "KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
            "KAFKA__TOPIC_PREFIX": topic_prefix,
            "WORKER__APP_ID": f"app-{topic_prefix.rstrip('.')}",
            "KAFKA__PARTITIONS": str(TEST_PARTITIONS),
            "WORKER__DATA_DIR": str(tmp_path / f"worker{len(workers)}"),
            "METRICS__PORT": "0",  # workers of parallel tests must not compete for one port
        }
        env = worker_env(**(defaults | settings))
        worker = WorkerProcess(env, tmp_path / f"worker{len(workers)}.log")
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.stop()
