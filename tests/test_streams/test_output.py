"""The output producer: compression per topic (no broker: producers start on first send),
and delivery of every producer's records before a checkpoint (against the broker)."""

from __future__ import annotations

import asyncio
import os

import pytest
from pydantic import ValidationError

from config.settings import KafkaSettings, Settings, WorkerSettings
from schemas import Topic, topic_name
from streams.output import OutputDeliveryError, OutputProducer
from tests.helpers.kafka import consume_until, create_topics


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("FRAGRANCE_OPS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")  # never contacted


def codecs(settings: Settings) -> dict[Topic, str]:
    output = OutputProducer(settings)
    prefix = settings.kafka.topic_prefix
    return {topic: output.codec(topic_name(topic, prefix)) for topic in Topic}


def test_topics_other_clients_read_leave_in_a_codec_every_client_reads() -> None:
    settings = Settings(kafka=KafkaSettings(bootstrap_servers="127.0.0.1:9", topic_prefix="p."))
    got = codecs(settings)
    assert got[Topic.COMMANDS] == "none"
    assert got[Topic.LLM_CONTROL] == "none"
    assert got[Topic.REWARD_STATS] == "none"
    assert got[Topic.DEAD_LETTER] == "lz4"  # read by the operators' tools: the default codec
    assert codecs(Settings())[Topic.COMMANDS] == "none"  # with or without a prefix


def test_a_topic_codec_set_in_the_environment_is_merged_over_the_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "FRAGRANCE_OPS_WORKER__OUTPUT_TOPIC_COMPRESSION", '{"trainer.reward-stats": "zstd"}'
    )
    monkeypatch.setenv("FRAGRANCE_OPS_WORKER__OUTPUT_COMPRESSION", "snappy")
    got = codecs(Settings())
    assert got[Topic.REWARD_STATS] == "zstd"
    assert got[Topic.COMMANDS] == "none"  # the other defaults stay
    assert got[Topic.DEAD_LETTER] == "snappy"


@pytest.mark.parametrize(
    "value", [{"trainer.commands": "brotli"}, {"trainer.metrics": "none"}, {"commands": "none"}]
)
def test_an_unknown_codec_or_a_topic_the_worker_does_not_write_is_refused(
    value: dict[str, str],
) -> None:
    with pytest.raises(ValidationError):
        WorkerSettings(output_topic_compression=value)  # type: ignore[arg-type]


# --- against the broker: every producer's records are awaited by delivered() -----------------

OUTPUTS = (Topic.COMMANDS, Topic.REWARD_STATS, Topic.DEAD_LETTER)  # none, gzip (set), lz4


def test_connect_makes_every_producer_before_it_waits_for_the_broker() -> None:
    """``send`` and ``serve`` run on the loop while ``connect`` waits for metadata: the
    producers they use are all made before that wait and do not change under them."""
    settings = Settings()
    prefix = settings.kafka.topic_prefix
    output = OutputProducer(settings)
    topics = [topic_name(topic, prefix) for topic in OUTPUTS]

    async def connect_meanwhile() -> None:
        connecting = asyncio.create_task(output.connect(topics, timeout_s=0.5))
        await asyncio.sleep(0.1)  # connect now waits for the first topic's metadata
        made = dict(output._by_codec)
        assert set(made) == {output.codec(topic) for topic in topics}
        output.serve()
        await connecting  # the unreachable broker times out: warned, not raised
        assert output._by_codec == made

    asyncio.run(connect_meanwhile())


@pytest.fixture
def small_record_topics(kafka_bootstrap: str, topic_prefix: str) -> Settings:
    """The worker's output topics, each refusing records over 2 KiB (broker-side)."""
    create_topics(
        kafka_bootstrap,
        [topic_name(topic, topic_prefix) for topic in OUTPUTS],
        config={"max.message.bytes": "2048"},
    )
    return Settings(
        kafka=KafkaSettings(bootstrap_servers=kafka_bootstrap, topic_prefix=topic_prefix),
        # A third codec, so that three producers are awaited.
        worker=WorkerSettings(output_topic_compression={"trainer.reward-stats": "gzip"}),
    )


@pytest.mark.integration
def test_records_of_every_producer_are_on_the_broker_when_delivered_returns(
    small_record_topics: Settings, kafka_bootstrap: str
) -> None:
    prefix = small_record_topics.kafka.topic_prefix
    output = OutputProducer(small_record_topics)

    async def send_all() -> None:
        for i in range(3):
            for topic in OUTPUTS:
                await output.send(topic_name(topic, prefix), b"run", f"{topic} {i}".encode())
        await output.delivered()

    asyncio.run(send_all())
    for topic in OUTPUTS:
        got = consume_until(kafka_bootstrap, topic_name(topic, prefix), lambda m: len(m) >= 3)
        assert [m.value() for m in got] == [f"{topic} {i}".encode() for i in range(3)]


@pytest.mark.integration
@pytest.mark.parametrize("refused", OUTPUTS)
def test_a_record_refused_on_any_producer_fails_delivered(
    small_record_topics: Settings, refused: Topic
) -> None:
    """The broker refuses the record; librdkafka reports it inside the checkpoint's flush,
    which must then fail (the checkpoint must not write state implying a lost output)."""
    prefix = small_record_topics.kafka.topic_prefix
    output = OutputProducer(small_record_topics)

    async def send_then_deliver() -> None:
        for topic in OUTPUTS:
            await output.send(topic_name(topic, prefix), b"run", b"small")
        await output.send(topic_name(refused, prefix), b"run", os.urandom(8192))
        await output.delivered()

    with pytest.raises(OutputDeliveryError, match="MSG_SIZE_TOO_LARGE"):
        asyncio.run(send_then_deliver())
