"""Per-record error routing in a batch: bad input is dead-lettered, a lost output is not."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from schemas import InvalidEvent
from streams.context import ProcessorContext
from streams.output import OutputDeliveryError


@dataclass
class Record:
    topic: str = "t"
    partition: int = 0
    offset: int = 0


@dataclass
class DeadLetters:
    sent: list[tuple[int, str]] = field(default_factory=list)

    async def send(self, record: Record, exc: BaseException) -> None:
        self.sent.append((record.offset, type(exc).__name__))


def test_bad_input_is_dead_lettered_and_the_batch_goes_on() -> None:
    dead_letters, applied = DeadLetters(), []

    async def apply(record: Any) -> None:
        if record.offset == 1:
            raise InvalidEvent("bad")
        applied.append(record.offset)

    context: Any = SimpleNamespace(dead_letters=dead_letters)
    asyncio.run(ProcessorContext.apply_each(context, [Record(offset=n) for n in range(3)], apply))
    assert applied == [0, 2]
    assert dead_letters.sent == [(1, "InvalidEvent")]


def test_an_output_that_could_not_be_sent_fails_the_batch() -> None:
    # The rule's state already implies the output: dead-lettering the input and going on
    # would checkpoint a decision nobody received.
    dead_letters = DeadLetters()

    async def apply(record: Any) -> None:
        raise OutputDeliveryError("output queue full for 30 s")

    context: Any = SimpleNamespace(dead_letters=dead_letters)
    with pytest.raises(OutputDeliveryError):
        asyncio.run(ProcessorContext.apply_each(context, [Record()], apply))
    assert dead_letters.sent == []
