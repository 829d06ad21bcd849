"""Scenario 8 (trainer side): a trainer killed between receiving a rollback and acking it.

The test plays the worker: it sends one rollback to a real trainer process, which dies at a
chosen point inside the command's handling (SIGKILL, no shutdown hooks), and restarts it.
Whatever the point, the rollback's effect survives exactly once: the restarted trainer
resumes from the restored checkpoint, and the command id reaches the durable applied log once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from config.settings import Settings
from fragrance_ops.admin import create_contract_topics
from producers import KafkaTransport
from schemas import Rollback, Topic, encode, topic_name
from tests.helpers.kafka import consume_until
from tests.test_faults.support import FIGURES, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.integration]

ROLLBACK_TO = 10


def start(
    directory: Path, run_id: str, env: dict[str, str], steps: int, *extra: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.test_faults.crash_trainer",
            "--dir",
            str(directory),
            "--run-id",
            run_id,
            "--steps",
            str(steps),
            *extra,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("kill_at", ["after_apply", "after_log"])
def test_a_trainer_killed_inside_a_rollback_applies_it_once_after_restart(
    kill_at: str, ops_settings: Settings, kafka_bootstrap: str, tmp_path: Path
) -> None:
    prefix = ops_settings.kafka.topic_prefix
    create_contract_topics(ops_settings.kafka)
    run_id = f"crash-{kill_at}"
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "FRAGRANCE_OPS_KAFKA__TOPIC_PREFIX": prefix,
        "FRAGRANCE_OPS_CHECKPOINTS__INTERVAL_STEPS": "5",
    }
    checkpoints = tmp_path / "checkpoints"
    first = start(tmp_path, run_id, env, 2000, "--kill-at", kill_at)  # dies long before
    wait_for(lambda: (checkpoints / "step-000000015.pt").exists(), 60, "checkpoint 15")
    command = Rollback(
        command_id=f"rb-{kill_at}",
        run_id=run_id,
        issued_at=time.time(),
        checkpoint_step=ROLLBACK_TO,
        checkpoint_uri=(checkpoints / f"step-{ROLLBACK_TO:09d}.pt").resolve().as_uri(),
        anomaly_step=14,
        reason="loss spike (injected)",
    )
    worker_side = KafkaTransport(ops_settings)  # keys partitioned as the worker's are
    worker_side.produce(topic_name(Topic.COMMANDS, prefix), run_id.encode(), encode(command))
    assert worker_side.close(30) == 0
    first.communicate(timeout=60)
    assert first.returncode == -9, "the trainer was to die inside the command"
    second = start(tmp_path, run_id, env, 30, "--resume")
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    summary = orjson.loads(out.strip().splitlines()[-1])
    applications = (tmp_path / "applications.log").read_text().splitlines()
    logged = [
        line
        for line in (checkpoints / "applied-commands.log").read_text().splitlines()
        if line.startswith(command.command_id)
    ]
    acks = consume_until(
        kafka_bootstrap,
        topic_name(Topic.ACKS, prefix),
        lambda got: any(command.command_id.encode() in (m.value() or b"") for m in got),
        30,
    )
    statuses = [
        orjson.loads(m.value())["detail"]
        for m in acks
        if command.command_id.encode() in (m.value() or b"")
    ]
    # The restarted trainer resumed from the restored checkpoint: the abandoned one is gone.
    assert summary["resumed"] == ROLLBACK_TO
    assert summary["step"] == 30
    assert logged == [f"{command.command_id} applied"]  # once in the durable log
    if kill_at == "after_apply":
        # Died before the id was logged: the effect died with the process, so the restarted
        # trainer applies the redelivered command, once.
        assert len(applications) == 2
        assert statuses == ["rollback applied"]
    else:
        # Died after logging: redelivered, acknowledged again, not applied again.
        assert len(applications) == 1
        assert statuses == ["rollback already handled"]
    FIGURES.add("8. trainer killed inside a rollback", "kills", 1)
    FIGURES.add("8. trainer killed inside a rollback", "duplicate applications", 0)
