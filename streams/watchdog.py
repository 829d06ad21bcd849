"""Per assigned input partition: consumer lag for the metrics, and the stall watchdog.

One timer reads the high watermarks of the worker's input partitions. The lag gauge is
what the group has not committed yet (as Kafka's own tools report it); the watchdog
compares them with the consumer's fetch positions, and watches every agent's batch in
progress, and crashes the worker when ``StallDetector`` says either has made no progress
for too long
(``rules/progress.py`` says why: a known Faust consumer hang after a broker
restart). A supervisor (Kubernetes, Compose's restart policy, systemd) restarts it; a
restart resumes at the committed offsets.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Hashable, Mapping

import faust
from faust.types import TP

from rules.progress import StallDetector
from streams.context import ProcessorContext
from streams.runtime import AgentRuntime

log = logging.getLogger(__name__)


class WorkerStalled(RuntimeError):
    """Input has waited on a partition with no progress for longer than the timeout."""


def watch_partitions(app: faust.App, runtime: AgentRuntime, ctx: ProcessorContext) -> None:
    """Register the timer (when lag is exported or the watchdog is on)."""
    settings = ctx.settings
    timeout_s = settings.worker.stall_timeout_s
    export_lag = settings.metrics.port is not None
    if timeout_s is None and not export_lag:
        return
    detector = StallDetector(timeout_s) if timeout_s is not None else None
    lag = ctx.metrics.consumer_lag
    inputs = runtime.input_topics
    interval_s = settings.metrics.lag_interval_s
    if timeout_s is not None:
        interval_s = min(interval_s, timeout_s / 4)
    # Longer than a tick may be: a slow answer is an answer, not an outage.
    request_timeout_s = max(interval_s, 5.0)

    async def measure() -> None:
        # Input topics only: changelog partitions are read, never committed by the group.
        assigned = {tp for tp in app.assignor.assigned_actives() if tp.topic in inputs}
        if app.rebalancing or not assigned:
            lag.clear()
            if detector is not None:
                # No progress is due while partitions move and tables recover (that took
                # 12 s in the long rebalance profile): the clocks start again after it.
                detector.unknown(time.monotonic())
            return
        # Faust keeps the committed offsets it knows in this mapping (0.15), None when
        # there is none yet.
        known: Mapping[TP, int | None] = getattr(app.consumer, "_committed_offset", {})
        committed = {tp: offset for tp, offset in known.items() if offset is not None}
        ordered = sorted(assigned)
        try:
            highwaters: Mapping[TP, int] = await asyncio.wait_for(
                app.consumer.highwaters(*ordered), timeout=request_timeout_s
            )
            # The next offset the consumer will fetch: past transaction markers (which no
            # stream ever sees), and stuck below the high watermark when fetching stopped.
            positions = await asyncio.wait_for(
                asyncio.gather(*(app.consumer.position(tp) for tp in ordered)),
                timeout=request_timeout_s,
            )
        except Exception as exc:  # the broker is away: nothing can be said about progress
            log.info("offsets unavailable: %s", exc)
            if detector is not None:
                detector.unknown(time.monotonic())
            return
        if export_lag:
            lag.clear()
            for tp, highwater in highwaters.items():
                lag.labels(tp.topic, str(tp.partition)).set(
                    max(0, highwater - committed.get(tp, 0))
                )
        if detector is None:
            return
        progress: dict[Hashable, tuple[int, int]] = {}
        for tp, position in zip(ordered, positions, strict=True):
            if position is None:
                continue  # a position being reset
            if tp in highwaters:
                progress[tp] = (position, highwaters[tp])
            # Fetched but never processed: the commit stays at the first such record. The
            # consumer reads again what it drops in a rebalance (streams/faust_fixes);
            # this is the backstop for any drop it does not know. A transaction marker at
            # a partition's end looks the same, so inputs written with transactions need
            # the watchdog off (none of our producers uses transactions).
            done = committed.get(tp)
            if done is not None and position > done:
                progress[f"{tp} commit"] = (done, position)
        # A batch in progress "waits" until the next one starts: a hung agent (outputs never
        # acknowledged, a lock never released) stalls while Faust keeps fetching ahead for it.
        for agent, serial in runtime.running_batches.items():
            progress[f"agent {agent}'s batch"] = (serial, serial + 1)
        stalls = detector.observe(time.monotonic(), progress)
        if stalls:
            described = "; ".join(stall.describe() for stall in stalls)
            log.critical("input stalled, crashing so the supervisor restarts me: %s", described)
            log.critical("where every task waited:\n%s", task_stacks())
            await app.crash(WorkerStalled(described))

    app.timer(interval_s)(measure)


def task_stacks() -> str:
    """Every asyncio task of the loop and where it waits: what a stall is diagnosed from."""
    described = io.StringIO()
    for task in asyncio.all_tasks():
        described.write(f"{task.get_name()}: {task.get_coro()!r}\n")
        task.print_stack(limit=8, file=described)
    return described.getvalue()
