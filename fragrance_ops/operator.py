"""Operator requests: halt, resume, roll back or set the entropy of a run, and the answer.

The worker stays the only writer of ``trainer.commands`` (so command ids, signing and the
rollback budget keep working): a request goes to ``ops.requests``, keyed by run, so the
worker that owns the run reads it with the run's own events; the worker validates it
against the run's state, issues the command and answers on ``ops.replies`` (same key).
Each request has a fresh id and the commands it causes derive theirs from it, so a
request read twice acts once. Who asked and why travel with the request and its answer.

    with OperatorClient() as operator:
        reply = operator.resume("run-7", reason="fixed the data loader")
        print(reply.accepted, reply.detail)
"""

from __future__ import annotations

import getpass
import socket
import time
import uuid
from types import TracebackType
from typing import Self

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from config.kafka import (
    CLIENT_LOGGER,
    JAVA_COMPATIBLE_PARTITIONER,
    check_reachable,
    confluent_config,
)
from config.settings import Settings
from producers.partitioning import partition_for_key
from schemas import OperatorReply, OperatorRequest, Topic, decode, encode, topic_name
from schemas.events import OperatorAction
from schemas.signing import signature_header

#: A worker answers in milliseconds; one that is rebalancing or catching up, in seconds.
DEFAULT_TIMEOUT_S = 30.0


class NoAnswer(RuntimeError):
    """The request was not answered in time (no worker running, or not for these topics)."""


def default_requester() -> str:
    """Who asks, as recorded with the request: ``user@host``."""
    return f"{getpass.getuser()}@{socket.gethostname()}"


class OperatorClient:
    """Sends operator requests and waits for the worker's answers (a tool, not an SDK:
    it blocks, and raises ``NoAnswer`` or ``KafkaUnreachable``)."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        requested_by: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.settings = settings if settings is not None else Settings()
        self.requested_by = requested_by or default_requester()
        self.timeout_s = timeout_s
        kafka = self.settings.kafka
        config = confluent_config(kafka)
        self._producer = Producer(
            {**config, "enable.idempotence": True, "partitioner": JAVA_COMPATIBLE_PARTITIONER},
            logger=CLIENT_LOGGER,
        )
        self._replies = Consumer(
            {
                **config,
                "group.id": f"fragrance-ops-operator-{uuid.uuid4()}",  # joins no group: assigns
                "enable.auto.commit": False,
            },
            logger=CLIENT_LOGGER,
        )
        check_reachable(self._replies, kafka, min(timeout_s, 10.0))
        key = self.settings.security.command_signing_key
        self._signing_key = key.get_secret_value().encode() if key is not None else None

    def halt(self, run_id: str, *, reason: str) -> OperatorReply:
        return self.request("halt", run_id, reason=reason)

    def resume(self, run_id: str, *, reason: str) -> OperatorReply:
        return self.request("resume", run_id, reason=reason)

    def rollback(self, run_id: str, *, step: int, reason: str) -> OperatorReply:
        return self.request("rollback", run_id, reason=reason, step=step)

    def set_entropy(self, run_id: str, value: float, *, reason: str) -> OperatorReply:
        return self.request("set_entropy", run_id, reason=reason, value=value)

    def request(
        self,
        action: OperatorAction,
        run_id: str,
        *,
        reason: str,
        step: int | None = None,
        value: float | None = None,
    ) -> OperatorReply:
        """Send one request and return the worker's answer (``accepted`` or the reason)."""
        request = OperatorRequest(
            request_id=str(uuid.uuid4()),
            run_id=run_id,
            action=action,
            step=step,
            value=value,
            reason=reason,
            requested_by=self.requested_by,
            ts=time.time(),
        )
        deadline = time.monotonic() + self.timeout_s
        self._listen_from_now(run_id)
        key, payload = run_id.encode(), encode(request)
        headers: list[tuple[str, str | bytes | None]] | None = None
        if self._signing_key is not None:
            topic = Topic.OPERATOR_REQUESTS.value
            headers = [signature_header(self._signing_key, topic, key, payload)]
        prefix = self.settings.kafka.topic_prefix
        self._producer.produce(
            topic_name(Topic.OPERATOR_REQUESTS, prefix), key=key, value=payload, headers=headers
        )
        if self._producer.flush(max(deadline - time.monotonic(), 0.0)) > 0:
            raise NoAnswer(f"the request could not be written to Kafka within {self.timeout_s:g} s")
        while time.monotonic() < deadline:
            message = self._replies.poll(0.2)
            if message is None:
                continue
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                raise NoAnswer(f"reading the answers: {error.str()}")
            reply = decode(OperatorReply, message.value() or b"")
            if reply.request_id == request.request_id:
                return reply
        raise NoAnswer(
            f"no worker answered within {self.timeout_s:g} s: is `fragrance-ops worker` "
            f"running against {self.settings.kafka.bootstrap_servers} with topic prefix "
            f"{prefix!r}?"
        )

    def _listen_from_now(self, run_id: str) -> None:
        """Read the run's answers partition from its current end, before the request goes."""
        topic = topic_name(Topic.OPERATOR_REPLIES, self.settings.kafka.topic_prefix)
        metadata = self._replies.list_topics(topic, timeout=self.timeout_s).topics.get(topic)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            raise NoAnswer(f"topic {topic} does not exist: has a worker ever run here?")
        partition = partition_for_key(run_id.encode(), len(metadata.partitions))
        _, high = self._replies.get_watermark_offsets(
            TopicPartition(topic, partition), timeout=self.timeout_s
        )
        self._replies.assign([TopicPartition(topic, partition, high)])

    def close(self) -> None:
        self._replies.close()
        self._producer.flush(1.0)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
