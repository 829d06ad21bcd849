"""What the LLM SDK's tests share: a clock they set, control events, published outcomes."""

from __future__ import annotations

import orjson

from producers import InMemoryTransport
from schemas import LlmControl, Topic, encode
from schemas.events import BreakerState, LlmMode

MODEL = "qwen-fragrance"


class Clock:
    """A replica's clock that moves only when a test sets ``now``."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def control(
    state: BreakerState,
    mode: LlmMode,
    epoch: int,
    ttl: float = 300.0,
    probe_mode: LlmMode | None = None,
) -> bytes:
    """An encoded ``llm.control`` event for ``MODEL`` (a hold or round ends at 2,000)."""
    return encode(
        LlmControl(
            model=MODEL,
            state=state,
            mode=mode,
            cache_ttl_s=ttl,
            until=None if state == "closed" else 2_000.0,
            reason="test",
            ts=1.0,
            epoch=epoch,
            probe_mode=probe_mode,
            probe_calls=3 if probe_mode else None,
        )
    )


def outcomes(transport: InMemoryTransport) -> list[dict[str, object]]:
    """The ``llm.outcomes`` events published so far, decoded, in order."""
    return [orjson.loads(record.value) for record in transport.records(Topic.LLM_OUTCOMES)]
