"""Keys land where Faust (aiokafka) and Java clients put them: murmur2."""

from __future__ import annotations

import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given
from hypothesis import strategies as st

from config.settings import KafkaSettings, Settings
from producers import KafkaTransport, murmur2, partition_for_key
from tests.helpers.kafka import consume_all, create_topics

# Kafka's own test vectors (clients UtilsTest.testMurmur2), as signed Java ints.
JAVA_VECTORS = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize(("key", "expected"), JAVA_VECTORS.items())
def test_murmur2_matches_java(key: bytes, expected: int) -> None:
    assert murmur2(key) == expected & 0xFFFFFFFF


@given(key=st.binary(max_size=64), partitions=st.integers(1, 64))
def test_partition_matches_aiokafka(key: bytes, partitions: int) -> None:
    all_partitions = list(range(partitions))
    expected = DefaultPartitioner()(key, all_partitions, all_partitions)
    assert partition_for_key(key, partitions) == expected
    assert murmur2(key) == aiokafka_murmur2(key)


@pytest.mark.integration
def test_sdk_producer_lands_keys_on_faust_partitions(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}keys"
    partitions = 8
    create_topics(kafka_bootstrap, [topic], partitions)
    transport = KafkaTransport(Settings(kafka=KafkaSettings(bootstrap_servers=kafka_bootstrap)))
    keys = [f"run-{i}".encode() for i in range(400)]
    for key in keys:
        transport.produce(topic, key, b"{}")
    assert transport.close(30) == 0
    messages = consume_all(kafka_bootstrap, topic, len(keys))
    faust_partitioner = DefaultPartitioner()
    all_partitions = list(range(partitions))
    for message in messages:
        expected = faust_partitioner(message.key(), all_partitions, all_partitions)
        assert message.partition() == expected, message.key()
    assert len({message.partition() for message in messages}) == partitions
