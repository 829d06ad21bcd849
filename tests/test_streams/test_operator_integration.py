"""Operator requests end to end: the real CLI, the broker, the worker, a trainer SDK."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from config.settings import SecuritySettings, Settings
from fragrance_ops.operator import OperatorClient
from fragrance_ops.worker_process import WorkerProcess
from producers import TrainerClient
from schemas import Command

pytestmark = pytest.mark.integration

RUN = "op-run"
SIGNING_KEY = "0123456789abcdef0123456789abcdef"


def cli(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        name: value for name, value in os.environ.items() if not name.startswith("FRAGRANCE_OPS_")
    } | {
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers or "",
        "FRAGRANCE_OPS_KAFKA__TOPIC_PREFIX": settings.kafka.topic_prefix,
    }
    return subprocess.run(
        [sys.executable, "-m", "fragrance_ops", "run", *args],
        env=environment | env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


class Trainer:
    """A run through the SDK that records the commands it is sent."""

    def __init__(self, settings: Settings) -> None:
        self.client = TrainerClient(RUN, settings=settings)
        self.received: list[Command] = []
        self.step = 0
        for kind in ("set_entropy_coef", "halt", "rollback", "prune_checkpoints"):
            self.client.on_command(kind, self.received.append)

    def train(self, steps: int, *, loss: float = 1.0) -> None:
        for _ in range(steps):
            if self.step and self.step % 50 == 0:
                self.client.checkpoint_saved(self.step, f"ckpt/{self.step}.pt")
            saved = self.step - self.step % 50 or None
            self.client.log_step(self.step, loss=loss, reward=1.0, checkpoint_step=saved)
            self.step += 1
        self.client.flush(10)

    def wait_for(self, kind: str, *, command_id: str | None = None) -> Command:
        """The first command of ``kind`` (with ``command_id``, if given) received."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self.client.poll_commands()
            for command in self.received:
                if command.type == kind and command_id in (None, command.command_id):
                    self.received.remove(command)
                    return command
            time.sleep(0.05)
        raise AssertionError(f"no {kind} {command_id or ''} within 60 s; got {self.received}")


def command_id_of(stdout: str) -> str:
    """The command id the CLI prints: ``run R: <detail> (command <id>)``."""
    return stdout.strip().rsplit("(command ", 1)[1].rstrip(")")


def test_an_operator_halts_resumes_rolls_back_and_sets_entropy_through_the_cli(
    make_worker: Callable[..., WorkerProcess], ops_settings: Settings
) -> None:
    worker_settings = {
        "CHECKPOINTS__INTERVAL_STEPS": "50",
        "CHECKPOINTS__HEALTH_LOOKBACK_STEPS": "20",
    }
    with make_worker(**worker_settings):
        trainer = Trainer(ops_settings)
        try:
            trainer.train(130)  # checkpoints at 50 and 100
            unknown = cli(ops_settings, "halt", "no-such-run", "--reason", "test")
            assert unknown.returncode == 1
            assert "refused: run no-such-run: unknown run" in unknown.stderr

            refused = cli(ops_settings, "rollback", RUN, "--step", "75", "--reason", "test")
            assert refused.returncode == 1, refused.stderr
            assert refused.stderr.strip() == (
                f"fragrance-ops: refused: run {RUN}: no kept checkpoint at step 75 (kept: 50, 100)"
            )

            entropy = cli(ops_settings, "set-entropy", RUN, "0.005", "--reason", "explore")
            assert entropy.returncode == 0, entropy.stderr
            assert entropy.stdout.startswith(f"run {RUN}: entropy coefficient 0.005 from step 129")
            sent = trainer.wait_for("set_entropy_coef", command_id=command_id_of(entropy.stdout))
            assert sent.entropy_coef == 0.005  # type: ignore[union-attr]

            halted = cli(ops_settings, "halt", RUN, "--reason", "odd curves", "--by", "alice")
            assert halted.returncode == 0, halted.stderr
            halt = trainer.wait_for("halt", command_id=command_id_of(halted.stdout))
            assert halt.reason == "operator alice: odd curves"  # type: ignore[union-attr]
            trainer.train(5, loss=math.nan)  # ignored: the run is halted
            assert cli(ops_settings, "halt", RUN, "--reason", "again").returncode == 1

            resumed = cli(ops_settings, "resume", RUN, "--reason", "fixed the loader")
            assert resumed.returncode == 0, resumed.stderr
            assert "resumed: protected again" in resumed.stdout
            trainer.train(1, loss=math.nan)  # now answered
            rollback = trainer.wait_for("rollback")
            assert rollback.checkpoint_step == 100  # type: ignore[union-attr]
            trainer.client.poll_commands()
            assert [c for c in trainer.received if c.type in ("halt", "rollback")] == []
        finally:
            trainer.client.close()


def test_unsigned_requests_are_refused_when_signing_is_required(
    make_worker: Callable[..., WorkerProcess], ops_settings: Settings
) -> None:
    signed = ops_settings.model_copy(
        update={"security": SecuritySettings(command_signing_key=SIGNING_KEY)}  # type: ignore[arg-type]
    )
    with make_worker(
        SECURITY__COMMAND_SIGNING_KEY=SIGNING_KEY, SECURITY__REQUIRE_SIGNED_REQUESTS="true"
    ):
        trainer = Trainer(signed)
        try:
            trainer.train(60)
            with OperatorClient(ops_settings, requested_by="mallory") as unsigned:
                reply = unsigned.halt(RUN, reason="no key")
            assert not reply.accepted
            assert reply.detail.startswith("signature check failed (unsigned command)")
            with OperatorClient(signed, requested_by="alice") as operator:
                reply = operator.halt(RUN, reason="with the key")
            assert reply.accepted, reply.detail
            assert reply.command_id is not None
            trainer.wait_for("halt", command_id=reply.command_id)
        finally:
            trainer.client.close()
