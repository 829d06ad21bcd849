"""fragrance-ops client SDKs (confluent-kafka): trainers, LLM services, the rating app."""

from producers.partitioning import murmur2, partition_for_key
from producers.ratings import RatingClient
from producers.reward_window import TrainerRewardWindow
from producers.trainer import CommandHandler, CommandRejected, TrainerClient
from producers.transport import (
    CommandReader,
    DeliveryStats,
    InMemoryTransport,
    KafkaTransport,
    Record,
    Transport,
)

__all__ = [
    "CommandHandler",
    "CommandReader",
    "CommandRejected",
    "DeliveryStats",
    "InMemoryTransport",
    "KafkaTransport",
    "RatingClient",
    "Record",
    "TrainerClient",
    "TrainerRewardWindow",
    "Transport",
    "murmur2",
    "partition_for_key",
]
