"""``fragrance-ops status``: what the operations layer currently says, read from Kafka.

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
import uuid
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
    return {"models": models, "runs": runs, "at": now}


def render(status: dict[str, Any]) -> str:
    lines = ["LLM models:"]
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
        command = run.get("last_command")
        entropy = run.get("entropy_coef")
        flags = [flag for flag in ("halted", "finished", "stale") if run.get(flag)]
        silent = run.get("silent_s")
        if run.get("stale") and silent is not None:
            flags[-1] = f"stale: silent for {silent:.0f}s"
        lines.append(
            f"  {run_id}: step {run.get('step')} (attempt {run.get('attempt', 0)}), "
            f"entropy_coef {entropy if entropy is not None else '?'}, "
            f"last command {command['type'] if command else 'none'}"
            + (f" [{', '.join(flags)}]" if flags else "")
        )
    if not status["runs"]:
        lines.append("  (none reported)")
    return "\n".join(lines)
