"""The worker signs the commands it forwards, and only those (no broker: a recording output)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from pydantic import SecretStr

from config.settings import KafkaSettings, SecuritySettings, Settings
from schemas import Event, RewardStats, SetEntropyCoef
from schemas.signing import SIGNATURE_HEADER, verify
from streams.context import ProcessorContext, RunSettingsCache
from streams.metrics import WorkerMetrics
from streams.output import Headers

KEY = "worker-signing-key-0123456789"


class RecordingOutput:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes, Headers | None]] = []

    async def send(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers | None = None
    ) -> None:
        self.sent.append((topic, key, value, headers))


def forwarded(
    key: str | None, *events: Event
) -> list[tuple[str, bytes | None, bytes, Headers | None]]:
    settings = Settings(
        kafka=KafkaSettings(topic_prefix="prod."),
        security=SecuritySettings(command_signing_key=SecretStr(key) if key is not None else None),
    )
    output = RecordingOutput()
    context = ProcessorContext(
        settings=settings,
        output=output,
        dead_letters=cast(Any, None),
        run_settings=RunSettingsCache(settings),
        metrics=WorkerMetrics(),
        checkpoints=cast(Any, None),
        assignment=cast(Any, None),
    )

    async def forward_all() -> None:
        for event in events:
            await context.forward(event)

    asyncio.run(forward_all())
    return output.sent


COMMAND = SetEntropyCoef(command_id="c-1", run_id="run-1", issued_at=1.0, entropy_coef=0.01, step=0)
STATS = RewardStats(
    run_id="run-1", step=0, reward=1.0, normalized_reward=0.0, mean=1.0, std=0.0, count=1, ts=1.0
)


def test_commands_carry_a_signature_over_the_contract_topic_key_and_value() -> None:
    (topic, key, value, headers), (stats_topic, _, _, stats_headers) = forwarded(
        KEY, COMMAND, STATS
    )
    assert topic == "prod.trainer.commands"
    assert headers is not None
    assert [name for name, _ in headers] == [SIGNATURE_HEADER]
    signature = headers[0][1]
    assert isinstance(signature, bytes)
    assert key is not None
    verify(KEY.encode(), "trainer.commands", key, value, [(SIGNATURE_HEADER, signature)])
    assert (stats_topic, stats_headers) == ("prod.trainer.reward-stats", None)  # not a command


def test_without_a_key_commands_go_out_unsigned() -> None:
    ((_, _, _, headers),) = forwarded(None, COMMAND)
    assert headers is None
