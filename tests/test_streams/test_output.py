"""The output producer's compression per topic (no broker: producers start on first send)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fragrance_ops.settings import KafkaSettings, Settings, WorkerSettings
from schemas import Topic, topic_name
from streams.output import OutputProducer


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

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
    assert got[Topic.REWARD_STATS] == "gzip"
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
