"""Which Kafka the test session talks to, and starting/stopping it.

Order: $KAFKA_BOOTSTRAP_SERVERS (someone else's broker) >
$FRAGRANCE_OPS_TEST_BROKER (tansu | apache | docker) > Docker if an engine
answers > the Apache Kafka jars from deploy/kafka (the default without Docker).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from fragrance_ops.brokers import ApacheKafkaBroker, TansuBroker

BOOTSTRAP_ENV = "KAFKA_BOOTSTRAP_SERVERS"
CHOICE_ENV = "FRAGRANCE_OPS_TEST_BROKER"
CHOICES = ("tansu", "apache", "docker")


@functools.cache
def docker_available(timeout: float = 5.0) -> bool:
    """True if `docker info` succeeds quickly (a CLI without an engine does not count)."""
    if shutil.which("docker") is None:
        return False
    try:
        result = subprocess.run(["docker", "info"], capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def chosen_broker() -> str:
    """One of "external", "tansu", "apache", "docker"."""
    if os.environ.get(BOOTSTRAP_ENV):
        return "external"
    choice = os.environ.get(CHOICE_ENV, "").strip().lower()
    if choice:
        if choice not in CHOICES:
            raise ValueError(f"{CHOICE_ENV}={choice!r}; expected one of {CHOICES}")
        return choice
    return "docker" if docker_available() else "apache"


@contextmanager
def session_broker() -> Iterator[str]:
    """Yield bootstrap servers of the session's broker; stop it (if ours) on exit."""
    kind = chosen_broker()
    if kind == "external":
        yield os.environ[BOOTSTRAP_ENV]
    elif kind == "tansu":
        with TansuBroker() as tansu:
            yield tansu.bootstrap_servers
    elif kind == "docker":
        try:
            from testcontainers.community.kafka import KafkaContainer
        except ImportError:  # testcontainers < 4.9
            from testcontainers.kafka import KafkaContainer
        with KafkaContainer().with_kraft() as container:
            yield str(container.get_bootstrap_server())
    else:
        with ApacheKafkaBroker() as kafka:
            yield kafka.bootstrap_servers
