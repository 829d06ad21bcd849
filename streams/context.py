"""What every agent is given: settings, topic names, and its boundaries with the world.

An agent reaches the world only through the narrow protocols held here: where outputs go
(``Output``), where bad input goes (``DeadLetters``), the clock (``clock``), which
partitions this worker owns (``Assignment``) and how it asks for a prompt checkpoint
(``CheckpointRequests``); its state stores it is handed when made (``streams.state.OpenStore``).
The worker fills them with Kafka and Faust (``streams.app``); a unit test fills them with
in-memory ones and drives an agent with in-memory records, no broker, no Faust app.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from faust.types import TP

from config.settings import Settings, run_overrides
from schemas import CommandBase, Event, Topic, encode, topic_name
from schemas.signing import signature_header
from streams.dead_letter import DeadLetters
from streams.metrics import WorkerMetrics
from streams.output import Headers, Output, OutputDeliveryError
from streams.runtime import InputRecord

if TYPE_CHECKING:
    from streams.state import StateSink


class Assignment(Protocol):
    """The input partitions this worker owns, as its consumer group assigned them."""

    @property
    def rebalancing(self) -> bool:
        """Partitions are moving: ownership is unknown, tables may be mid-recovery."""
        ...

    def assigned_actives(self) -> AbstractSet[TP]:
        """The partitions this worker actively owns (standbys aside)."""
        ...


class CheckpointRequests(Protocol):
    """How an agent asks for its state to be checkpointed soon (``AgentRuntime``)."""

    def checkpoint_soon(self) -> None:
        """Checkpoint once the running batch or tick is over: a decision read the clock."""
        ...


@dataclass
class RunSettingsCache:
    """Effective settings per run: defaults plus the run's overrides from ``trainer.runs``."""

    defaults: Settings
    _by_overrides: dict[bytes, Settings] = field(default_factory=dict)

    def resolve(self, overrides: dict[str, Any] | None) -> Settings:
        if not overrides:
            return self.defaults
        cache_key = orjson.dumps(overrides, option=orjson.OPT_SORT_KEYS)
        settings = self._by_overrides.get(cache_key)
        if settings is None:
            settings = run_overrides(self.defaults, overrides)
            self._by_overrides[cache_key] = settings
        return settings


class RunStateHolder(Protocol):
    """An agent that keeps state of a run besides the training agent's (the feedback
    agent's rating window), dropped with it when a finished run is (``rules.run_lifecycle``).
    Both are called at a checkpoint, every agent held."""

    def run_quiet(self, run_id: str, since: float) -> bool:
        """Whether none of the run's input was applied here after ``since``."""
        ...

    def drop_run(self, run_id: str, writer: StateSink) -> bool:
        """Drop the run's state (tombstones); whether there was any."""
        ...


@dataclass
class ProcessorContext:
    """Shared by the worker's agents; every boundary a protocol (see the module doc)."""

    settings: Settings
    output: Output
    dead_letters: DeadLetters
    run_settings: RunSettingsCache
    metrics: WorkerMetrics
    checkpoints: CheckpointRequests
    assignment: Assignment
    # The worker's clock (Unix seconds): the one time source decisions read.
    clock: Callable[[], float] = time.time
    # run id -> the hyperparameters its latest metric reported (the training agent writes,
    # the feedback agent reads; both own the run's partition).
    hyperparameters: dict[str, dict[str, float]] = field(default_factory=dict)
    # The other agents keeping per-run state, dropped with a finished run's.
    run_state: list[RunStateHolder] = field(default_factory=list)
    # security.command_signing_key as bytes; None: commands go out unsigned.
    signing_key: bytes | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        key = self.settings.security.command_signing_key
        self.signing_key = key.get_secret_value().encode() if key is not None else None

    def topic(self, topic: Topic) -> str:
        return topic_name(topic, self.settings.kafka.topic_prefix)

    async def forward(self, event: Event) -> None:
        """Send an output event, keyed per contract; commands signed when a key is set."""
        key, value = event.key().encode(), encode(event)
        headers: Headers | None = None
        if isinstance(event, CommandBase):
            self.metrics.commands.labels(event.type).inc()  # type: ignore[attr-defined]
            if self.signing_key is not None:
                # Signed over the contract topic name, not the prefixed one (schemas/signing.py).
                headers = [signature_header(self.signing_key, event.TOPIC.value, key, value)]
        await self.output.send(self.topic(event.TOPIC), key, value, headers)

    async def apply_each(
        self, records: Sequence[InputRecord], apply: Callable[[InputRecord], Awaitable[None]]
    ) -> None:
        """``apply`` each record in order; bad input is dead-lettered and the batch goes on.

        An output that could not be sent is not bad input: the rule's state already implies
        it, so the batch fails (and the worker restarts from its last checkpoint)."""
        for record in records:
            try:
                await apply(record)
            except OutputDeliveryError:
                raise
            except Exception as exc:  # bad input, or a value no rule can express
                await self.dead_letters.send(record, exc)

    def forget_partitions(self) -> None:
        """On a rebalance: what was learnt from partitions this worker may no longer own."""
        self.hyperparameters.clear()  # the runs' next metrics refill it

    def now(self) -> float:
        """The worker's clock: the one trusted time source for decisions."""
        return self.clock()
