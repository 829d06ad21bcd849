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

**Quiet fetches.** A fetch waits for a batch (``fetch_min_bytes``, at most
``fetch_max_wait_ms``) while records flow. After a response that brought nothing, the next
fetch asks for one byte and may be held ``quiet_wait_ms``: the broker answers it at the
first record, so an event after a quiet spell is read at once, and a quiet consumer makes
a couple of fetches a second instead of one per ``fetch_max_wait_ms`` (each costs it about
0.5 ms of CPU). The next fetch batches again. Only sessions tell a quiet response (it
names no partition), so a broker without them keeps batched fetches.

**The decisions per fetch** (``SessionFetcher._get_actions_per_node``): aiokafka's, made
in one pass; its own pass was about 40% of the worker's CPU at a trainer's pace.

The responses go through aiokafka's own handling unchanged: the request object answers
``topics`` with every partition of the session, so a response's partitions are matched
with the positions they were fetched from. Partitions a response leaves out were fetched
too: their fetch timestamp (Faust's livelock check reads it) is refreshed.

Tested by ``tests/test_streams/test_faust_fixes/test_fetch_sessions.py``.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
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
    quiet: bool = False  # the last response brought nothing: wait for the first record

    def reset(self) -> None:
        self.session_id, self.epoch, self.quiet = 0, 0, False
        self.partitions.clear()


def _by_topic(
    positions: dict[TopicPartition, _Position],
) -> list[tuple[str, list[tuple[int, int, int]]]]:
    grouped: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for tp, (offset, max_bytes) in positions.items():
        grouped[tp.topic].append((tp.partition, offset, max_bytes))
    return list(grouped.items())


@dataclass(frozen=True)
class _FetchLimits:
    """What every fetch of a fetcher asks for, from the consumer's settings."""

    max_wait_ms: int
    min_bytes: int
    max_bytes: int
    max_partition_bytes: int
    isolation_level: int
    rack_id: str


def _is_paused(assignment: Any, tp: TopicPartition) -> bool:
    state = assignment.state_value(tp)
    return state is not None and bool(state.paused)


class _SessionFetchRequest(FetchRequest):  # type: ignore[misc]  # aiokafka is untyped
    """One fetch of a session: sends the changes; ``topics`` is every partition fetched."""

    def __init__(
        self, wanted: dict[TopicPartition, _Position], session: _Session, limits: _FetchLimits
    ) -> None:
        self.wanted = wanted
        self.session_id, self.epoch = session.session_id, session.epoch
        if session.session_id:
            changed = {tp: p for tp, p in wanted.items() if session.partitions.get(tp) != p}
            forgotten = {tp: (0, 0) for tp in session.partitions if tp not in wanted}
        else:  # a full fetch: in random order, as aiokafka's, for fairness under fetch_max_bytes
            changed, forgotten = dict(random.sample(list(wanted.items()), len(wanted))), {}
        super().__init__(
            limits.max_wait_ms,
            limits.min_bytes,
            limits.max_bytes,
            limits.isolation_level,
            _by_topic(changed),
            rack_id=limits.rack_id,
        )
        self._forgotten = [
            (topic, [partition for partition, _, _ in partitions])
            for topic, partitions in _by_topic(forgotten)
        ]

    @property
    def topics(self) -> list[tuple[str, list[tuple[int, int, int]]]]:
        return _by_topic(self.wanted)

    def build(self, request_struct_class: Any) -> Any:
        if request_struct_class.API_VERSION < 7:  # no sessions: a full fetch
            self._topics = _by_topic(self.wanted)
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

    def __init__(
        self, client: Any, subscriptions: Any, quiet_wait_ms: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(client, subscriptions, **kwargs)
        self._client = _SessionClient(client, self)
        self._sessions: dict[int, _Session] = {}
        self._session_assignment: Any = None
        self._timestamps_refreshed = 0.0
        self._limits = _FetchLimits(
            max_wait_ms=self._fetch_max_wait_ms,
            min_bytes=self._fetch_min_bytes,
            max_bytes=self._fetch_max_bytes,
            max_partition_bytes=self._max_partition_fetch_bytes,
            isolation_level=self._isolation_level,
            rack_id=self._client_rack or "",
        )
        # After an empty response: answered at the first byte, held up to quiet_wait_ms.
        self._quiet_limits = (
            self._limits
            if quiet_wait_ms is None
            else replace(self._limits, min_bytes=1, max_wait_ms=quiet_wait_ms)
        )

    @classmethod
    def for_consumer(
        cls, consumer: AIOKafkaConsumer, quiet_wait_ms: int | None = None
    ) -> SessionFetcher:
        """Made as ``AIOKafkaConsumer.start`` makes its fetcher, from the consumer's settings;
        a fetch after an empty response waits ``quiet_wait_ms`` for its first record."""
        return cls(
            consumer._client,
            consumer._subscription,
            quiet_wait_ms,
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
        """aiokafka's ``Fetcher._get_actions_per_node``, the same decisions made in one lean
        pass, with the fetches made as session requests.

        aiokafka's loop runs at every wake-up of its fetch routine (a fetch answered,
        records consumed), over every assigned partition, calling half a dozen methods
        and a debug log per partition and building a full request to be diffed: about
        40% of the worker's CPU at a trainer's pace. Per partition, in aiokafka's order:
        records not yet consumed hold back their node's fetch (for their backoff); a node
        with a fetch in flight is left alone; no leader asks for metadata; no position
        asks for a reset (at the leader); paused waits for a resume; else it is fetched.
        """
        if assignment is not self._session_assignment:  # a rebalance: start afresh
            self._session_assignment = assignment
            for session in self._sessions.values():
                session.reset()
        records = self._records
        in_flight = self._in_flight
        preferred = self._preferred_read_replica
        cluster = self._client.cluster
        max_partition_bytes = self._limits.max_partition_bytes
        fetchable: dict[int, dict[TopicPartition, _Position]] = defaultdict(dict)
        awaiting_reset: dict[int, list[TopicPartition]] = defaultdict(list)
        backoff_by_nodes: dict[int, list[float]] = defaultdict(list)
        resume_futures = []
        invalid_metadata = False
        for tp, tp_state in assignment._tp_state.items():
            if preferred:
                node_id = self._select_read_replica(tp)
            else:
                node_id = cluster.leader_for_partition(tp)
            if tp in records:
                backoff = records[tp].calculate_backoff()
                if backoff:
                    backoff_by_nodes[node_id].append(backoff)
            elif node_id in in_flight:
                continue
            elif node_id is None or node_id == -1:
                invalid_metadata = True
            elif not tp_state.has_valid_position:
                leader_id = cluster.leader_for_partition(tp)
                if leader_id is None or leader_id == -1:
                    invalid_metadata = True
                else:
                    awaiting_reset[leader_id].append(tp)
            elif tp_state.paused:
                resume_futures.append(tp_state.resume_fut)
            else:
                fetchable[node_id][tp] = (tp_state.position, max_partition_bytes)
        fetch_requests = [
            (node_id, self.fetch_request(node_id, wanted))
            for node_id, wanted in fetchable.items()
            if node_id not in backoff_by_nodes and node_id not in awaiting_reset
        ]
        if backoff_by_nodes:  # until the first node is ready to fetch again
            timeout = min(map(max, backoff_by_nodes.values()))
        else:
            timeout = self._fetcher_timeout
        return fetch_requests, awaiting_reset, timeout, invalid_metadata, resume_futures

    async def _proc_fetch_request(self, assignment: Any, node_id: int, request: Any) -> bool:
        """aiokafka's, letting go what a fetch brought of a partition paused while it was
        in flight: unread (``getmany`` skips paused partitions), it would hold back every
        next fetch of its node for the retry backoff (``consumer.py``, pauses)."""
        needs_wakeup: bool = await super()._proc_fetch_request(assignment, node_id, request)
        records = self._records
        for tp in [tp for tp in records if _is_paused(assignment, tp)]:
            del records[tp]
        return needs_wakeup

    def fetch_request(
        self, node_id: int, wanted: dict[TopicPartition, _Position]
    ) -> _SessionFetchRequest:
        """The next fetch of ``node_id``'s session: a batch, or after nothing, a quiet one."""
        session = self.session(node_id)
        limits = self._quiet_limits if session.quiet else self._limits
        return _SessionFetchRequest(wanted, session, limits)

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
        # Only partitions with records or news come back in a session.
        session.quiet = not response.topics
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
