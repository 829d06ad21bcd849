"""The tables' changelogs: created compacted, with the worker's topic configs, so a worker
taking a partition reads about one record per key, not the table's whole history."""

from __future__ import annotations

import time
from collections.abc import Callable

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource

from config.settings import Settings
from fragrance_ops.worker_process import WorkerProcess
from producers import TrainerClient
from producers.partitioning import partition_for_key
from schemas import Topic, topic_name
from tests.helpers.kafka import consume_until
from tests.test_streams.conftest import TEST_PARTITIONS

pytestmark = pytest.mark.integration

#: Segments roll after a second, so the test sees compaction within seconds (the default
#: 8 MiB segments roll after about 1,000 window writes).
CHANGELOG_CONFIGS = {"segment.ms": "1000", "min.cleanable.dirty.ratio": "0.01"}
STEPS = 1500


def readable_records(bootstrap: str, topic: str, partition: int) -> tuple[int, int]:
    """(records a reader from the beginning gets, the partition's end offset)."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "unused", "enable.auto.commit": False}
    )
    try:
        _, end = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
        consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)])
        count, position = 0, -1
        deadline = time.monotonic() + 30
        while position < end - 1 and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                count += 1
                position = message.offset()
        return count, end
    finally:
        consumer.close()


def test_a_table_changelog_is_compacted_to_about_one_record_per_key(
    make_worker: Callable[..., WorkerProcess], ops_settings: Settings, kafka_bootstrap: str
) -> None:
    worker = make_worker(
        WORKER__CHANGELOG_TOPIC_CONFIGS=orjson.dumps(CHANGELOG_CONFIGS).decode(),
        # A commit, so a checkpoint writing the run's window, every 50 ms.
        WORKER__FAUST_OPTIONS='{"broker_commit_interval": 0.05}',
    )
    worker.start()
    run = "compacted-run"
    prefix = ops_settings.kafka.topic_prefix

    def processed(step: int) -> None:
        consume_until(
            kafka_bootstrap,
            topic_name(Topic.REWARD_STATS, prefix),
            lambda messages: any(orjson.loads(m.value())["step"] == step for m in messages),
        )

    with TrainerClient(run, settings=ops_settings, receive_commands=False) as client:
        for step in range(STEPS):
            client.log_step(step, loss=1.0, reward=float(step % 7))
            time.sleep(0.004)  # 6 s of metrics: dozens of checkpoints, a window write each
        processed(STEPS - 1)
        # One more write, past segment.ms: it rolls the segment holding the others, which
        # the cleaner may then compact (it never touches the active segment).
        time.sleep(1.5)
        client.log_step(STEPS, loss=1.0, reward=1.0)
    processed(STEPS)

    app_id = f"app-{prefix.rstrip('.')}"
    changelog = f"{app_id}-reward-windows-changelog"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    resource = ConfigResource(ConfigResource.Type.TOPIC, changelog)
    config = admin.describe_configs([resource])[resource].result()
    assert config["cleanup.policy"].value == "compact"
    for name, value in CHANGELOG_CONFIGS.items():
        assert config[name].value == value

    partition = partition_for_key(run.encode(), TEST_PARTITIONS)
    deadline = time.monotonic() + 60
    while True:
        count, end = readable_records(kafka_bootstrap, changelog, partition)
        # One key: its newest value in the compacted segment, and the last write.
        if end >= 50 and count <= 3:
            break
        assert time.monotonic() < deadline, f"{count} of {end} records still readable"
        time.sleep(1.0)
