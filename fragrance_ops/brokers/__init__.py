"""Real Kafka-compatible brokers that tests, CI and the CLI start and stop themselves.

``ApacheKafkaBroker`` is the real thing (KRaft, from Maven jars, needs a JDK);
``TansuBroker`` is the embedded memory-only broker (no JDK, instant start).
"""

from fragrance_ops.brokers.apache import ApacheKafkaBroker
from fragrance_ops.brokers.base import (
    BrokerError,
    BrokerSetupError,
    BrokerStartError,
    LocalBroker,
    free_port,
)
from fragrance_ops.brokers.tansu import TansuBroker

__all__ = [
    "ApacheKafkaBroker",
    "BrokerError",
    "BrokerSetupError",
    "BrokerStartError",
    "LocalBroker",
    "TansuBroker",
    "free_port",
]
