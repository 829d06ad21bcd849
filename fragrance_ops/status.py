"""``fragrance-ops status``: what the operations layer currently says.

From the workers first (``ask_workers``): each worker answers, over HTTP, for the runs and
models whose partitions it owns (``streams.queries``: per run whether it is halted, its
attempt, rollbacks used and budget, pending rollback, kept and protected checkpoints,
reward window, entropy coefficient last sent, rating window progress; per model its
breaker), and names the other workers of its group, which are asked too. The workers
asked first are ``metrics.status_urls`` (default: the local worker, on ``metrics.port``).

When no worker answers, from the topics (``collect_status``):

- each LLM model's breaker: the newest ``llm.control`` event per model (the topic is
  compacted, so this is a full read of small data);
- each training run: its newest metric (step, attempt, loss, reward, entropy coefficient)
  and its newest command, from the last ``tail`` records of each partition of
  ``trainer.metrics`` and ``trainer.commands`` (runs silent for longer are not listed);
  whether it is halted (its newest halt command not followed by an accepted resume on
  ``ops.replies``), whether it finished (its newest record on ``trainer.runs`` is a finish)
  and whether it is stale (no metric for ``metrics.stale_run_after_s``, and not finished:
  a finished run is silent by design).

Reads up to the high watermarks taken at the start, with a consumer that joins no group
and commits nothing.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, TopicPartition

from config.kafka import CLIENT_LOGGER, check_reachable, confluent_config
from config.settings import Settings
from schemas import Topic, topic_name


def read_values(consumer: Consumer, topic: str, tail: int | None, timeout_s: float) -> list[bytes]:
    """Values of ``topic`` from ``tail`` records before the end (None: from the start)."""
    metadata = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
    if metadata is None or metadata.error is not None:
        return []
    assignment, ends = [], {}
    for partition in metadata.partitions:
        low, high = consumer.get_watermark_offsets(
            TopicPartition(topic, partition), timeout=timeout_s
        )
        if high > low:
            start = low if tail is None else max(low, high - tail)
            assignment.append(TopicPartition(topic, partition, start))
            ends[partition] = high
    consumer.assign(assignment)
    values: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while ends and time.monotonic() < deadline:
        for message in consumer.consume(1000, timeout=0.2):
            error = message.error()
            if error is not None and error.code() != KafkaError._PARTITION_EOF:
                raise RuntimeError(f"reading {topic}: {error.str()}")
            if error is not None:
                continue
            values.append(message.value() or b"")
            if (message.offset() or 0) + 1 >= ends.get(message.partition() or 0, 0):
                ends.pop(message.partition() or 0, None)
    consumer.unassign()
    return values


def _decoded(values: list[bytes]) -> list[dict[str, Any]]:
    """Contract events; anything undecodable is skipped (the worker dead-letters it)."""
    events = []
    for value in values:
        try:
            event = orjson.loads(value)
        except orjson.JSONDecodeError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def collect_status(
    settings: Settings, *, tail: int = 2000, timeout_s: float = 10.0
) -> dict[str, Any]:
    prefix = settings.kafka.topic_prefix
    consumer = Consumer(
        {
            **confluent_config(settings.kafka),
            "group.id": f"fragrance-ops-status-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        },
        logger=CLIENT_LOGGER,
    )
    try:
        check_reachable(consumer, settings.kafka, timeout_s)
        control = _decoded(
            read_values(consumer, topic_name(Topic.LLM_CONTROL, prefix), None, timeout_s)
        )
        metrics = _decoded(
            read_values(consumer, topic_name(Topic.METRICS, prefix), tail, timeout_s)
        )
        commands = _decoded(
            read_values(consumer, topic_name(Topic.COMMANDS, prefix), tail, timeout_s)
        )
        replies = _decoded(
            read_values(consumer, topic_name(Topic.OPERATOR_REPLIES, prefix), tail, timeout_s)
        )
        announcements = _decoded(
            read_values(consumer, topic_name(Topic.RUNS, prefix), tail, timeout_s)
        )
    finally:
        consumer.close()
    now = time.time()
    models: dict[str, dict[str, Any]] = {}
    for event in control:
        model = event.get("model")
        if isinstance(model, str) and event.get("epoch", 0) >= models.get(model, {}).get(
            "epoch", -1
        ):
            until = event.get("until")
            models[model] = {
                "state": event.get("state"),
                "mode": event.get("mode"),
                "cache_ttl_s": event.get("cache_ttl_s"),
                "until": until,
                "recovers_in_s": max(0.0, until - now) if isinstance(until, float | int) else None,
                "reason": event.get("reason"),
                "epoch": event.get("epoch", 0),
            }
    runs: dict[str, dict[str, Any]] = {}
    for event in metrics:
        run = runs.setdefault(str(event.get("run_id")), {})
        position = (event.get("attempt", 0), event.get("step", -1))
        if position >= (run.get("attempt", 0), run.get("step", -1)):
            run.update(
                step=event.get("step"),
                attempt=event.get("attempt", 0),
                loss=event.get("loss"),
                reward=event.get("reward"),
                entropy_coef=event.get("entropy_coef"),
                last_metric_ts=event.get("ts"),
            )
    halted_at: dict[str, float] = {}  # run -> when its newest halt was issued
    resumed_at: dict[str, float] = {}  # run -> when its newest accepted resume was answered
    for event in commands:
        run = runs.setdefault(str(event.get("run_id")), {})
        run["last_command"] = {
            key: event.get(key)
            for key in ("type", "issued_at", "reason", "entropy_coef", "checkpoint_step", "changes")
            if event.get(key) is not None
        }
        if event.get("type") == "set_entropy_coef" and run.get("entropy_coef") is None:
            run["entropy_coef"] = event.get("entropy_coef")
        if event.get("type") == "halt" and isinstance(event.get("issued_at"), float | int):
            halted_at[str(event.get("run_id"))] = event["issued_at"]
    for event in replies:
        if event.get("action") == "resume" and event.get("accepted") is True:
            resumed_at[str(event.get("run_id"))] = event.get("ts", 0.0)
    finished: dict[str, bool] = {}  # run -> whether its newest trainer.runs record is a finish
    for event in announcements:  # a run's records share a partition: in the run's order
        finished[str(event.get("run_id"))] = event.get("type") == "finished"
    stale_after = settings.metrics.stale_run_after_s
    for run_id, run in runs.items():
        halt = halted_at.get(run_id)
        run["halted"] = halt is not None and halt > resumed_at.get(run_id, -1.0)
        run["finished"] = finished.get(run_id, False)
        seen = run.get("last_metric_ts")
        run["silent_s"] = max(0.0, now - seen) if isinstance(seen, float | int) else None
        run["stale"] = not run["finished"] and (
            run["silent_s"] is None or run["silent_s"] > stale_after
        )
    return {"source": "topics", "models": models, "runs": runs, "at": now}


# Workers are asked directly, never through an HTTP proxy of the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get_json(url: str, timeout_s: float) -> Any:
    """The JSON a worker answers at ``url``; None when it does not answer (or not JSON)."""
    try:
        with _DIRECT.open(url, timeout=timeout_s) as response:
            return orjson.loads(response.read())
    except urllib.error.HTTPError as error:  # answered, but not the state: not a worker
        error.close()
        return None
    except (urllib.error.URLError, OSError, orjson.JSONDecodeError, ValueError):
        return None


def ask_workers(urls: Sequence[str], *, timeout_s: float = 3.0) -> dict[str, Any] | None:
    """The runs and models as the workers hold them (``/runs``, ``/models``); None when no
    worker answers. Every worker an answer names (the group's) is asked too, once."""
    pending = [url.rstrip("/") for url in urls]
    asked: set[str] = set()
    answered: list[str] = []
    unreachable: list[str] = []
    runs: dict[str, Any] = {}
    models: dict[str, Any] = {}
    rebalancing = False
    while pending:
        url = pending.pop(0)
        if url in asked:
            continue
        asked.add(url)
        listed_runs = _get_json(f"{url}/runs", timeout_s)
        listed_models = _get_json(f"{url}/models", timeout_s)
        if not isinstance(listed_runs, dict) or not isinstance(listed_models, dict):
            unreachable.append(url)
            continue
        answered.append(url)
        asked.add(str(listed_runs.get("worker", url)).rstrip("/"))  # its own name for itself
        runs.update(listed_runs.get("runs", {}))
        models.update(listed_models.get("models", {}))
        rebalancing = rebalancing or bool(listed_runs.get("rebalancing"))
        named = listed_runs.get("workers", []) + listed_models.get("workers", [])
        pending += [str(other).rstrip("/") for other in named if str(other) not in asked]
    if not answered:
        return None
    return {
        "source": "workers",
        "workers": answered,
        "unreachable": unreachable,
        "rebalancing": rebalancing,
        "models": models,
        "runs": runs,
        "at": time.time(),
    }


def collect(
    settings: Settings,
    *,
    worker_urls: Sequence[str] | None = None,
    topics: bool = False,
    tail: int = 2000,
    timeout_s: float = 10.0,
) -> dict[str, Any]:
    """From the workers (``worker_urls``, default ``metrics.status_urls`` or the local
    worker), else from the topics (``topics``: from the topics only)."""
    urls: Sequence[str] = []
    if not topics:
        urls = settings.metrics.worker_urls() if worker_urls is None else worker_urls
        answered = ask_workers(urls) if urls else None
        if answered is not None:
            return answered
    if not settings.kafka.bootstrap_servers:
        raise NoSource(
            "no worker answered and status needs a broker to read the topics: set "
            "KAFKA_BOOTSTRAP_SERVERS"
        )
    status = collect_status(settings, tail=tail, timeout_s=timeout_s)
    status["unanswered"] = list(urls)  # the workers asked first
    return status


class NoSource(RuntimeError):
    """Neither a worker nor a broker to ask."""


def render(status: dict[str, Any]) -> str:
    from_workers = status.get("source") == "workers"
    lines = []
    if from_workers:
        lines.append(f"From the workers: {', '.join(status['workers'])}")
        if status.get("unreachable"):
            lines.append(f"  not answering: {', '.join(status['unreachable'])}")
        if status.get("rebalancing"):
            lines.append("  (the group is rebalancing: some runs or models may be missing)")
    elif status.get("unanswered"):
        lines.append(f"From the topics (no worker answered: {', '.join(status['unanswered'])}):")
    else:
        lines.append("From the topics:")
    lines.append("LLM models:")
    for model, breaker in sorted(status["models"].items()):
        recovery = breaker["recovers_in_s"]
        lines.append(
            f"  {model}: {breaker['state']}, mode {breaker['mode']}, "
            f"cache TTL {breaker['cache_ttl_s']:g}s"
            + (f", next step in {recovery:.0f}s" if recovery is not None else "")
            + f" ({breaker['reason']})"
        )
    if not status["models"]:
        lines.append("  (none reported)")
    lines.append("Training runs:")
    for run_id, run in sorted(status["runs"].items()):
        if from_workers:
            lines.append(f"  {run_id}: {_held_run(run)}")
            continue
        command = run.get("last_command")
        entropy = run.get("entropy_coef")
        lines.append(
            f"  {run_id}: step {run.get('step')} (attempt {run.get('attempt', 0)}), "
            f"entropy_coef {entropy if entropy is not None else '?'}, "
            f"last command {command['type'] if command else 'none'}" + _flags(run)
        )
    if not status["runs"]:
        lines.append("  (none reported)")
    return "\n".join(lines)


def _held_run(run: dict[str, Any]) -> str:
    """One line for a run as its worker holds it (``streams.queries.RunState``)."""
    entropy = run.get("entropy_coef")
    rollbacks = run["rollbacks"]
    parts = [
        f"step {run.get('step')} (attempt {run.get('attempt')})",
        f"entropy_coef {entropy if entropy is not None else '?'}",
        f"rollbacks {rollbacks['used']}/{rollbacks['budget']}",
    ]
    pending = run.get("pending_rollback")
    if pending is not None:
        parts.append(f"rollback to step {pending['step']} pending")
    window = run["reward_window"]
    if window["count"]:
        mean, std, count = window["mean"], window["std"], window["count"]
        parts.append(f"reward mean {mean:.4g} std {std:.4g} (n={count})")
    kept = run["checkpoints"]["kept"]
    protected = run["checkpoints"]["protected"]
    parts.append(
        "checkpoints "
        + (", ".join(str(checkpoint["step"]) for checkpoint in kept) or "none")
        + (f" (protected {protected})" if protected is not None else "")
    )
    rating = run.get("rating_window")
    if rating is not None:
        parts.append(f"ratings {rating['size']}/{rating['min_window']}")
    return ", ".join(parts) + _flags(run)


def _flags(run: dict[str, Any]) -> str:
    """`` [halted, stale: silent for 412s]``: what needs a person's eye, from either source."""
    flags = [flag for flag in ("halted", "finished", "stale") if run.get(flag)]
    silent = run.get("silent_s")
    if run.get("stale") and silent is not None:
        flags[-1] = f"stale: silent for {silent:.0f}s"
    return f" [{', '.join(flags)}]" if flags else ""
