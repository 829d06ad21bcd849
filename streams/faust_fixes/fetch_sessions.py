"""aiokafka's fetcher with incremental fetch sessions (KIP-227).

aiokafka sends every fetch as a full one (``FetchRequest.build``: session id 0, epoch -1):
each request names every assigned partition with its position, and each response carries
every one of them back, decoded field by field in Python. The worker reads about 56
partitions (7 input topics of 8): a fetch round trip cost it about 0.8 ms of CPU however
few records it brought, which at a trainer's pace (one fetch per few records) was most of
the worker's CPU per event, and at idle, with the broker holding each fetch for
``worker.batch_within_s``, 160 ms of CPU a second.

In a fetch session the broker remembers the partitions and their positions: a request
names only the partitions added or moved since the last one (and those to forget), and a
response carries only the partitions with records or news (high watermark, log start,
error). An idle fetch is then a few dozen bytes each way.

How this client keeps a session, per node, as the Java client's ``FetchSessionHandler``
does:

- the first fetch opens one (session 0, epoch 0); a broker that declines (session id 0
  in the response, or no FetchRequest v7) keeps getting full fetches;
- each next request: the partitions whose position (or size) differs from what the broker
  holds, and the ones it holds that are not wanted now (aiokafka leaves out a partition
  whose records are not consumed yet, or paused) as forgotten; epoch + 1;
- any error (a top-level one like FETCH_SESSION_ID_NOT_FOUND, a failed or cancelled
  send, an assignment change) drops the session: the next fetch is a full one.

The responses go through aiokafka's own handling unchanged: the request object answers
``topics`` with every partition of the session, so a response's partitions are matched
with the positions they were fetched from. Partitions a response leaves out were fetched
too: their fetch timestamp (Faust's livelock check reads it) is refreshed.

Tested by ``tests/test_streams/test_faust_fixes/test_fetch_sessions.py``.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.consumer.fetcher import Fetcher
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.structs import TopicPartition

log = logging.getLogger(__name__)

_MAX_EPOCH = 2**31 - 1

#: (fetch offset, max bytes) of one partition, as a fetch names it.
_Position = tuple[int, int]


@dataclass
class _Session:
    """What the broker holds for this client's session with one node."""

    session_id: int = 0  # 0: no session; the next fetch is a full one, opening one
    epoch: int = 0  # of the next request
    partitions: dict[TopicPartition, _Position] = field(default_factory=dict)

    def reset(self) -> None:
        self.session_id, self.epoch = 0, 0
        self.partitions.clear()


def _by_topic(
    positions: dict[TopicPartition, _Position],
) -> list[tuple[str, list[tuple[int, int, int]]]]:
    grouped: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for tp, (offset, max_bytes) in positions.items():
        grouped[tp.topic].append((tp.partition, offset, max_bytes))
    return list(grouped.items())


class _SessionFetchRequest(FetchRequest):  # type: ignore[misc]  # aiokafka is untyped
    """One fetch of a session: sends the changes; ``topics`` is every partition fetched."""

    def __init__(self, full: FetchRequest, session: _Session) -> None:
        self.wanted: dict[TopicPartition, _Position] = {
            TopicPartition(topic, partition): (offset, max_bytes)
            for topic, partitions in full.topics
            for partition, offset, max_bytes in partitions
        }
        self.session_id, self.epoch = session.session_id, session.epoch
        if session.session_id:
            changed = {tp: p for tp, p in self.wanted.items() if session.partitions.get(tp) != p}
            forgotten = {tp: (0, 0) for tp in session.partitions if tp not in self.wanted}
        else:
            changed, forgotten = self.wanted, {}
        super().__init__(
            full._max_wait_ms,
            full._min_bytes,
            full._max_bytes,
            full._isolation_level,
            _by_topic(changed),
            rack_id=full._rack_id,
        )
        self._everything = full.topics
        self._forgotten = [
            (topic, [partition for partition, _, _ in partitions])
            for topic, partitions in _by_topic(forgotten)
        ]

    @property
    def topics(self) -> list[tuple[str, list[tuple[int, int, int]]]]:
        everything: list[tuple[str, list[tuple[int, int, int]]]] = self._everything
        return everything

    def build(self, request_struct_class: Any) -> Any:
        if request_struct_class.API_VERSION < 7:  # no sessions: a full fetch
            self._topics = self._everything
            return super().build(request_struct_class)
        struct = super().build(request_struct_class)
        struct.__dict__["session_id"] = self.session_id
        struct.__dict__["session_epoch"] = self.epoch
        struct.__dict__["forgotten_topics_data"] = self._forgotten
        return struct


class _SessionClient:
    """The fetcher's view of the client: fetches of a session update it with the outcome."""

    def __init__(self, client: Any, fetcher: SessionFetcher) -> None:
        self._client = client
        self._fetcher = fetcher

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def send(self, node_id: int, request: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(request, _SessionFetchRequest):
            return await self._client.send(node_id, request, *args, **kwargs)
        try:
            response = await self._client.send(node_id, request, *args, **kwargs)
        except BaseException:
            self._fetcher.session(node_id).reset()  # whether the broker saw it is unknown
            raise
        self._fetcher.on_session_response(node_id, request, response)
        return response


class SessionFetcher(Fetcher):  # type: ignore[misc]  # aiokafka is untyped
    """aiokafka's ``Fetcher``, fetching in incremental sessions."""

    def __init__(self, client: Any, subscriptions: Any, **kwargs: Any) -> None:
        super().__init__(client, subscriptions, **kwargs)
        self._client = _SessionClient(client, self)
        self._sessions: dict[int, _Session] = {}
        self._session_assignment: Any = None
        self._timestamps_refreshed = 0.0

    @classmethod
    def for_consumer(cls, consumer: AIOKafkaConsumer) -> SessionFetcher:
        """Made as ``AIOKafkaConsumer.start`` makes its fetcher, from the consumer's settings."""
        return cls(
            consumer._client,
            consumer._subscription,
            key_deserializer=consumer._key_deserializer,
            value_deserializer=consumer._value_deserializer,
            fetch_min_bytes=consumer._fetch_min_bytes,
            fetch_max_bytes=consumer._fetch_max_bytes,
            fetch_max_wait_ms=consumer._fetch_max_wait_ms,
            max_partition_fetch_bytes=consumer._max_partition_fetch_bytes,
            check_crcs=consumer._check_crcs,
            fetcher_timeout=consumer._consumer_timeout,
            retry_backoff_ms=consumer._retry_backoff_ms,
            auto_offset_reset=consumer._auto_offset_reset,
            isolation_level=consumer._isolation_level,
            client_rack=consumer._client_rack,
        )

    def session(self, node_id: int) -> _Session:
        return self._sessions.setdefault(node_id, _Session())

    def _get_actions_per_node(self, assignment: Any) -> Any:
        if assignment is not self._session_assignment:  # a rebalance: start afresh
            self._session_assignment = assignment
            for session in self._sessions.values():
                session.reset()
        fetch_requests, *others = super()._get_actions_per_node(assignment)
        fetch_requests = [
            (node_id, _SessionFetchRequest(request, self.session(node_id)))
            for node_id, request in fetch_requests
        ]
        return (fetch_requests, *others)

    def on_session_response(
        self, node_id: int, request: _SessionFetchRequest, response: Any
    ) -> None:
        session = self.session(node_id)
        if response.API_VERSION < 7 or response.error_code or not response.session_id:
            if response.API_VERSION >= 7 and response.error_code:
                log.info("fetch session with node %s ended: error %d", node_id, response.error_code)
            session.reset()
            return
        session.session_id = response.session_id
        session.epoch = request.epoch + 1 if request.epoch < _MAX_EPOCH else 1
        session.partitions = dict(request.wanted)
        # Faust's livelock check reads when each partition was last fetched (it speaks up
        # after minutes); a response names only the partitions with news.
        now = time.time()
        assignment = self._subscriptions.subscription.assignment
        if assignment is not None and now - self._timestamps_refreshed >= 1.0:
            self._timestamps_refreshed = now
            for tp in request.wanted:
                state = assignment.state_value(tp)
                if state is not None:
                    state.timestamp = int(1000 * now)
