"""Corrections of Faust and aiokafka internals, in one place.

Each module names the upstream behaviour it corrects and the test that covers it:

- ``consumer``: aiokafka's consumer served on the worker's loop, not in a thread of its
  own; whole fetches handed to the agents' runtime instead of Faust's per-record path;
  offsets committed behind checkpointed state; the broker holding a fetch for a batch;
  records dropped before a seek back read again; never-committed partitions read from
  their beginning; a partition Faust pauses paused in aiokafka too.
- ``fetch_sessions``: aiokafka's fetcher with Kafka's incremental fetch sessions
  (KIP-227), which aiokafka lacks: an idle fetch names no partitions; after an empty
  fetch, one answered at the first record; aiokafka's per-fetch decisions in one lean
  pass.
- ``monitor``: Faust's per-event monitor bookkeeping skipped.
- ``worker``: Faust's worker without the spinner that set the root logger to DEBUG.

They rely on private names of faust-streaming 0.15 and aiokafka 0.14 (pinned in
``pyproject.toml``), listed in ``PRIVATE_NAMES``:
``tests/test_streams/test_faust_fixes/test_private_names.py`` fails when an upgrade
removes one.
"""

from __future__ import annotations

from streams.faust_fixes.consumer import WorkerApp
from streams.faust_fixes.monitor import LeanMonitor
from streams.faust_fixes.worker import QuietWorker

#: (module, class, attribute) of every private name the corrections use or override.
PRIVATE_NAMES: tuple[tuple[str, str, str], ...] = (
    # consumer.py: Faust's consumer and its aiokafka driver.
    ("faust.transport.consumer", "Consumer", "_drain_messages"),
    ("faust.transport.consumer", "Consumer", "_wait_next_records"),
    ("faust.transport.consumer", "Consumer", "_new_offset"),
    ("faust.transport.consumer", "Consumer", "_filter_tps_with_pending_acks"),
    ("faust.transport.consumer", "Consumer", "_to_message"),
    ("faust.transport.consumer", "Consumer", "_read_offset"),
    ("faust.transport.consumer", "Consumer", "_buffered_partitions"),
    ("faust.transport.consumer", "Consumer", "_committed_offset"),
    ("faust.transport.drivers.aiokafka", "Consumer", "_new_consumer_thread"),
    ("faust.transport.drivers.aiokafka", "Transport", "Consumer"),
    ("faust.transport.drivers.aiokafka", "AIOKafkaConsumerThread", "_create_consumer"),
    ("faust.transport.drivers.aiokafka", "AIOKafkaConsumerThread", "_fetch_records"),
    ("faust.transport.drivers.aiokafka", "AIOKafkaConsumerThread", "_ensure_consumer"),
    ("faust.transport.drivers.aiokafka", "AIOKafkaConsumerThread", "_consumer"),
    ("faust.app.base", "App", "_new_transport"),
    ("mode.threads", "ServiceThread", "_thread_started"),
    ("mode.threads", "ServiceThread", "_thread_running"),
    ("mode.threads", "ServiceThread", "_serve"),
    ("mode.threads", "ServiceThread", "_gather_remaining_tasks"),
    ("mode.threads", "ServiceThread", "parent_loop"),
    ("aiokafka.consumer.consumer", "AIOKafkaConsumer", "_fetch_min_bytes"),
    ("aiokafka.consumer.consumer", "AIOKafkaConsumer", "_fetch_max_wait_ms"),
    ("mode.services", "Service", "_stopped"),
    # fetch_sessions.py: aiokafka's fetcher, built from its consumer's settings.
    ("aiokafka.consumer.consumer", "AIOKafkaConsumer", "_fetcher"),
    ("aiokafka.consumer.fetcher", "Fetcher", "_client"),
    ("aiokafka.consumer.fetcher", "Fetcher", "_subscriptions"),
    ("aiokafka.consumer.fetcher", "Fetcher", "_get_actions_per_node"),
    ("aiokafka.consumer.fetcher", "Fetcher", "_proc_fetch_request"),
    *(
        ("aiokafka.consumer.fetcher", "Fetcher", name)
        for name in (
            "_records",
            "_in_flight",
            "_preferred_read_replica",
            "_select_read_replica",
            "_fetcher_timeout",
            "_fetch_min_bytes",
            "_fetch_max_bytes",
            "_fetch_max_wait_ms",
            "_max_partition_fetch_bytes",
            "_isolation_level",
            "_client_rack",
        )
    ),
    ("aiokafka.consumer.subscription_state", "Assignment", "_tp_state"),
    ("aiokafka.protocol.fetch", "FetchRequest", "build"),
    ("aiokafka.protocol.fetch", "FetchRequest", "_topics"),
    *(
        ("aiokafka.consumer.consumer", "AIOKafkaConsumer", name)
        for name in (
            "_client",
            "_subscription",
            "_key_deserializer",
            "_value_deserializer",
            "_fetch_max_bytes",
            "_max_partition_fetch_bytes",
            "_check_crcs",
            "_consumer_timeout",
            "_retry_backoff_ms",
            "_auto_offset_reset",
            "_isolation_level",
            "_client_rack",
        )
    ),
)

__all__ = ["PRIVATE_NAMES", "LeanMonitor", "QuietWorker", "WorkerApp"]
