"""A trainer in another language: Node.js with kafkajs, coded from the contract alone.

kafkajs with its defaults reads uncompressed and gzip batches only; the worker's commands
(uncompressed, the default) and reward statistics (gzip here, the setting for a thin link:
``worker.output_topic_compression``) must reach it, and its records,
partitioned by kafkajs's default partitioner, must land where the worker and the Python SDK
put the run's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from config.settings import Settings
from fragrance_ops.worker_process import WorkerProcess
from producers.partitioning import partition_for_key
from schemas import Topic, topic_name
from tests.helpers.kafka import consume_until
from tests.test_streams.conftest import TEST_PARTITIONS

pytestmark = pytest.mark.integration

TRAINER_SOURCE = Path(__file__).parent / "node_trainer"
RUN_ID = "node-run"
SPIKE_STEP = 130


@pytest.fixture(scope="session")
def node_trainer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trainer's directory with kafkajs installed by npm ci (the version and integrity
    package-lock pins; from npm's cache when it has them, else from the registry)."""
    npm = shutil.which("npm")
    if shutil.which("node") is None or npm is None:
        pytest.skip("node and npm are needed for the kafkajs trainer (.ci/run installs them)")
    directory = tmp_path_factory.mktemp("node-trainer")
    for name in ("package.json", "package-lock.json", "trainer.js"):
        shutil.copy(TRAINER_SOURCE / name, directory / name)
    installed = subprocess.run(
        [npm, "ci", "--prefer-offline", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert installed.returncode == 0, f"npm ci failed: {installed.stderr}"
    return directory


def decoded(messages: list[Any]) -> list[dict[str, Any]]:
    return [orjson.loads(message.value()) for message in messages]


def test_a_kafkajs_trainer_receives_its_rollback_and_acknowledges_it(
    make_worker: Callable[..., WorkerProcess],
    ops_settings: Settings,
    kafka_bootstrap: str,
    node_trainer: Path,
) -> None:
    prefix = ops_settings.kafka.topic_prefix
    env = {
        **os.environ,
        "BOOTSTRAP": kafka_bootstrap,
        "TOPIC_PREFIX": prefix,
        "RUN_ID": RUN_ID,
        "INTERVAL": "50",
        "SPIKE_STEP": str(SPIKE_STEP),
        "KAFKAJS_NO_PARTITIONER_WARNING": "1",
    }
    with make_worker(WORKER__OUTPUT_TOPIC_COMPRESSION='{"trainer.reward-stats": "gzip"}'):
        trainer = subprocess.run(
            ["node", "trainer.js"],
            cwd=node_trainer,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert trainer.returncode == 0, trainer.stderr
        lines = trainer.stdout.strip().splitlines()
        assert lines, f"the trainer printed no report: {trainer.stderr}"
        report = orjson.loads(lines[-1])
        acks = consume_until(
            kafka_bootstrap,
            topic_name(Topic.ACKS, prefix),
            lambda got: any(b'"rollback"' in (m.value() or b"") for m in got),
            30,
        )
        metrics = consume_until(
            kafka_bootstrap, topic_name(Topic.METRICS, prefix), lambda got: len(got) > 200, 30
        )
        commands = consume_until(
            kafka_bootstrap, topic_name(Topic.COMMANDS, prefix), lambda got: len(got) >= 1, 30
        )

    received = report["received"]
    rollbacks = [command for command in received if command["type"] == "rollback"]
    assert len(rollbacks) == 1, received
    assert rollbacks[0]["checkpoint_step"] == 100
    assert rollbacks[0]["anomaly_step"] == SPIKE_STEP
    assert report["restoredAt"] == 100
    assert report["attempt"] == 1
    assert [c["type"] for c in received].count("set_entropy_coef") >= 2  # start and resume

    # Reward statistics (gzip) reach it too: the window after its newest steps.
    assert report["rewardStatsRead"] > 200
    assert report["rewardStats"]["run_id"] == RUN_ID
    assert report["rewardStats"]["count"] > 200

    rollback_acks = [a for a in decoded(acks) if a["command_id"] == rollbacks[0]["command_id"]]
    assert [ack["status"] for ack in rollback_acks] == ["applied"]
    assert rollback_acks[0]["after"] == {"step": 100, "attempt": 1}
    # Every command the worker wrote was read: none is missing from what kafkajs received.
    ours = [c for c in decoded(commands) if c["run_id"] == RUN_ID]
    assert {c["command_id"] for c in ours} <= {c["command_id"] for c in received}

    # kafkajs's default partitioner agrees with Java's murmur2, the worker's and the SDK's.
    expected = partition_for_key(RUN_ID.encode(), TEST_PARTITIONS)
    for message in [*metrics, *acks, *commands]:
        assert message.partition() == expected, message.topic()
