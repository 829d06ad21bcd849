"""The demo: the whole system in one command, every printed line from a real event.

A worker process, then three parties that talk to it only through Kafka:

- the reference PPO trainer (``producers.reference``) on the fragrance-formula environment,
  with a fault injected after its second checkpoint, so a rollback happens;
- a simulated LLM service (``producers.llm``) whose model fails three times in a row early
  on, so the breaker downshifts, then recovers through probes;
- a simulated rating app (``producers.ratings``) that sends 100 low, spread-out ratings for
  the trainer's run, so a retune is proposed and the trainer applies it.

An observer reads the worker's outputs (reward statistics, commands, checkpoints, control
events) and prints the operations guide's milestones as they happen, a live view on a
terminal, a summary, and a timeline picture (PNG).
"""

from __future__ import annotations

import contextlib
import logging
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Queue
from typing import Any

import orjson
from confluent_kafka import OFFSET_END, Consumer, TopicPartition
from rich.console import Console
from rich.live import Live
from rich.table import Table

from config.kafka import confluent_config
from config.settings import Settings
from fragrance_ops.admin import create_contract_topics
from fragrance_ops.worker_process import WorkerProcess, worker_env
from producers import RatingClient, TrainerClient
from producers.llm import LlmClient
from schemas import Topic, topic_name

MODEL = "qwen-fragrance"
OPEN_S = 6.0  # the demo's downshift hold (the guide's 5 minutes would outlast the demo)
RATING_COUNTS = {1: 55, 2: 5, 3: 5, 4: 5, 5: 30}  # mean 2.5, variance 3.25: two rules fire
STEP_PACE_S = 0.004  # a training step's floor, so the run lasts long enough to watch
DEADLINE_S = 170.0
OBSERVED = (
    Topic.REWARD_STATS,
    Topic.COMMANDS,
    Topic.CHECKPOINTS,
    Topic.LLM_CONTROL,
    Topic.DEAD_LETTER,
)


class _Stopped(Exception):
    """Raised inside a party's loop when the demo is stopping."""


@dataclass
class Timeline:
    """What the observer saw; the live view, the summary and the picture read it."""

    run_id: str
    steps: int
    started: float = field(default_factory=time.time)
    reward: list[tuple[float, int, float, float, float, float]] = field(default_factory=list)
    entropy: list[tuple[float, float]] = field(default_factory=list)
    checkpoints: list[tuple[float, int]] = field(default_factory=list)
    rollbacks: list[tuple[float, int, int, str]] = field(default_factory=list)
    retunes: list[tuple[float, dict[str, float], int]] = field(default_factory=list)
    modes: list[tuple[float, str, str, float, float | None]] = field(default_factory=list)
    commands: Counter[str] = field(default_factory=Counter)
    dead_letters: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Observer:
    """Reads the worker's outputs for this demo's run and model; queues milestone lines."""

    def __init__(self, settings: Settings, timeline: Timeline) -> None:
        self.timeline = timeline
        self.lines: Queue[str] = Queue()
        self._prefix = settings.kafka.topic_prefix
        self._consumer = Consumer(
            {
                **confluent_config(settings.kafka),
                "group.id": f"fragrance-ops-demo-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
            }
        )
        assignment = []
        for topic in OBSERVED:
            name = topic_name(topic, self._prefix)
            partitions = self._consumer.list_topics(name, timeout=10).topics[name].partitions
            assignment += [TopicPartition(name, p, OFFSET_END) for p in partitions]
        self._consumer.assign(assignment)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-observer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._consumer.close()

    def _run(self) -> None:
        handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            topic_name(Topic.REWARD_STATS, self._prefix): self._on_stats,
            topic_name(Topic.COMMANDS, self._prefix): self._on_command,
            topic_name(Topic.CHECKPOINTS, self._prefix): self._on_checkpoint,
            topic_name(Topic.LLM_CONTROL, self._prefix): self._on_control,
        }
        dead_letters = topic_name(Topic.DEAD_LETTER, self._prefix)
        while not self._stop.is_set():
            for message in self._consumer.consume(1000, timeout=0.1):
                if message.error() is not None:
                    continue
                if message.topic() == dead_letters:
                    with self.timeline.lock:
                        self.timeline.dead_letters += 1
                    continue
                event = orjson.loads(message.value() or b"{}")
                handler = handlers.get(message.topic() or "")
                if handler is not None and event.get("run_id", event.get("model")) in (
                    self.timeline.run_id,
                    MODEL,
                ):
                    with self.timeline.lock:
                        handler(event)

    def _at(self, event: dict[str, Any], key: str = "ts") -> float:
        return float(event.get(key, time.time())) - self.timeline.started

    def _on_stats(self, event: dict[str, Any]) -> None:
        self.timeline.reward.append(
            (
                self._at(event),
                event["step"],
                event["reward"],
                event["normalized_reward"],
                event["mean"],
                event["std"],
            )
        )

    def _on_command(self, event: dict[str, Any]) -> None:
        kind, at = event["type"], self._at(event, "issued_at")
        self.timeline.commands[kind] += 1
        if kind == "set_entropy_coef":
            self.timeline.entropy.append((at, event["entropy_coef"]))
        elif kind == "rollback":
            self.timeline.rollbacks.append(
                (at, event["anomaly_step"], event["checkpoint_step"], event["reason"])
            )
            self.lines.put(
                f"anomaly at step {event['anomaly_step']} ({event['reason']}): "
                f"rollback to the checkpoint of step {event['checkpoint_step']}"
            )
        elif kind == "retune":
            size = int(event["window"].get("size", 0))
            self.timeline.retunes.append((at, event["changes"], size))
            self.lines.put(f"retuning triggered after {size} ratings: {event['changes']}")
            self.lines.put(f"  why: {event['rationale']}")
        elif kind == "halt":
            self.lines.put(f"run halted: {event['reason']}")

    def _on_checkpoint(self, event: dict[str, Any]) -> None:
        self.timeline.checkpoints.append((self._at(event), event["step"]))
        self.lines.put(f"checkpoint saved at step {event['step']}")

    def _on_control(self, event: dict[str, Any]) -> None:
        state, mode, ttl = event["state"], event["mode"], event["cache_ttl_s"]
        previous = self.timeline.modes[-1] if self.timeline.modes else None
        self.timeline.modes.append((self._at(event), state, mode, ttl, event.get("until")))
        if state == "open":
            was = previous[2] if previous else "creative"
            self.lines.put(
                f"downshift activated: {MODEL} {was} -> {mode}, cache TTL {ttl:g}s "
                f"({event['reason']})"
            )
        elif state == "closed":
            self.lines.put(f"{MODEL} recovered: {mode}, cache TTL {ttl:g}s")
        else:
            self.lines.put(f"{MODEL} half-open: probing {event.get('probe_mode')}")


def _trainer(
    settings: Settings, timeline: Timeline, checkpoint_dir: Path, seed: int, stop: threading.Event
) -> None:
    from producers.reference import ReferencePPOTrainer  # torch: only the trainer needs it

    def pace(_report: object) -> None:
        if stop.is_set():
            raise _Stopped
        time.sleep(STEP_PACE_S)

    with TrainerClient(timeline.run_id, settings=settings) as client:
        trainer = ReferencePPOTrainer(client, checkpoint_dir, seed=seed)
        trainer.inject_fault(int(timeline.steps * 0.6))  # after the checkpoint of step 1000
        with contextlib.suppress(_Stopped):
            trainer.train(timeline.steps, on_step=pace)


def _llm_service(settings: Settings, seed: int, stop: threading.Event) -> None:
    calls = 0
    failing = {40, 41, 42}  # three failures in a row, two seconds in

    def qwen(prompt: str, *, mode: str) -> str:
        time.sleep(0.005)
        if calls in failing:
            raise TimeoutError(f"{mode} generation timed out")
        return f"[{mode}] accord for {prompt}"

    with LlmClient(MODEL, settings=settings) as llm:
        generate = llm.wrap(qwen)
        while not stop.wait(0.05):
            with contextlib.suppress(TimeoutError):  # the service's own error, as in production
                generate(f"brief-{seed}-{calls}")
            calls += 1


def _rating_app(settings: Settings, run_id: str, seed: int, stop: threading.Event) -> None:
    values = [float(v) for v, count in RATING_COUNTS.items() for _ in range(count)]
    random.Random(seed).shuffle(values)
    if stop.wait(3.0):
        return
    with RatingClient(settings=settings) as ratings:
        for index, value in enumerate(values):
            if stop.wait(0.03):
                return
            ratings.rate(
                value, user_id=f"user-{index}", formula_id=f"formula-{index % 23}", run_id=run_id
            )


def _view(timeline: Timeline) -> Table:
    table = Table(show_header=False, box=None, padding=(0, 2))
    with timeline.lock:
        last = timeline.reward[-1] if timeline.reward else None
        entropy = timeline.entropy[-1][1] if timeline.entropy else None
        mode = timeline.modes[-1] if timeline.modes else None
        commands = dict(timeline.commands)
    step = f"{last[1]:,} / {timeline.steps:,}" if last else "starting"
    table.add_row("run", f"{timeline.run_id}  step {step}")
    table.add_row("entropy_coef", f"{entropy:.5f}" if entropy is not None else "-")
    table.add_row(
        "reward", f"{last[2]:.3f}  (window mean {last[4]:.3f}, std {last[5]:.3f})" if last else "-"
    )
    if mode is None:
        table.add_row(MODEL, "closed, creative, cache TTL 3600s")
    else:
        until = mode[4]
        left = f", next step in {max(0.0, until - time.time()):.0f}s" if until else ""
        table.add_row(MODEL, f"{mode[1]}, {mode[2]}, cache TTL {mode[3]:g}s{left}")
    table.add_row("commands", ", ".join(f"{k} {v}" for k, v in sorted(commands.items())) or "-")
    return table


def _done(timeline: Timeline, trainer: threading.Thread) -> bool:
    with timeline.lock:
        recovered = any(state == "closed" for _, state, *_ in timeline.modes)
        return not trainer.is_alive() and recovered and bool(timeline.retunes)


@contextlib.contextmanager
def _parties(
    settings: Settings, timeline: Timeline, workdir: Path, seed: int
) -> Iterator[threading.Thread]:
    stop = threading.Event()
    trainer = threading.Thread(
        target=_trainer,
        args=(settings, timeline, workdir / "checkpoints" / timeline.run_id, seed, stop),
        name="demo-trainer",
        daemon=True,
    )
    others = [
        threading.Thread(target=_llm_service, args=(settings, seed, stop), daemon=True),
        threading.Thread(
            target=_rating_app, args=(settings, timeline.run_id, seed, stop), daemon=True
        ),
    ]
    try:
        for thread in (trainer, *others):  # inside: a Ctrl-C among the starts stops them too
            thread.start()
        yield trainer
    finally:
        stop.set()
        for thread in (trainer, *others):
            if thread.is_alive():
                thread.join(timeout=30)


def run_demo(settings: Settings, *, steps: int, seed: int, png: Path, console: Console) -> int:
    """Run the demo; 0 when every milestone was seen and the picture was written."""
    create_contract_topics(settings.kafka)
    workdir = Path(tempfile.mkdtemp(prefix="fragrance-ops-demo-"))
    env = worker_env(
        KAFKA__BOOTSTRAP_SERVERS=settings.kafka.bootstrap_servers or "",
        KAFKA__EMBEDDED_BROKER=str(settings.kafka.embedded_broker).lower(),
        KAFKA__TOPIC_PREFIX=settings.kafka.topic_prefix,
        WORKER__DATA_DIR=str(workdir / "worker"),
        BREAKER__OPEN_S=str(OPEN_S),
        METRICS__PORT="0",
    )
    llm_settings = settings.model_copy(
        update={"breaker": settings.breaker.model_copy(update={"open_s": OPEN_S})}
    )
    # The SDKs' own warnings (a local downshift, an applied retune) would repeat what the
    # observer prints from the worker's events.
    logging.getLogger("producers").setLevel(logging.ERROR)
    worker = WorkerProcess(env, workdir / "worker.log")
    console.print("starting the worker ...")
    worker.start()
    timeline = Timeline(run_id=f"demo-{seed}-{uuid.uuid4().hex[:6]}", steps=steps)
    observer = Observer(settings, timeline)
    observer.start()
    console.print(
        f"training {timeline.run_id} for {steps} steps (PPO, rollouts of 2,048, 10 epochs, "
        f"batch 64); {MODEL} serving; ratings arriving"
    )
    deadline = time.monotonic() + DEADLINE_S
    completed = False
    try:
        with (
            _parties(llm_settings, timeline, workdir, seed) as trainer,
            Live(_view(timeline), console=console, refresh_per_second=4, transient=True) as live,
        ):
            while time.monotonic() < deadline and not _done(timeline, trainer):
                with contextlib.suppress(Empty):
                    while True:
                        live.console.print(observer.lines.get_nowait())
                live.update(_view(timeline))
                time.sleep(0.1)
            time.sleep(1.0)  # the last outputs of the run
        completed = True
    finally:
        observer.stop()
        worker.stop()
        if not completed:  # Ctrl-C or a failure: nothing of this demo stays behind
            shutil.rmtree(workdir, ignore_errors=True)
    while not observer.lines.empty():
        console.print(observer.lines.get_nowait())
    console.print(_view(timeline))
    result = _summary(timeline, png, console)
    if result:
        console.print(f"the worker's log and the checkpoints are kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def _summary(timeline: Timeline, png: Path, console: Console) -> int:
    from fragrance_ops.timeline import plot_timeline

    plot_timeline(timeline, png)
    checkpoints = sorted({step for _, step in timeline.checkpoints})
    console.print(
        f"\nsummary: {len(timeline.reward):,} metrics normalized; checkpoints {checkpoints}; "
        f"{len(timeline.rollbacks)} rollback(s); {len(timeline.retunes)} retune(s); "
        f"{sum(1 for _, state, *_ in timeline.modes if state == 'open')} downshift(s); "
        f"{timeline.dead_letters} dead letter(s); commands {dict(timeline.commands)}"
    )
    console.print(f"timeline written to {png}")
    missing = [
        name
        for name, seen in (
            ("checkpoints at 500 and 1000", {500, 1000} <= set(checkpoints)),
            ("a rollback", bool(timeline.rollbacks)),
            ("a downshift", any(state == "open" for _, state, *_ in timeline.modes)),
            ("a retune", bool(timeline.retunes)),
        )
        if not seen
    ]
    if missing:
        console.print(f"not seen: {', '.join(missing)}")
    return 1 if missing else 0
