"""Kafka client configuration from settings, for confluent-kafka and for Faust (aiokafka).

Security settings (SASL PLAIN/SCRAM, TLS) pass through unchanged to every client and the
worker. Secrets stay pydantic ``SecretStr`` until the moment a client is configured, so
they never appear in a repr, a log line or ``status`` output.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

from confluent_kafka import Consumer, KafkaException, Message

from config.settings import KafkaSettings

#: Where the CLI's short-lived clients (topic creation, status) send librdkafka's log lines
#: (connection retries, several a second while a broker is away): the CLI shows them only
#: with ``--debug``, and says what failed in one line instead.
CLIENT_LOGGER = logging.getLogger("fragrance_ops.librdkafka")


class KafkaUnreachable(RuntimeError):
    """The configured Kafka did not answer: down, a wrong address, or refused credentials."""

    def __init__(self, kafka: KafkaSettings, reason: str) -> None:
        super().__init__(
            f"cannot reach Kafka at {kafka.bootstrap_servers}: {reason}. Check that the broker "
            "is up and that FRAGRANCE_OPS_KAFKA__BOOTSTRAP_SERVERS (or KAFKA_BOOTSTRAP_SERVERS) "
            "names it; with SASL or TLS, also FRAGRANCE_OPS_KAFKA__SECURITY_PROTOCOL and the "
            "SASL_/SSL_ settings"
        )


def check_reachable(client: Any, kafka: KafkaSettings, timeout_s: float) -> None:
    """Raise ``KafkaUnreachable`` unless the cluster answers ``client``'s metadata request."""
    try:
        client.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise KafkaUnreachable(kafka, exc.args[0].str()) from None


# Java's murmur2 partitioner, which Faust (aiokafka) also uses for keyed records.
# confluent-kafka's default (consistent_random, CRC32) would land the same key elsewhere.
JAVA_COMPATIBLE_PARTITIONER = "murmur2_random"


def require_bootstrap(kafka: KafkaSettings) -> str:
    if not kafka.bootstrap_servers:
        raise ValueError(
            "no Kafka bootstrap servers configured: set KAFKA_BOOTSTRAP_SERVERS "
            "or FRAGRANCE_OPS_KAFKA__BOOTSTRAP_SERVERS"
        )
    return kafka.bootstrap_servers


def confluent_config(kafka: KafkaSettings) -> dict[str, Any]:
    """librdkafka properties for bootstrap and security (no role-specific settings)."""
    config: dict[str, Any] = {
        "bootstrap.servers": require_bootstrap(kafka),
        "security.protocol": kafka.security_protocol,
    }
    if kafka.security_protocol.startswith("SASL_"):
        # librdkafka's own default mechanism is GSSAPI; Faust's (aiokafka's) is PLAIN.
        config["sasl.mechanism"] = sasl_mechanism(kafka)
        config["sasl.username"] = kafka.sasl_username
        if kafka.sasl_password is not None:
            config["sasl.password"] = kafka.sasl_password.get_secret_value()
    if kafka.ssl_cafile is not None:
        config["ssl.ca.location"] = str(kafka.ssl_cafile)
    if kafka.ssl_certfile is not None:
        config["ssl.certificate.location"] = str(kafka.ssl_certfile)
    if kafka.ssl_keyfile is not None:
        config["ssl.key.location"] = str(kafka.ssl_keyfile)
    if kafka.ssl_key_password is not None:
        config["ssl.key.password"] = kafka.ssl_key_password.get_secret_value()
    return config


def sasl_mechanism(kafka: KafkaSettings) -> str:
    """The SASL mechanism both client libraries use: the setting, else PLAIN."""
    return kafka.sasl_mechanism or "PLAIN"


# Client properties whose values are secrets: passwords, OAuth secrets, inline keys, JAAS.
_SECRET_MARKERS = ("password", "secret", "ssl.key.pem", "jaas", "oauthbearer.config")


def redacted(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a client config safe to log."""
    return {
        key: "***" if any(marker in key for marker in _SECRET_MARKERS) else value
        for key, value in config.items()
    }


def faust_credentials(kafka: KafkaSettings) -> Any:
    """Faust ``broker_credentials`` for the security settings, or None for PLAINTEXT.

    Faust hands them to every aiokafka client it makes: the group consumer, the producer
    (and the topic creation that goes through it), table changelog readers.
    """
    import faust  # the worker extra; kept out of the SDK's import path

    protocol = kafka.security_protocol
    context: ssl.SSLContext | None = None
    if protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(
            cafile=str(kafka.ssl_cafile) if kafka.ssl_cafile else None
        )
        if kafka.ssl_certfile is not None:
            context.load_cert_chain(
                str(kafka.ssl_certfile),
                str(kafka.ssl_keyfile) if kafka.ssl_keyfile else None,
                kafka.ssl_key_password.get_secret_value() if kafka.ssl_key_password else None,
            )
    if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        # An SSL context makes Faust's SASLCredentials SASL_SSL; without one, SASL_PLAINTEXT.
        return faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password.get_secret_value() if kafka.sasl_password else None,
            ssl_context=context,
            mechanism=sasl_mechanism(kafka),
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def consume_ready(
    consumer: Consumer, max_messages: int, wait_s: float, gather_s: float = 0.0
) -> list[Message]:
    """Up to ``max_messages`` records: waits up to ``wait_s`` for the first one only, then
    takes what else arrives within ``gather_s``.

    librdkafka's ``consume(n, timeout)`` returns when ``n`` records are in or the timeout has
    passed, so a batch read with a timeout holds back a lone record for the whole timeout.
    """
    first = consumer.consume(1, wait_s)
    if not first or max_messages == 1:
        return first
    return first + consumer.consume(max_messages - 1, gather_s)
