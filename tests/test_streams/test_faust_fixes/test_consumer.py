"""The worker's consumer against the real broker: whole fetches reach the agents, nothing
fetched is skipped, and commits follow checkpoints.

Each test runs a ``WorkerApp`` with one recording agent in this process and, where it
says so, puts the consumer in the state a fault leaves it in (how it gets there is in
``streams/faust_fixes/consumer.py``'s docstring), then checks what the agent saw.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from confluent_kafka import Consumer as KafkaConsumer
from confluent_kafka import Producer, TopicPartition
from faust.types import TP

from config.settings import KafkaSettings, Settings, WorkerSettings
from streams.faust_fixes import WorkerApp
from streams.metrics import WorkerMetrics
from streams.output import OutputProducer
from streams.runtime import AgentRuntime, InputRecord
from streams.state import StateWriter
from tests.helpers.kafka import create_topics

pytestmark = pytest.mark.integration

BATCH = 10


@dataclass(eq=False)
class RecordingAgent:
    """Records the offsets and batches it is handed; fails on ``fail_at`` if set."""

    topics: tuple[str, ...]
    name: str = "recorder"
    batches: list[list[int]] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)  # offsets seen at each checkpoint
    fail_at: int | None = None

    @property
    def seen(self) -> list[int]:
        return [offset for batch in self.batches for offset in batch]

    async def process(self, records: Sequence[InputRecord]) -> None:
        if self.fail_at is not None and any(r.offset == self.fail_at for r in records):
            raise RuntimeError(f"the agent failed at offset {self.fail_at}")
        self.batches.append([record.offset for record in records])

    def write_state(self, writer: StateWriter) -> None:
        self.checkpoints.append(len(self.seen))

    def forget(self) -> None:
        pass


def produce(bootstrap: str, topic: str, count: int, pause_s: float = 0.0) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    for index in range(count):
        producer.produce(topic, key=b"k", value=str(index).encode())
        if pause_s:
            producer.flush(10)
            time.sleep(pause_s)
    assert producer.flush(10) == 0


def committed(bootstrap: str, group: str, topic: str) -> int:
    reader = KafkaConsumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        (offset,) = reader.committed([TopicPartition(topic, 0)], timeout=10)
        return max(offset.offset, 0)
    finally:
        reader.close()


async def eventually(condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def worker_app(
    bootstrap: str, topic: str, data_dir: Path, *, commit_interval_s: float, **worker: float
) -> tuple[WorkerApp, RecordingAgent]:
    """An app with one recording agent on ``topic``; made in the running loop (Faust's
    services bind the loop they are made in)."""
    settings = Settings(
        kafka=KafkaSettings(bootstrap_servers=bootstrap),
        worker=WorkerSettings(**worker),  # type: ignore[arg-type]
    )
    app = WorkerApp(
        f"app-{topic}",
        broker=f"kafka://{bootstrap}",
        store="memory://",
        datadir=str(data_dir),
        topic_partitions=1,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=commit_interval_s,
        web_enabled=False,
    )
    app.fetch_with(settings)
    app.runtime = AgentRuntime(
        app, OutputProducer(settings), StateWriter(settings), WorkerMetrics()
    )
    agent = RecordingAgent((topic,))
    app.runtime.register(agent)
    return app, agent


def inputs_topic(bootstrap: str, topic_prefix: str) -> str:
    topic = f"{topic_prefix}inputs"
    create_topics(bootstrap, [topic])
    return topic


def run_app(
    bootstrap: str,
    topic_prefix: str,
    data_dir: Path,
    fault: Callable[[WorkerApp, TP], Awaitable[None]],
    *,
    commits: bool,
) -> list[int]:
    """Deliver a batch, inject ``fault``, deliver another; return the offsets the agent saw.

    ``commits``: whether the consumer commits (every 100 ms), or never.
    """
    topic = inputs_topic(bootstrap, topic_prefix)
    tp = TP(topic, 0)

    async def scenario() -> list[int]:
        app, agent = worker_app(
            bootstrap, topic, data_dir, commit_interval_s=0.1 if commits else 3600.0
        )
        await app.start()
        try:
            await asyncio.to_thread(produce, bootstrap, topic, BATCH)
            await eventually(lambda: len(agent.seen) == BATCH, "the first batch")
            if commits:
                await eventually(
                    lambda: app.consumer._committed_offset.get(tp) == BATCH,  # type: ignore[attr-defined]
                    "its commit",
                )
            await fault(app, tp)
            await asyncio.to_thread(produce, bootstrap, topic, BATCH)
            await eventually(lambda: 2 * BATCH - 1 in agent.seen, "the second batch", 20)
        finally:
            await app.stop()
        return agent.seen

    return asyncio.run(scenario())


def test_records_below_a_stale_read_offset_are_delivered(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    async def stale_read_offset(app: WorkerApp, tp: TP) -> None:
        # What a delivery that outlived a rebalance wrote after the seek back in Faust's
        # drain loop: an offset past records not yet processed (it skipped up to it).
        app.consumer._read_offset[tp] = BATCH + BATCH // 2  # type: ignore[attr-defined]

    seen = run_app(kafka_bootstrap, topic_prefix, tmp_path, stale_read_offset, commits=True)
    assert seen == list(range(2 * BATCH))


def test_a_partition_never_committed_is_read_again_from_its_beginning(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    async def seek_back(app: WorkerApp, tp: TP) -> None:
        # Faust's own answer to records it dropped: seek back to the committed offsets.
        await app.consumer.perform_seek()

    seen = run_app(kafka_bootstrap, topic_prefix, tmp_path, seek_back, commits=False)
    first, second = list(range(BATCH)), list(range(BATCH, 2 * BATCH))
    assert seen == first + first + second


def test_records_dropped_by_a_seek_back_are_read_again_before_newer_ones(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    async def clear_buffers(app: WorkerApp, tp: TP) -> None:
        # What Faust's recovery does last (``Recovery._resume_streams``): resuming the flow
        # clears what was fetched, so it asks for a seek back to the commit.
        app.flow_control.resume()

    seen = run_app(kafka_bootstrap, topic_prefix, tmp_path, clear_buffers, commits=False)
    first, second = list(range(BATCH)), list(range(BATCH, 2 * BATCH))
    assert seen == first + first + second  # read again from the commit (none: the start)


def test_a_fetch_waits_for_its_batch(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """Records trickling in every 10 ms reach the agent in a few batches, not one each: the
    broker holds a fetch until batch_min_bytes arrived or batch_within_s passed."""
    topic = inputs_topic(kafka_bootstrap, topic_prefix)
    records = 30

    async def scenario() -> RecordingAgent:
        app, agent = worker_app(
            kafka_bootstrap,
            topic,
            tmp_path,
            commit_interval_s=3600.0,
            batch_within_s=0.5,
            batch_min_bytes=1024 * 1024,
        )
        await app.start()
        try:
            await asyncio.to_thread(produce, kafka_bootstrap, topic, 1)
            await eventually(lambda: len(agent.seen) == 1, "the first record")
            await asyncio.to_thread(produce, kafka_bootstrap, topic, records, 0.01)
            await eventually(lambda: len(agent.seen) == 1 + records, "the trickle")
        finally:
            await app.stop()
        return agent

    agent = asyncio.run(scenario())
    assert agent.seen == list(range(1 + records))
    # At least 300 ms of trickle in fetches held up to 500 ms: a handful of batches.
    assert len(agent.batches) - 1 <= records // 5, agent.batches


def test_commits_cover_only_what_a_checkpoint_wrote(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """Offsets are committed behind checkpoints; a failed batch crashes the app and is
    never committed, nor is anything after it."""
    topic = inputs_topic(kafka_bootstrap, topic_prefix)

    async def scenario() -> tuple[RecordingAgent, str]:
        app, agent = worker_app(kafka_bootstrap, topic, tmp_path, commit_interval_s=0.1)
        agent.fail_at = 2 * BATCH + 3
        await app.start()
        try:
            await asyncio.to_thread(produce, kafka_bootstrap, topic, 2 * BATCH)
            await eventually(lambda: len(agent.seen) == 2 * BATCH, "the first records")
            tp = TP(topic, 0)
            await eventually(
                lambda: app.consumer._committed_offset.get(tp) == 2 * BATCH,  # type: ignore[attr-defined]
                "their commit",
            )
            await asyncio.to_thread(produce, kafka_bootstrap, topic, BATCH)
            await eventually(lambda: app.crashed, "the crash")
        finally:
            await app.stop()
        return agent, app.conf.id

    agent, group = asyncio.run(scenario())
    assert agent.checkpoints
    assert max(agent.checkpoints) <= 2 * BATCH
    assert committed(kafka_bootstrap, group, topic) == 2 * BATCH


def test_a_partition_faust_pauses_is_not_fetched_until_resumed(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """Faust pauses in its own bookkeeping only; aiokafka's fetcher pauses too, so records of
    a paused partition (a recovered changelog) are not fetched to sit unread, holding back
    the next fetch. Resumed, the partition is read on from where it stopped."""
    topic = inputs_topic(kafka_bootstrap, topic_prefix)
    tp = TP(topic, 0)

    async def scenario() -> tuple[RecordingAgent, bool, bool]:
        app, agent = worker_app(
            kafka_bootstrap, topic, tmp_path, commit_interval_s=3600.0, batch_within_s=0.05
        )
        await app.start()
        try:
            await asyncio.to_thread(produce, kafka_bootstrap, topic, BATCH)
            await eventually(lambda: len(agent.seen) == BATCH, "the first batch")
            consumer = app.consumer._thread._ensure_consumer()  # type: ignore[attr-defined]
            app.consumer.pause_partitions({tp})
            await asyncio.to_thread(produce, kafka_bootstrap, topic, BATCH)
            await asyncio.sleep(1.0)  # 20 fetches' worth
            paused = consumer.paused() == {tp}
            fetched_while_paused = tp in consumer._fetcher._records
            app.consumer.resume_partitions({tp})
            await eventually(lambda: len(agent.seen) == 2 * BATCH, "the second batch")
        finally:
            await app.stop()
        return agent, paused, fetched_while_paused

    agent, paused, fetched_while_paused = asyncio.run(scenario())
    assert paused
    assert not fetched_while_paused
    assert agent.seen == list(range(2 * BATCH))
