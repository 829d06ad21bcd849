"""The Faust app: one worker process runs every processor.

Scale out by adding partitions (``kafka.partitions``) and worker processes with the same
``worker.app_id``: Kafka's group protocol and Faust's assignor share the partitions, and
each table's state moves with its partition.
"""

from __future__ import annotations

import logging
from typing import Any

import faust
from prometheus_client import start_http_server

from fragrance_ops.kafka import faust_credentials, require_bootstrap
from fragrance_ops.settings import Settings
from schemas import Topic, topic_name
from streams.agents import feedback, llm, training
from streams.context import ProcessorContext, RunSettingsCache
from streams.dead_letter import DeadLetterSink
from streams.metrics import WorkerMetrics
from streams.monitor import LeanMonitor
from streams.output import OutputProducer
from streams.rules.commands import COMMAND_TYPES
from streams.transport import WorkerApp
from streams.watchdog import input_topics, watch_partitions

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> faust.App:
    """Build the worker app for ``settings``."""
    kafka = settings.kafka
    worker = settings.worker
    extra: dict[str, Any] = {}
    if kafka.embedded_broker:
        extra["producer_max_batch_size"] = worker.embedded_producer_max_batch_size
    servers = require_bootstrap(kafka).split(",")
    app = WorkerApp(
        worker.app_id,
        broker=[f"kafka://{server}" for server in servers],
        broker_credentials=faust_credentials(kafka),
        monitor=LeanMonitor(),
        store="memory://",
        datadir=str(worker.data_dir),
        topic_partitions=kafka.partitions,
        topic_replication_factor=kafka.replication_factor,
        topic_allow_declare=True,
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
        processing_guarantee="at_least_once",
        broker_session_timeout=worker.session_timeout_s,
        broker_heartbeat_interval=worker.heartbeat_interval_s,
        web_enabled=worker.web_port is not None,
        web_port=worker.web_port or 6066,
        web_bind="127.0.0.1",
        # Only our own producers write the contract topics; Faust's table changelogs
        # and outputs go through aiokafka, whose idempotent producer fails on Tansu.
        producer_acks=-1,
        **(extra | worker.faust_options),
    )
    output = OutputProducer(settings)
    metrics = WorkerMetrics(settings.metrics.max_run_labels)
    context = ProcessorContext(
        app=app,
        settings=settings,
        output=output,
        dead_letters=DeadLetterSink(
            output, topic_name(Topic.DEAD_LETTER, kafka.topic_prefix), metrics
        ),
        run_settings=RunSettingsCache(settings),
        metrics=metrics,
    )
    training.register(context)
    llm.register(context)
    feedback.register(context)

    async def on_rebalance(*_args: Any, **_kwargs: Any) -> None:
        context.forget_partitions()

    app.on_partitions_revoked.connect(on_rebalance)
    serve_metrics(context)
    watch_partitions(context)
    return app


def serve_metrics(ctx: ProcessorContext) -> None:
    """``/metrics`` over HTTP."""
    app, settings = ctx.app, ctx.settings.metrics
    if settings.port is None:
        return
    metrics = ctx.metrics
    metrics.start_at_zero(input_topics(ctx), sorted(COMMAND_TYPES))

    async def on_rebalance(*_args: Any, **_kwargs: Any) -> None:
        metrics.forget_partition_state()

    app.on_partitions_revoked.connect(on_rebalance)

    async def start_metrics_server() -> None:
        try:
            server, _thread = start_http_server(
                settings.port or 0, settings.bind, registry=ctx.metrics.registry
            )
        except OSError as exc:  # processing matters more than its metrics: say so, go on
            log.error(
                "metrics endpoint not started on %s:%s: %s", settings.bind, settings.port, exc
            )
            return
        host, port = server.server_address[:2]
        log.warning("metrics on http://%s:%s/metrics", host, port)

    app.task(start_metrics_server)
