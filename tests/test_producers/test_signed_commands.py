"""Signed commands in the trainer SDK (security.require_signed_commands), without a broker."""

from __future__ import annotations

import logging

import orjson
import pytest
from pydantic import SecretStr, ValidationError

from config.settings import SecuritySettings, Settings
from producers import InMemoryTransport, TrainerClient
from producers.transport import RecordHeaders
from schemas import Command, SetEntropyCoef, Topic, encode
from schemas.signing import INVALID, UNSIGNED, signature_header

KEY = "a-shared-command-signing-key-0123"


def settings(*, key: str | None = KEY, required: bool = True) -> Settings:
    return Settings(
        security=SecuritySettings(
            command_signing_key=SecretStr(key) if key is not None else None,
            require_signed_commands=required,
        )
    )


def entropy_command(command_id: str, value: float = 0.005) -> bytes:
    return encode(
        SetEntropyCoef(
            command_id=command_id, run_id="run-1", issued_at=1.0, entropy_coef=value, step=10
        )
    )


def signed(value: bytes, key: str = KEY, record_key: bytes = b"run-1") -> RecordHeaders:
    return (signature_header(key.encode(), Topic.COMMANDS.value, record_key, value),)


class Trainer:
    """A TrainerClient on an in-memory transport, recording what its handler applied."""

    def __init__(self, config: Settings) -> None:
        self.transport = InMemoryTransport()
        self.applied: list[float] = []
        self.client = TrainerClient("run-1", settings=config, transport=self.transport)
        self.client.on_command("set_entropy_coef", self._apply)

    def _apply(self, command: Command) -> None:
        assert isinstance(command, SetEntropyCoef)
        self.applied.append(command.entropy_coef)

    def deliver(self, value: bytes, headers: RecordHeaders = ()) -> int:
        self.transport.deliver(Topic.COMMANDS, b"run-1", value, headers)
        return self.client.poll_commands()

    def acks(self) -> list[tuple[str, str, str]]:
        return [
            (ack["command_id"], ack["status"], ack["detail"])
            for ack in (orjson.loads(r.value) for r in self.transport.records(Topic.ACKS))
        ]


@pytest.fixture
def trainer() -> Trainer:
    return Trainer(settings())


def test_a_signed_command_is_applied(trainer: Trainer) -> None:
    command = entropy_command("c-1")
    assert trainer.deliver(command, signed(command)) == 1
    assert trainer.applied == [0.005]
    assert trainer.acks() == [("c-1", "applied", "set_entropy_coef applied")]


def test_an_unsigned_command_is_rejected_with_the_reason(
    trainer: Trainer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="producers.trainer"):
        assert trainer.deliver(entropy_command("c-1")) == 0
    assert trainer.applied == []
    assert trainer.acks() == [("c-1", "rejected", UNSIGNED)]
    assert "unsigned command" in caplog.text


def test_a_tampered_value_is_rejected(trainer: Trainer) -> None:
    genuine = entropy_command("c-1", value=0.005)
    tampered = entropy_command("c-1", value=0.5)
    trainer.deliver(tampered, signed(genuine))
    assert trainer.applied == []
    assert trainer.acks() == [("c-1", "rejected", INVALID)]


def test_a_signature_for_another_run_key_is_rejected(trainer: Trainer) -> None:
    command = entropy_command("c-1")
    trainer.deliver(command, signed(command, record_key=b"run-2"))
    assert trainer.acks() == [("c-1", "rejected", INVALID)]


def test_a_command_signed_with_another_key_is_rejected(trainer: Trainer) -> None:
    command = entropy_command("c-1")
    trainer.deliver(command, signed(command, key="not-the-shared-key-but-long"))
    assert trainer.applied == []
    assert trainer.acks() == [("c-1", "rejected", INVALID)]


def test_a_forged_command_does_not_block_the_genuine_one_with_its_id(trainer: Trainer) -> None:
    forged = entropy_command("c-1", value=0.5)
    genuine = entropy_command("c-1", value=0.005)
    trainer.deliver(forged, signed(forged, key="an-attackers-guess-at-the-key"))
    trainer.deliver(genuine, signed(genuine))
    trainer.deliver(genuine, signed(genuine))  # a genuine duplicate is still deduplicated
    assert trainer.applied == [0.005]
    assert trainer.acks() == [
        ("c-1", "rejected", INVALID),
        ("c-1", "applied", "set_entropy_coef applied"),
        ("c-1", "applied", "set_entropy_coef already handled"),
    ]
    assert trainer.client.applied.status("c-1") == "applied"


def test_an_undecodable_unsigned_record_is_skipped_without_an_ack(trainer: Trainer) -> None:
    assert trainer.deliver(b'{"type": "set_entropy_coef"}') == 0
    assert trainer.deliver(b"not json") == 0
    assert trainer.acks() == []
    command = entropy_command("c-1")
    assert trainer.deliver(command, signed(command)) == 1  # the reader moved on


@pytest.mark.parametrize(
    "config",
    [settings(key=None, required=False), settings(required=False)],
    ids=["no-key", "key-not-required"],
)
def test_without_required_signatures_unsigned_commands_are_applied(config: Settings) -> None:
    trainer = Trainer(config)
    trainer.deliver(entropy_command("c-1"))
    command = entropy_command("c-2", value=0.004)
    trainer.deliver(command, signed(command, key="some-other-key-entirely"))
    assert trainer.applied == [0.005, 0.004]


def test_requiring_signatures_needs_a_key_of_16_characters_or_more() -> None:
    with pytest.raises(ValidationError, match="needs command_signing_key"):
        SecuritySettings(require_signed_commands=True)
    with pytest.raises(ValidationError, match="at least 16") as raised:
        SecuritySettings(command_signing_key=SecretStr("short-secret"))
    assert "short-secret" not in str(raised.value)


def test_signing_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRAGRANCE_OPS_SECURITY__COMMAND_SIGNING_KEY", KEY)
    monkeypatch.setenv("FRAGRANCE_OPS_SECURITY__REQUIRE_SIGNED_COMMANDS", "true")
    security = Settings().security
    assert security.command_signing_key is not None
    assert security.command_signing_key.get_secret_value() == KEY
    assert security.require_signed_commands
    assert KEY not in repr(Settings())
    monkeypatch.setenv("FRAGRANCE_OPS_SECURITY__COMMAND_SIGNING_KEY", "too-short")
    with pytest.raises(ValidationError, match="command_signing_key") as raised:
        Settings()
    assert "too-short" not in str(raised.value)
