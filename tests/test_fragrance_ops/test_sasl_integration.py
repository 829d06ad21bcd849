"""SASL/PLAIN and ACLs against a real Apache Kafka broker of this module's own.

The broker has the harness's PLAINTEXT listener (its readiness probe, and this test's
superuser ``ANONYMOUS``) plus a SASL_PLAINTEXT listener with two users, ``worker`` and
``trainer``, and Kafka's StandardAuthorizer. Each user gets exactly the ACLs
docs/security.md lists. Everything the system does below goes through
the SASL listener: topic creation, the worker (Faust/aiokafka and its confluent output
producer), the trainer SDK. The suite's own broker is not touched.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, Producer
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
)
from pydantic import SecretStr

from config.kafka import KafkaUnreachable, confluent_config
from config.settings import KafkaSettings, SdkSettings, SecuritySettings, Settings
from fragrance_ops.admin import create_contract_topics
from fragrance_ops.brokers import ApacheKafkaBroker, BrokerSetupError, free_port
from fragrance_ops.brokers.base import LOCALHOST
from fragrance_ops.worker_process import WorkerProcess, worker_env
from producers import TrainerClient
from schemas import Command, SetEntropyCoef, Topic, topic_name

pytestmark = pytest.mark.integration

PASSWORDS = {"worker": "worker-pw-3c2b1a", "trainer": "trainer-pw-6f5e4d"}
PREFIX = "sasl."
APP_ID = "sasl-ops"
SIGNING_KEY = "sasl-test-signing-key-0123456789"
PARTITIONS = 2


class SaslKafka(ApacheKafkaBroker):
    """The harness's broker plus a SASL_PLAINTEXT/PLAIN listener and an authorizer."""

    def __init__(self) -> None:
        super().__init__()
        self.sasl_port = free_port(exclude=frozenset({self.port, self.controller_port}))

    @property
    def sasl_bootstrap(self) -> str:
        return f"{LOCALHOST}:{self.sasl_port}"

    @property
    def properties(self) -> dict[str, str]:
        host, users = LOCALHOST, " ".join(f'user_{u}="{p}"' for u, p in PASSWORDS.items())
        return super().properties | {
            "listeners": f"PLAINTEXT://{host}:{self.port},SASL_PLAINTEXT://{self.sasl_bootstrap},"
            f"CONTROLLER://{host}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{host}:{self.port},"
            f"SASL_PLAINTEXT://{self.sasl_bootstrap}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,"
            "CONTROLLER:PLAINTEXT",
            "sasl.enabled.mechanisms": "PLAIN",
            "listener.name.sasl_plaintext.plain.sasl.jaas.config": (
                f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};"
            ),
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": "User:ANONYMOUS",  # the PLAINTEXT and controller listeners
        }


def acl(
    user: str,
    operation: AclOperation,
    resource: ResourceType,
    name: str,
    pattern: ResourcePatternType = ResourcePatternType.LITERAL,
) -> AclBinding:
    return AclBinding(
        resource, name, pattern, f"User:{user}", "*", operation, AclPermissionType.ALLOW
    )


def documented_acls() -> list[AclBinding]:
    """docs/security.md's ACLs for the worker and a trainer, with this test's prefix and app id."""
    topic = ResourceType.TOPIC
    read, write = AclOperation.READ, AclOperation.WRITE
    name = {t: topic_name(t, PREFIX) for t in Topic}
    trainer_writes = (Topic.RUNS, Topic.METRICS, Topic.CHECKPOINTS, Topic.ACKS)
    worker_reads = (*trainer_writes, Topic.LLM_OUTCOMES, Topic.RATINGS)
    worker_writes = (Topic.REWARD_STATS, Topic.COMMANDS, Topic.LLM_CONTROL, Topic.DEAD_LETTER)
    prefixed = ResourcePatternType.PREFIXED
    return [
        *(acl("trainer", write, topic, name[t]) for t in trainer_writes),
        acl("trainer", read, topic, name[Topic.COMMANDS]),
        acl("trainer", read, ResourceType.GROUP, f"{APP_ID}.trainer.", prefixed),
        *(acl("worker", read, topic, name[t]) for t in worker_reads),
        *(acl("worker", write, topic, name[t]) for t in worker_writes),
        acl("worker", AclOperation.CREATE, topic, PREFIX, prefixed),  # `topics create`
        # Faust's own topics (changelogs, the assignor's, the ratings re-keyed by target).
        acl("worker", AclOperation.ALL, topic, f"{APP_ID}-", prefixed),
        acl("worker", AclOperation.ALL, topic, f"{PREFIX}{APP_ID}-", prefixed),
        acl("worker", read, ResourceType.GROUP, APP_ID),
    ]


@pytest.fixture(scope="module")
def broker() -> Iterator[SaslKafka]:
    try:
        kafka = SaslKafka()
    except BrokerSetupError as exc:
        pytest.skip(f"no Apache Kafka jars or JDK: {exc}")
    with kafka:
        admin = AdminClient({"bootstrap.servers": kafka.bootstrap_servers})  # the superuser
        for future in admin.create_acls(documented_acls()).values():
            future.result(timeout=30)
        yield kafka


def kafka_settings(broker: SaslKafka, user: str, password: str | None = None) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=broker.sasl_bootstrap,
        topic_prefix=PREFIX,
        partitions=PARTITIONS,
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username=user,
        sasl_password=SecretStr(password or PASSWORDS[user]),
    )


def test_the_worker_and_a_trainer_work_over_sasl_with_only_the_documented_acls(
    broker: SaslKafka, tmp_path: Path
) -> None:
    worker_kafka = kafka_settings(broker, "worker")
    create_contract_topics(worker_kafka, timeout_s=30)  # an admin call, as the worker
    env = worker_env(
        KAFKA__BOOTSTRAP_SERVERS=broker.sasl_bootstrap,
        KAFKA__TOPIC_PREFIX=PREFIX,
        KAFKA__PARTITIONS=str(PARTITIONS),
        KAFKA__SECURITY_PROTOCOL="SASL_PLAINTEXT",
        KAFKA__SASL_USERNAME="worker",
        KAFKA__SASL_PASSWORD=PASSWORDS["worker"],
        WORKER__APP_ID=APP_ID,
        WORKER__DATA_DIR=str(tmp_path / "worker"),
        METRICS__PORT="0",
        SECURITY__COMMAND_SIGNING_KEY=SIGNING_KEY,
    )
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    settings = Settings(
        kafka=kafka_settings(broker, "trainer"),
        worker=Settings().worker.model_copy(update={"app_id": APP_ID}),
        security=SecuritySettings(
            command_signing_key=SecretStr(SIGNING_KEY), require_signed_commands=True
        ),
    )
    applied: list[float] = []

    def set_entropy(command: Command) -> None:
        assert isinstance(command, SetEntropyCoef)
        applied.append(command.entropy_coef)

    with WorkerProcess(env, tmp_path / "worker.log") as worker:
        client = TrainerClient(f"sasl-run-{uuid.uuid4().hex[:6]}", settings=settings)
        client.on_command("set_entropy_coef", set_entropy)
        client.announce({})
        deadline = time.monotonic() + 40
        step = 0
        while not applied and time.monotonic() < deadline:
            client.log_step(step, loss=1.0, reward=1.0)
            step += 1
            time.sleep(0.05)
        remaining = client.flush(10)
        client.close()
        log = worker.tail(200)
    assert applied == [pytest.approx(0.01)], log
    assert remaining == 0
    assert client.stats.delivered == client.stats.produced  # metrics and the ack
    assert "AUTHORIZATION_FAILED" not in log.upper()
    for password in PASSWORDS.values():
        assert password not in log


def test_a_trainer_cannot_write_commands(broker: SaslKafka) -> None:
    failures: list[KafkaError] = []

    def on_delivery(error: KafkaError | None, _message: object) -> None:
        if error is not None:
            failures.append(error)

    producer = Producer(confluent_config(kafka_settings(broker, "trainer")))
    producer.produce(topic_name(Topic.COMMANDS, PREFIX), b"{}", b"run", on_delivery=on_delivery)
    assert producer.flush(20) == 0
    assert [error.code() for error in failures] == [KafkaError.TOPIC_AUTHORIZATION_FAILED]


def test_a_wrong_password_is_refused_and_not_logged(
    broker: SaslKafka, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "not-the-trainer-password"
    settings = Settings(
        kafka=kafka_settings(broker, "trainer", wrong), sdk=SdkSettings(close_timeout_s=0)
    )
    with caplog.at_level(logging.WARNING):
        client = TrainerClient("sasl-denied", settings=settings, receive_commands=False)
        client.log_step(0, loss=1.0, reward=1.0)
        assert client.flush(3) == 1  # still buffered: never delivered
        client.close()
    assert client.stats.delivered == 0
    assert "Authentication failed" in caplog.text
    assert wrong not in caplog.text
    with pytest.raises(KafkaUnreachable) as unreachable:  # librdkafka retries until the timeout
        create_contract_topics(settings.kafka, timeout_s=3)
    assert wrong not in str(unreachable.value)
