"""In-memory boundaries for driving an agent without a broker or a Faust app.

Each class here is a test's side of one protocol of ``streams.context`` and
``streams.state``: ``MemoryOutput`` records what is sent, ``MemoryStores`` opens dict-backed
state stores, ``MemorySink`` writes checkpoints into them, ``Owned`` says which partitions
this worker owns, ``CheckpointLog`` counts prompt-checkpoint requests and ``Clock`` is the
worker's clock, moved by hand. Everything else is the worker's own: ``ProcessorContext``,
``DeadLetterSink``, ``WorkerMetrics``, the agents and their rules.

``Harness`` ties them together: it makes records of contract events (offsets counted per
partition, as a broker would), hands them to an agent in one batch, checkpoints it, and
makes the agent again from the stored state, as a restarted worker would.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from faust.types import TP

from config.settings import KafkaSettings, Settings
from schemas import DeadLetter, Event, Topic, decode, encode, topic_name
from streams.agents import Agent
from streams.context import ProcessorContext, RunSettingsCache
from streams.dead_letter import DeadLetterSink
from streams.metrics import WorkerMetrics
from streams.output import Headers
from streams.runtime import InputRecord
from streams.state import StateStore

PREFIX = "t."
PARTITIONS = 4

A = TypeVar("A", bound=Agent)


@dataclass(frozen=True)
class Record:
    """One consumed record; satisfies ``streams.runtime.InputRecord``."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] = ()
    timestamp: int = 0


@dataclass(frozen=True)
class Sent:
    topic: str
    key: bytes | None
    value: bytes
    headers: Headers | None


@dataclass
class MemoryOutput:
    """``Output``: keeps every record sent, in order."""

    sent: list[Sent] = field(default_factory=list)

    async def send(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers | None = None
    ) -> None:
        self.sent.append(Sent(topic, key, value, headers))

    def on(self, topic: str) -> list[Sent]:
        return [sent for sent in self.sent if sent.topic == topic]

    def values(self, topic: str) -> list[dict[str, Any]]:
        """The JSON objects sent to ``topic``."""
        return [orjson.loads(sent.value) for sent in self.on(topic)]


@dataclass
class MemoryStore:
    """``StateStore`` over a dict."""

    name: str
    data: dict[bytes, bytes] = field(default_factory=dict)

    @property
    def changelog_topic(self) -> str:
        return f"{self.name}-changelog"

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def keys(self) -> list[bytes]:
        return list(self.data)

    def mirror(self, key: bytes, value: bytes | None) -> None:
        if value is None:
            self.data.pop(key, None)
        else:
            self.data[key] = value

    def json(self, key: bytes) -> Any:
        stored = self.data[key]
        return orjson.loads(stored)


@dataclass
class MemoryStores:
    """``OpenStore``: one ``MemoryStore`` per name, kept across the agents made over it."""

    opened: dict[str, MemoryStore] = field(default_factory=dict)

    def __call__(self, name: str) -> StateStore:
        return self[name]

    def __getitem__(self, name: str) -> MemoryStore:
        return self.opened.setdefault(name, MemoryStore(name))


@dataclass
class MemorySink:
    """``StateSink``: writes go straight into the stores; each write is listed."""

    writes: list[tuple[str, bytes, bytes | None, int]] = field(default_factory=list)

    def put(self, table: StateStore, key: bytes, value: bytes, partition: int) -> None:
        self.writes.append((table.name, key, value, partition))
        table.mirror(key, value)

    def delete(self, table: StateStore, key: bytes, partition: int) -> None:
        self.writes.append((table.name, key, None, partition))
        table.mirror(key, None)


@dataclass
class Owned:
    """``Assignment``: a fixed set of partitions, no rebalance in progress."""

    actives: set[TP] = field(default_factory=set)
    rebalancing: bool = False

    def assigned_actives(self) -> AbstractSet[TP]:
        return self.actives


@dataclass
class CheckpointLog:
    """``CheckpointRequests``: how many times a prompt checkpoint was asked for."""

    requested: int = 0

    def checkpoint_soon(self) -> None:
        self.requested += 1


@dataclass
class Clock:
    """The worker's clock, moved by the test."""

    now: float = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_settings(**groups: Any) -> Settings:
    return Settings(kafka=KafkaSettings(topic_prefix=PREFIX, partitions=PARTITIONS), **groups)


class Harness:
    """One worker's boundaries in memory, and the records fed to its agents."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings if settings is not None else make_settings()
        self.output = MemoryOutput()
        self.stores = MemoryStores()
        self.sink = MemorySink()
        self.owned = Owned()
        self.checkpoints = CheckpointLog()
        self.clock = Clock()
        self.metrics = WorkerMetrics()
        self.metrics.start_at_zero([], [])  # as a worker exporting its metrics does
        self.dead_letter_topic = self.topic(Topic.DEAD_LETTER)
        self.ctx = self.context()
        self._offsets: Counter[tuple[str, int]] = Counter()

    def context(self) -> ProcessorContext:
        """A fresh context over the same boundaries (a restarted worker's)."""
        return ProcessorContext(
            settings=self.settings,
            output=self.output,
            dead_letters=DeadLetterSink(self.output, self.dead_letter_topic, self.metrics),
            run_settings=RunSettingsCache(self.settings),
            metrics=self.metrics,
            checkpoints=self.checkpoints,
            assignment=self.owned,
            clock=self.clock,
        )

    def topic(self, topic: Topic) -> str:
        return topic_name(topic, PREFIX)

    # Records, offsets counted per partition from 0.
    def raw(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        *,
        partition: int = 0,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> Record:
        offset = self._offsets[topic, partition]
        self._offsets[topic, partition] += 1
        self.owned.actives.add(TP(topic, partition))
        return Record(topic, partition, offset, key, value, headers, int(self.clock() * 1000))

    def record(self, event: Event, *, partition: int = 0) -> Record:
        """``event`` as its producer sends it: on its contract topic, keyed per contract."""
        return self.raw(
            self.topic(event.TOPIC), encode(event), event.key().encode(), partition=partition
        )

    # Driving an agent.
    def make(self, agent: Callable[[ProcessorContext, Any], A]) -> A:
        """The agent made as the worker makes it, over this harness's stores."""
        return agent(self.ctx, self.stores)

    def feed(self, agent: Agent, records: Iterable[InputRecord]) -> None:
        """One batch, as the runtime hands it over."""
        asyncio.run(agent.process(list(records)))

    def tick(self, agent: Agent) -> None:
        asyncio.run(agent.tick())

    def checkpoint(self, agent: Agent) -> None:
        """Write the agent's changed state (its outputs count as delivered)."""
        agent.write_state(self.sink)

    def restart(self, agent: Callable[[ProcessorContext, Any], A]) -> A:
        """The agent of a worker restarted from the checkpointed state (live state lost)."""
        self.ctx = self.context()
        return self.make(agent)

    # What came out.
    def sample(self, name: str, **labels: str) -> float | None:
        """The value of one of the worker's metric series (None: no such series)."""
        return self.metrics.registry.get_sample_value(name, labels)

    def dead_letters(self) -> list[DeadLetter]:
        return [decode(DeadLetter, sent.value) for sent in self.output.on(self.dead_letter_topic)]

    def commands(self, kind: str | None = None) -> list[dict[str, Any]]:
        commands = self.output.values(self.topic(Topic.COMMANDS))
        return [command for command in commands if kind is None or command["type"] == kind]
