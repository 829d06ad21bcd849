"""Creating the contract topics, idempotently."""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from config.kafka import CLIENT_LOGGER, check_reachable, confluent_config
from config.settings import KafkaSettings
from schemas.topics import TOPIC_SPECS, topic_name

REACHABLE_TIMEOUT_S = 10.0  # a broker that answers does so in milliseconds


@dataclass(frozen=True, slots=True)
class TopicResult:
    name: str
    created: bool


def create_contract_topics(kafka: KafkaSettings, timeout_s: float = 30.0) -> list[TopicResult]:
    """Create every contract topic that does not exist yet; existing ones are left as they are."""
    admin = AdminClient(confluent_config(kafka), logger=CLIENT_LOGGER)
    check_reachable(admin, kafka, min(timeout_s, REACHABLE_TIMEOUT_S))
    new_topics = [
        NewTopic(
            topic_name(spec.topic, kafka.topic_prefix),
            num_partitions=kafka.partitions,
            replication_factor=kafka.replication_factor,
            config={"cleanup.policy": "compact"} if spec.compacted else {},
        )
        for spec in TOPIC_SPECS.values()
    ]
    results: list[TopicResult] = []
    for name, future in admin.create_topics(new_topics, request_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
            results.append(TopicResult(name, created=True))
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
            results.append(TopicResult(name, created=False))
    return sorted(results, key=lambda result: result.name)
