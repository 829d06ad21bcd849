"""SASL/TLS settings reach every Kafka client and the worker; secrets are never printed.

The configuration path, without a broker: settings come from the environment, as in a
deployment; the clients are real librdkafka and Faust objects where that costs nothing,
and recording stand-ins where a client would need a broker to do anything.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient
from pydantic import ValidationError
from typer.testing import CliRunner

import fragrance_ops.admin
import fragrance_ops.status
import producers.transport
import streams.output
import streams.state
from config.kafka import confluent_config, faust_credentials, redacted
from config.settings import Settings
from fragrance_ops.admin import create_contract_topics
from fragrance_ops.cli import cli
from fragrance_ops.status import collect_status
from producers import KafkaTransport
from schemas import Topic, topic_name
from streams.output import OutputProducer

SASL_PASSWORD = "sasl-pw-9f8e7d6c"
KEY_PASSWORD = "key-pw-1a2b3c4d"
SIGNING_KEY = "signing-key-5e6f7a8b9c0d"
SECRETS = (SASL_PASSWORD, KEY_PASSWORD, SIGNING_KEY)
UNREACHABLE = "127.0.0.1:1"
ENV = "FRAGRANCE_OPS_"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A self-signed certificate and its key, encrypted with KEY_PASSWORD."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed (needed to make a test certificate)")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-days", "1", "-subj", "/CN=localhost"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-keyout", str(key), "-out", str(cert), "-passout", f"pass:{KEY_PASSWORD}"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return {"cert": cert, "key": key}


# Each case: the environment a deployment sets, and what librdkafka must be given.
CASES: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "sasl-plain": (
        {"SECURITY_PROTOCOL": "SASL_PLAINTEXT", "SASL_MECHANISM": "PLAIN"},
        {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN"},
    ),
    "sasl-default-mechanism-lower-case": (
        {"SECURITY_PROTOCOL": "sasl_plaintext"},
        {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN"},
    ),
    "scram-256-tls": (
        {"SECURITY_PROTOCOL": "SASL_SSL", "SASL_MECHANISM": "SCRAM-SHA-256", "SSL_CAFILE": "cert"},
        {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-256"},
    ),
    "scram-512-tls": (
        {"SECURITY_PROTOCOL": "SASL_SSL", "SASL_MECHANISM": "scram-sha-512", "SSL_CAFILE": "cert"},
        {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512"},
    ),
    "mutual-tls": (
        {
            "SECURITY_PROTOCOL": "SSL",
            "SSL_CAFILE": "cert",
            "SSL_CERTFILE": "cert",
            "SSL_KEYFILE": "key",
            "SSL_KEY_PASSWORD": KEY_PASSWORD,
        },
        {"security.protocol": "SSL"},
    ),
}
SASL_CASES = [
    name for name, (env, _) in CASES.items() if "SASL" in env["SECURITY_PROTOCOL"].upper()
]


def clear_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(ENV) or name == "KAFKA_BOOTSTRAP_SERVERS":
            monkeypatch.delenv(name)


@pytest.fixture(params=list(CASES))
def case(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tls_files: dict[str, Path]
) -> tuple[str, dict[str, str]]:
    """Sets the case's environment (file names resolved); returns its name and expectations."""
    clear_environment(monkeypatch)
    env, expected = CASES[request.param]
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", UNREACHABLE)
    monkeypatch.setenv(f"{ENV}SECURITY__COMMAND_SIGNING_KEY", SIGNING_KEY)
    if "SASL" in env["SECURITY_PROTOCOL"].upper():
        monkeypatch.setenv(f"{ENV}KAFKA__SASL_USERNAME", "trainer-7")
        monkeypatch.setenv(f"{ENV}KAFKA__SASL_PASSWORD", SASL_PASSWORD)
    for name, value in env.items():
        resolved = str(tls_files[value]) if value in tls_files else value
        monkeypatch.setenv(f"{ENV}KAFKA__{name}", resolved)
    return request.param, expected


def security_keys(config: dict[str, Any]) -> dict[str, Any]:
    return {
        key: value
        for key, value in config.items()
        if key.startswith(("security.", "sasl.", "ssl."))
    }


def test_the_confluent_config_carries_the_environment(case: tuple[str, dict[str, str]]) -> None:
    name, expected = case
    kafka = Settings().kafka
    config = confluent_config(kafka)
    assert config["bootstrap.servers"] == UNREACHABLE
    assert expected.items() <= config.items()
    if name in SASL_CASES:
        assert (config["sasl.username"], config["sasl.password"]) == ("trainer-7", SASL_PASSWORD)
        assert redacted(config)["sasl.password"] == "***"
    else:
        assert not any(key.startswith("sasl.") for key in config)
    if kafka.ssl_cafile is not None:
        assert config["ssl.ca.location"] == str(kafka.ssl_cafile)
    if name == "mutual-tls":
        assert config["ssl.certificate.location"] == str(kafka.ssl_certfile)
        assert config["ssl.key.location"] == str(kafka.ssl_keyfile)
        assert config["ssl.key.password"] == KEY_PASSWORD
        assert redacted(config)["ssl.key.password"] == "***"
    assert not any(secret in str(redacted(config)) for secret in SECRETS)


def test_librdkafka_accepts_the_config(case: tuple[str, dict[str, str]]) -> None:
    """Real clients: certificates load, the key's password opens it, mechanisms exist."""
    config = confluent_config(Settings().kafka)
    Producer(config).flush(0)
    Consumer({**config, "group.id": "g"}).close()
    AdminClient(config)
    if "ssl.key.password" in config:
        with pytest.raises(KafkaException, match=r"ssl\.key"):
            Producer({**config, "ssl.key.password": "not-the-password"})


def test_the_faust_credentials_carry_the_environment(case: tuple[str, dict[str, str]]) -> None:
    import faust
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    name, expected = case
    credentials = faust_credentials(Settings().kafka)
    auth = credentials_to_aiokafka_auth(credentials)  # what every aiokafka client is given
    assert auth["security_protocol"] == expected["security.protocol"]
    if name in SASL_CASES:
        assert isinstance(credentials, faust.SASLCredentials)
        assert auth["sasl_mechanism"] == expected["sasl.mechanism"]
        assert (auth["sasl_plain_username"], auth["sasl_plain_password"]) == (
            "trainer-7",
            SASL_PASSWORD,
        )
    else:
        assert isinstance(credentials, faust.SSLCredentials)
    context = auth.get("ssl_context")
    assert (context is not None) == ("SSL" in expected["security.protocol"])
    if context is not None:
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.check_hostname
    assert not any(secret in repr(credentials) for secret in SECRETS)


class _Recorded:
    """Stand-ins for confluent-kafka clients that record their config and do nothing."""

    configs: list[tuple[str, dict[str, Any]]]

    def __init__(self) -> None:
        self.configs = []

    def client(self, kind: str) -> type:
        recorder = self

        class Client:
            def __init__(self, config: dict[str, Any], **_options: Any) -> None:
                recorder.configs.append((kind, dict(config)))

            def list_topics(self, *_args: Any, **_kwargs: Any) -> Any:
                if kind == "reader":  # the SDK's reader thread: Kafka "unreachable"
                    raise KafkaException(KafkaError(KafkaError._TRANSPORT))
                return type("Metadata", (), {"topics": {}})()

            def create_topics(self, *_args: Any, **_kwargs: Any) -> dict[str, Any]:
                return {}

            def produce(self, *_args: Any, **_kwargs: Any) -> None:
                pass

            def poll(self, *_args: Any) -> None:
                return None

            def flush(self, *_args: Any) -> int:
                return 0

            def close(self) -> None:
                pass

        return Client


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> _Recorded:
    recorder = _Recorded()
    monkeypatch.setattr(fragrance_ops.admin, "AdminClient", recorder.client("admin"))
    monkeypatch.setattr(fragrance_ops.status, "Consumer", recorder.client("status"))
    monkeypatch.setattr(streams.output, "Producer", recorder.client("worker-output"))
    monkeypatch.setattr(streams.state, "Producer", recorder.client("worker-state"))
    monkeypatch.setattr(producers.transport, "Producer", recorder.client("sdk-producer"))
    monkeypatch.setattr(producers.transport, "Consumer", recorder.client("reader"))
    return recorder


def test_every_client_and_the_worker_get_the_security_settings(
    case: tuple[str, dict[str, str]], recorded: _Recorded
) -> None:
    from streams.app import create_app

    settings = Settings()
    wanted = security_keys(confluent_config(settings.kafka))
    create_contract_topics(settings.kafka, timeout_s=1)
    collect_status(settings, timeout_s=1)
    transport = KafkaTransport(settings)
    transport.reader(Topic.COMMANDS, b"run-1", "group").close()
    transport.close(0)
    app = create_app(settings)  # the worker: Faust (aiokafka), its state producer
    # The worker's output producers, one per codec, exist from their first record.
    output = OutputProducer(settings)
    for topic in (Topic.COMMANDS, Topic.REWARD_STATS, Topic.DEAD_LETTER):  # none, none, lz4
        asyncio.run(output.send(topic_name(topic, settings.kafka.topic_prefix), b"k", b"v"))
    kinds = [kind for kind, _ in recorded.configs]
    assert sorted(kinds) == [
        "admin",
        "reader",
        "sdk-producer",
        "status",
        *["worker-output"] * 2,
        "worker-state",
    ]
    for kind, config in recorded.configs:
        assert security_keys(config) == wanted, kind
    credentials = app.conf.broker_credentials
    assert credentials is not None
    assert credentials.protocol.value == settings.kafka.security_protocol


def test_secrets_never_reach_the_sdk_logs_even_at_debug(
    case: tuple[str, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        # librdkafka's own configuration dump and security debugging, through Python logging.
        transport = KafkaTransport(Settings(), extra_config={"debug": "conf,security,broker"})
        transport.produce("trainer.metrics", b"run-1", b"{}")
        transport.flush(0.5)
        transport.close(0)
    assert "producer config" in caplog.text  # the SDK's own line, redacted
    assert "Client configuration" in caplog.text  # librdkafka's, redacted by librdkafka
    for secret in SECRETS:
        assert secret not in caplog.text


def test_repr_and_the_settings_command_hide_every_secret(case: tuple[str, dict[str, str]]) -> None:
    settings = Settings()
    result = CliRunner().invoke(cli, ["settings"])
    assert result.exit_code == 0, result.output
    printed = orjson.loads(result.stdout)
    assert printed["security"]["command_signing_key"] == "**********"
    for secret in SECRETS:
        assert secret not in repr(settings)
        assert secret not in str(settings)
        assert secret not in result.output


def test_the_status_command_prints_no_secret(
    case: tuple[str, dict[str, str]], recorded: _Recorded
) -> None:
    runner = CliRunner()
    outputs = [runner.invoke(cli, ["status"]), runner.invoke(cli, ["status", "--json"])]
    for result in outputs:
        assert result.exit_code == 0, result.output
        assert "Training runs" in result.output or '"runs"' in result.output
        for secret in SECRETS:
            assert secret not in result.output
    assert [kind for kind, _ in recorded.configs] == ["status", "status"]  # secrets went in


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEX"}, "security_protocol"),
        ({"KAFKA__SASL_MECHANISM": "GSSAPI"}, "sasl_mechanism"),
        ({"KAFKA__SECURITY_PROTOCOL": "SASL_SSL", "KAFKA__SASL_USERNAME": ""}, "needs sasl"),
        ({"KAFKA__SSL_KEYFILE": "/k.pem"}, "needs ssl_certfile"),
        ({"SECURITY__REQUIRE_SIGNED_COMMANDS": "true"}, "needs command_signing_key"),
    ],
    ids=["protocol", "mechanism", "sasl-without-user", "key-without-cert", "require-without-key"],
)
def test_bad_security_settings_fail_naming_the_setting_but_no_secret(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    clear_environment(monkeypatch)
    monkeypatch.setenv(f"{ENV}KAFKA__SASL_PASSWORD", SASL_PASSWORD)
    monkeypatch.setenv(f"{ENV}KAFKA__SSL_KEY_PASSWORD", KEY_PASSWORD)
    for name, value in env.items():
        monkeypatch.setenv(f"{ENV}{name}", value)
    with pytest.raises(ValidationError, match=message) as raised:
        Settings()
    for secret in SECRETS:
        assert secret not in str(raised.value)


def test_a_trainer_cannot_override_connection_or_signing_settings_per_run() -> None:
    from config.settings import run_overrides

    for dotted in ("kafka.security_protocol", "security.require_signed_commands"):
        with pytest.raises(ValueError, match="unknown per-run setting"):
            run_overrides(Settings(), {dotted: "x"})
