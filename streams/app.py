"""The Faust app: one worker process runs every processor.

Scale out by adding partitions (``kafka.partitions``) and worker processes with the same
``worker.app_id``: Kafka's group protocol and Faust's assignor share the partitions, and
each table's state moves with its partition.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, get_args

import faust
from faust.types import TP

from config.kafka import faust_credentials, require_bootstrap
from config.settings import OutputTopic, Settings
from schemas import Topic, topic_name
from schemas.events import CommandType
from streams.agents import register
from streams.agents.feedback import Feedback
from streams.agents.llm import Breakers
from streams.agents.training import TrainingAgent
from streams.context import ProcessorContext, RunSettingsCache
from streams.dead_letter import DeadLetterSink
from streams.faust_fixes import LeanMonitor, WorkerApp
from streams.http import StateRoutes, start_server
from streams.metrics import WorkerMetrics
from streams.output import OutputProducer
from streams.queries import StateQueries
from streams.runtime import AgentRuntime
from streams.state import StateWriter, state_tables
from streams.watchdog import watch_partitions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FaustAssignment:
    """The agents' ``Assignment``: the partitions Faust's assignor gave this worker."""

    app: faust.App

    @property
    def rebalancing(self) -> bool:
        rebalancing: bool = self.app.rebalancing
        return rebalancing

    def assigned_actives(self) -> AbstractSet[TP]:
        assigned: AbstractSet[TP] = self.app.assignor.assigned_actives()
        return assigned


def create_app(settings: Settings) -> faust.App:
    """Build the worker app for ``settings``."""
    kafka = settings.kafka
    worker = settings.worker
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
        producer_acks=-1,
        **advertised(settings),
        **({"broker_max_poll_records": worker.batch_max_events} | worker.faust_options),
    )
    app.fetch_with(settings)
    output = OutputProducer(settings)
    metrics = WorkerMetrics(settings.metrics.max_run_labels)
    runtime = app.runtime = AgentRuntime(app, output, StateWriter(settings), metrics)
    context = ProcessorContext(
        settings=settings,
        output=output,
        dead_letters=DeadLetterSink(
            output, topic_name(Topic.DEAD_LETTER, kafka.topic_prefix), metrics
        ),
        run_settings=RunSettingsCache(settings),
        metrics=metrics,
        checkpoints=runtime,
        assignment=FaustAssignment(app),
    )
    stores = state_tables(app, settings)
    training, breakers, feedback = agents = (
        TrainingAgent(context, stores),
        Breakers(context, stores),
        Feedback(context, stores),
    )
    for agent in agents:
        register(app, runtime, agent)
    queries = StateQueries(app, training, breakers, feedback)

    async def on_rebalance(*_args: Any, **_kwargs: Any) -> None:
        context.forget_partitions()

    app.on_partitions_revoked.connect(on_rebalance)
    serve_http(app, runtime, context, queries)
    watch_partitions(app, runtime, context)
    app.task(freeze_startup_objects)

    async def connect_outputs() -> None:
        # Every output topic's producer connected before the first decision needs it.
        topics = [topic_name(Topic(name), kafka.topic_prefix) for name in get_args(OutputTopic)]
        await output.connect(topics)

    app.task(connect_outputs)

    return app


async def freeze_startup_objects() -> None:
    """Once started (tables recovered): keep the objects alive since start-up out of the
    collector's scans. A full collection over them (Faust's, aiokafka's, pydantic's) paused
    the worker for 50-90 ms at a time, the tail of every decision's latency; what is
    created after start-up (the agents' live state) is still collected."""
    gc.collect()
    gc.freeze()


def advertised(settings: Settings) -> dict[str, Any]:
    """Faust's ``canonical_url``, which its assignor tells every worker of the group: this
    worker's HTTP server (``metrics.url``), where the others route state requests for the
    keys it owns. None when its port is not known before it binds (0) or it has none."""
    url = settings.metrics.advertised_url()
    return {"canonical_url": url} if url is not None else {}


def serve_http(
    app: faust.App, runtime: AgentRuntime, ctx: ProcessorContext, queries: StateQueries
) -> None:
    """``/metrics``, ``/runs`` and ``/models`` over HTTP (``streams.http``)."""
    settings = ctx.settings.metrics
    if settings.port is None:
        return
    metrics = ctx.metrics
    metrics.start_at_zero(sorted(runtime.input_topics), sorted(get_args(CommandType)))

    async def on_rebalance(*_args: Any, **_kwargs: Any) -> None:
        metrics.forget_partition_state()

    app.on_partitions_revoked.connect(on_rebalance)

    async def start_metrics_server() -> None:
        try:
            server = start_server(
                settings.bind,
                settings.port or 0,
                ctx.metrics.registry,
                StateRoutes(queries),
                queries.own_url,
            )
        except OSError as exc:  # processing matters more than its metrics: say so, go on
            log.error(
                "metrics endpoint not started on %s:%s: %s", settings.bind, settings.port, exc
            )
            return
        host, port = str(server.server_address[0]), server.server_address[1]
        url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        queries.serving_at = url
        log.warning("metrics on %s/metrics, state on /runs and /models", url)

    app.task(start_metrics_server)
