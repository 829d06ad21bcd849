"""Signed commands end to end: a worker with a signing key, trainers that require signatures."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import cast

import orjson
import pytest
from pydantic import SecretStr

from config.settings import SecuritySettings, Settings
from fragrance_ops.worker_process import WorkerProcess
from producers import TrainerClient
from schemas import Command, SetEntropyCoef, Topic, topic_name
from schemas.signing import SIGNATURE_HEADER, verify
from tests.helpers.kafka import consume_until

pytestmark = pytest.mark.integration

KEY = "integration-signing-key-0123456789"


def requiring(settings: Settings, key: str) -> Settings:
    security = SecuritySettings(command_signing_key=SecretStr(key), require_signed_commands=True)
    return settings.model_copy(update={"security": security})


def test_the_worker_signs_commands_and_the_sdk_applies_only_verified_ones(
    make_worker: Callable[..., WorkerProcess],
    ops_settings: Settings,
    kafka_bootstrap: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    applied: list[float] = []

    def set_entropy(command: Command) -> None:
        assert isinstance(command, SetEntropyCoef)
        applied.append(command.entropy_coef)

    with make_worker(SECURITY__COMMAND_SIGNING_KEY=KEY):
        trusted = TrainerClient("signed-run", settings=requiring(ops_settings, KEY))
        stranger = TrainerClient("other-run", settings=requiring(ops_settings, "a-different-key!"))
        for client in (trusted, stranger):
            client.on_command("set_entropy_coef", set_entropy)
            client.announce({})
        deadline = time.monotonic() + 30
        step = 0
        caplog.set_level(logging.WARNING, logger="producers.trainer")
        while time.monotonic() < deadline and not (applied and "invalid signature" in caplog.text):
            for client in (trusted, stranger):
                client.log_step(step, loss=1.0, reward=1.0)
            step += 1
            time.sleep(0.05)
        for client in (trusted, stranger):
            client.flush()
        prefix = ops_settings.kafka.topic_prefix
        acks = consume_until(
            kafka_bootstrap, topic_name(Topic.ACKS, prefix), lambda got: len(got) >= 2, 30
        )
        commands = consume_until(
            kafka_bootstrap, topic_name(Topic.COMMANDS, prefix), lambda got: len(got) >= 2, 10
        )
        for client in (trusted, stranger):
            client.close()
    assert applied == [pytest.approx(0.01)]  # the schedule's start value, for the trusted run
    by_run = {(ack := orjson.loads(m.value() or b""))["run_id"]: ack for m in acks}
    assert (by_run["signed-run"]["status"], by_run["signed-run"]["command_type"]) == (
        "applied",
        "set_entropy_coef",
    )
    assert (by_run["other-run"]["status"], by_run["other-run"]["detail"]) == (
        "rejected",
        "invalid signature",
    )
    for message in commands:  # what is on the topic verifies with the worker's key
        headers = cast(list[tuple[str, bytes | None]], message.headers() or [])
        assert [name for name, _ in headers] == [SIGNATURE_HEADER]
        verify(
            KEY.encode(),
            Topic.COMMANDS.value,
            message.key() or b"",
            message.value() or b"",
            headers,
        )
