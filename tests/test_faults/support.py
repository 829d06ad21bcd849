"""The fault suite's harness: profiles, live topic recorders, rule oracles, simulated clients.

Expectations are never written down by hand: every scenario feeds the inputs it actually
published (recorded at the producer, in the order the producer sent them) through the pure
rules in ``rules`` and compares the worker's outputs on the contract topics with
what the rules say a crash-free run produces.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from config.settings import Settings, run_overrides
from fragrance_ops.worker_process import WorkerProcess
from producers import TrainerClient
from producers.partitioning import partition_for_key
from producers.transport import CommandReader, DeliveryStats, KafkaTransport
from rules.breaker import BreakerPolicy, ModelBreaker
from rules.retune import Retuner, retune_target
from rules.reward_window import RewardWindow
from rules.training import RunOperations
from schemas import (
    CheckpointSaved,
    Command,
    CommandAck,
    LlmControl,
    LlmOutcome,
    OperatorRequest,
    Rating,
    RunAnnounced,
    StepMetric,
    Topic,
    decode,
    encode,
    topic_name,
)

# --- profiles -------------------------------------------------------------------------------

PROFILE_ENV = "FRAGRANCE_OPS_FAULTS"
SEED_ENV = "FRAGRANCE_OPS_FAULTS_SEED"


@dataclass(frozen=True)
class Profile:
    """How hard each scenario pushes; ``short`` runs in CI, ``long`` by hand."""

    name: str
    seed: int
    # 1: SIGKILL loop
    kills: int
    kill_gap_s: tuple[float, float]  # worker up this long (uniform) before each kill
    runs: int
    models: int
    step_pause_s: float
    # 2: slow batch at the head of a partition
    slow_batch_runs: int
    slow_batch_kills: int
    # 3: rebalances
    rebalance_cycles: int
    # 4: broker restarts
    broker_outages: int
    outage_s: float
    # 5: poison
    poison_per_topic: int
    # 6, 7: duplicates, clock skew
    replays: int
    # 8: trainer kill points (all three are always run; more rounds in long)
    llm_outage_calls: int
    # 9: a worker started behind a backlog of metrics
    backlog_metrics: int
    test_timeout_s: int


def _seed() -> int:
    raw = os.environ.get(SEED_ENV)
    return int(raw) if raw else 20_260_601


SHORT = Profile(
    name="short",
    seed=_seed(),
    kills=10,
    kill_gap_s=(0.5, 2.0),
    runs=3,
    models=3,
    step_pause_s=0.01,
    slow_batch_runs=6000,
    slow_batch_kills=1,
    rebalance_cycles=2,
    broker_outages=1,
    outage_s=4.0,
    poison_per_topic=40,
    replays=2,
    llm_outage_calls=30,
    backlog_metrics=50_000,
    test_timeout_s=600,
)
LONG = Profile(
    name="long",
    seed=int(os.environ.get(SEED_ENV) or time.time_ns() % 1_000_000_007),
    kills=40,
    kill_gap_s=(0.5, 6.0),
    runs=6,
    models=6,
    step_pause_s=0.005,
    slow_batch_runs=20_000,
    slow_batch_kills=3,
    rebalance_cycles=10,
    broker_outages=3,
    outage_s=10.0,
    poison_per_topic=300,
    replays=5,
    llm_outage_calls=200,
    backlog_metrics=300_000,
    test_timeout_s=3600,
)
PROFILE = LONG if os.environ.get(PROFILE_ENV, "short").strip().lower() == "long" else SHORT


# --- the figures the suite reports ----------------------------------------------------------


@dataclass
class Figures:
    """Per scenario: name -> value, printed in the terminal summary at the end of the run."""

    by_scenario: dict[str, dict[str, Any]] = field(default_factory=dict)

    def record(self, scenario: str, **values: Any) -> None:
        self.by_scenario.setdefault(scenario, {}).update(values)

    def add(self, scenario: str, name: str, amount: int) -> None:
        figures = self.by_scenario.setdefault(scenario, {})
        figures[name] = figures.get(name, 0) + amount

    def lines(self) -> list[str]:
        out = [f"profile {PROFILE.name}, seed {PROFILE.seed} ({SEED_ENV} to repeat)"]
        for scenario, values in self.by_scenario.items():
            out.append(f"{scenario}:")
            out.extend(f"  {name}: {_show(value)}" for name, value in values.items())
        return out


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, list | tuple) and value and isinstance(value[0], float):
        return "[" + ", ".join(f"{v:.2f}" for v in value) + "]"
    return str(value)


FIGURES = Figures()


# --- waiting ----------------------------------------------------------------------------------


def wait_for(
    condition: Callable[[], bool],
    timeout_s: float,
    what: str,
    detail: Callable[[], str] | None = None,
) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` (and ``detail()``) after
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            more = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(f"not within {timeout_s:g}s: {what}{more}")
        time.sleep(0.05)


def uncommitted(bootstrap: str, group: str, topic: str, end: int | None = None) -> int:
    """Records of ``topic`` past ``group``'s commit: of ``end`` records when given, else of
    what the topic holds."""
    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        partitions = reader.list_topics(topic, timeout=10).topics[topic].partitions
        tps = [TopicPartition(topic, p) for p in partitions]
        committed = reader.committed(tps, timeout=10)
        if end is None:
            end = sum(reader.get_watermark_offsets(tp, timeout=10)[1] for tp in tps)
    finally:
        reader.close()
    return end - sum(max(tp.offset, 0) for tp in committed)


def wait_until_committed(bootstrap: str, group: str, topics: list[str], timeout_s: float) -> None:
    """Wait until ``group`` has committed every record ``topics`` hold: a worker killed
    after this replays none of them."""
    wait_for(
        lambda: not any(uncommitted(bootstrap, group, topic) for topic in topics),
        timeout_s,
        f"{group} committed all of {sorted(topics)}",
    )


# --- settings ---------------------------------------------------------------------------------


#: The training settings of the scenarios with simulated trainers: a checkpoint every 50
#: steps and an entropy schedule of 2,000 steps, so a short run holds many decisions.
TRAINING_OVERRIDES: dict[str, Any] = {
    "checkpoints.interval_steps": 50,
    "checkpoints.health_lookback_steps": 20,
    # 20 kept: the newest healthy checkpoint is among them even when a rollback's ack is
    # read after the new attempt's first metrics (see decision_view).
    "checkpoints.keep": 20,
    "entropy.steps": 2000,
}


def configured(base: Settings, dotted: dict[str, Any]) -> Settings:
    """``base`` with ``{"group.name": value}`` applied (any group, unlike run overrides)."""
    nested: dict[str, dict[str, Any]] = defaultdict(dict)
    for key, value in dotted.items():
        group, _, name = key.partition(".")
        nested[group][name] = value
    updates = {
        group: type(getattr(base, group)).model_validate(getattr(base, group).model_dump() | values)
        for group, values in nested.items()
    }
    return base.model_copy(update=updates)


def worker_settings_env(dotted: dict[str, Any]) -> dict[str, str]:
    """The same overrides as ``make_worker`` keyword arguments (``GROUP__NAME="value"``)."""
    env = {}
    for key, value in dotted.items():
        group, _, name = key.partition(".")
        text = orjson.dumps(value).decode() if isinstance(value, dict | list | bool) else value
        env[f"{group.upper()}__{name.upper()}"] = str(text)
    return env


def runs_on_every_partition(prefix: str, partitions: int, per_partition: int = 1) -> list[str]:
    """Run ids (``<prefix>-<n>``) covering every partition ``per_partition`` times."""
    found: dict[int, list[str]] = defaultdict(list)
    n = 0
    while any(len(found[p]) < per_partition for p in range(partitions)):
        run_id = f"{prefix}-{n}"
        partition = partition_for_key(run_id.encode(), partitions)
        if len(found[partition]) < per_partition:
            found[partition].append(run_id)
        n += 1
    return [run for p in range(partitions) for run in found[p]]


# --- recording what producers sent ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sent:
    topic: str
    key: bytes
    value: bytes
    at: float  # time.monotonic() when handed to the producer


class RecordingTransport:
    """A ``KafkaTransport`` that remembers every record handed to it, in order."""

    def __init__(self, settings: Settings) -> None:
        self._inner = KafkaTransport(settings)
        self.sent: list[Sent] = []
        self._lock = threading.Lock()

    @property
    def stats(self) -> DeliveryStats:
        return self._inner.stats

    def produce(self, topic: str, key: bytes, value: bytes) -> None:
        with self._lock:
            self.sent.append(Sent(topic, key, value, time.monotonic()))
        self._inner.produce(topic, key, value)

    def flush(self, timeout_s: float) -> int:
        return self._inner.flush(timeout_s)

    def reader(
        self, topic: str, key: bytes, group_id: str, *, latest_only: bool = False
    ) -> CommandReader:
        return self._inner.reader(topic, key, group_id, latest_only=latest_only)

    def close(self, timeout_s: float) -> int:
        return self._inner.close(timeout_s)

    def records(self) -> list[Sent]:
        with self._lock:
            return list(self.sent)


# --- reading what the worker wrote, live ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Seen:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    at: float  # time.monotonic() when this process read it

    def json(self) -> dict[str, Any]:
        decoded: dict[str, Any] = orjson.loads(self.value)
        return decoded


class TopicRecorder:
    """Reads topics from the beginning in a thread, keeping every record with its arrival."""

    def __init__(self, bootstrap: str, topics: Iterable[str]) -> None:
        self.topics = list(topics)
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"fault-recorder-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "topic.metadata.refresh.interval.ms": 1000,
            }
        )
        self._records: list[Seen] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="topic-recorder", daemon=True)

    def __enter__(self) -> TopicRecorder:
        self._assign()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _assign(self) -> None:
        deadline = time.monotonic() + 60
        assignment = []
        for topic in self.topics:
            while True:
                metadata = self._consumer.list_topics(topic, timeout=5)
                found = metadata.topics.get(topic)
                if found is not None and found.error is None and found.partitions:
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"topic {topic!r} not created within 60s")
                time.sleep(0.1)
            assignment += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in found.partitions]
        self._consumer.assign(assignment)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self._consumer.consume(1000, timeout=0.2)
                now = time.monotonic()
                seen = []
                for message in batch:
                    error = message.error()
                    if error is not None:
                        if error.code() != KafkaError._PARTITION_EOF:
                            self._warn(error)
                        continue
                    headers = tuple(
                        (name, value or b"") for name, value in (message.headers() or [])
                    )
                    seen.append(
                        Seen(
                            message.topic() or "",
                            message.partition() or 0,
                            message.offset() or 0,
                            message.key(),
                            message.value() or b"",
                            headers,
                            now,
                        )
                    )
                if seen:
                    with self._lock:
                        self._records.extend(seen)
        except BaseException as exc:  # surfaced by records()
            self._error = exc

    @staticmethod
    def _warn(error: KafkaError) -> None:
        # Transient errors (a broker restart) are expected in some scenarios.
        if error.fatal():
            raise RuntimeError(f"recorder consumer failed: {error}")

    def records(self, topic: str | None = None) -> list[Seen]:
        if self._error is not None:
            raise RuntimeError("topic recorder died") from self._error
        with self._lock:
            records = list(self._records)
        return [r for r in records if topic is None or r.topic == topic]

    def wait(
        self,
        condition: Callable[[list[Seen]], bool],
        timeout_s: float,
        what: str,
        detail: Callable[[list[Seen]], str] | None = None,
    ) -> list[Seen]:
        wait_for(
            lambda: condition(self.records()),
            timeout_s,
            what,
            None if detail is None else lambda: detail(self.records()),
        )
        return self.records()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._consumer.close()


# --- views: what must be equal, without the worker's clock ---------------------------------


def command_view(command: dict[str, Any]) -> dict[str, Any]:
    """A command as the rules decide it: everything but ``issued_at`` (the worker's clock)."""
    view = {k: v for k, v in command.items() if k != "issued_at"}
    if view.get("type") == "retune":
        window = dict(view["window"])
        for clock_field in ("opened_at", "closed_at"):
            window.pop(clock_field, None)
        view["window"] = window
    return view


def decision_view(command: dict[str, Any]) -> dict[str, Any]:
    """A command as far as it must not depend on how the worker interleaved its input topics
    or how often it replayed them:

    - ``retune``: not the window's ``duplicates`` counter (nor the rationale quoting it),
      which counts ratings seen twice, and a crash's replay adds to it;
    - ``prune_checkpoints``: not ``protected_step``, the newest checkpoint known healthy
      when the checkpoint was recorded. The rules hold checkpoints and a rollback's restore
      back in the run's own order, but a rollback's ack (a third topic) read only after the
      new attempt's first metrics restores late. What is deleted must not depend on it (the
      scenarios keep enough checkpoints for that); what the worker calls protected may.
    """
    view = command_view(command)
    if view["type"] == "retune":
        window = dict(view["window"])
        window.pop("duplicates", None)
        view["window"] = window
        view.pop("rationale", None)
    elif view["type"] == "prune_checkpoints":
        view.pop("protected_step", None)
    return view


def control_view(control: dict[str, Any]) -> dict[str, Any]:
    """An ``llm.control`` event without the worker's clock (``ts``, ``until``)."""
    return {k: v for k, v in control.items() if k not in ("ts", "until")}


def stats_view(stats: dict[str, Any]) -> tuple[Any, ...]:
    return (
        stats["run_id"],
        stats["step"],
        stats["reward"],
        stats["normalized_reward"],
        stats["mean"],
        stats["std"],
        stats["count"],
    )


# --- oracles: the pure rules over the recorded inputs --------------------------------------


@dataclass
class TrainingOracle:
    """What the training agent must output for runs fed in their producers' order."""

    settings: Settings
    windows: dict[str, RewardWindow] = field(default_factory=dict)
    operations: dict[str, RunOperations] = field(default_factory=dict)
    stats: dict[str, list[tuple[Any, ...]]] = field(default_factory=lambda: defaultdict(list))
    commands: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> view
    # operator request id -> (accepted, detail, the id of the command it caused)
    answers: dict[str, tuple[bool, str, str | None]] = field(default_factory=dict)
    metrics: int = 0

    per_run: dict[str, Settings] = field(default_factory=dict)  # announced overrides

    def _run_settings(self, run_id: str) -> Settings:
        return self.per_run.get(run_id, self.settings)

    def _ops(self, run_id: str) -> RunOperations:
        if run_id not in self.operations:
            self.operations[run_id] = RunOperations(run_id, self._run_settings(run_id))
        return self.operations[run_id]

    def _emit(self, commands: Iterable[Any]) -> None:
        for command in commands:
            view = command_view(orjson.loads(encode(command)))
            previous = self.commands.setdefault(view["command_id"], view)
            assert previous == view, f"the rules gave one id two meanings: {previous} {view}"

    def feed(self, sent: Sent, prefix: str) -> None:
        kind = sent.topic.removeprefix(prefix)
        if kind == Topic.RUNS.value:
            run = decode(RunAnnounced, sent.value)
            if run.settings:
                # Only before the run's first event: the worker also re-applies overrides to
                # state it holds, which the scenarios do not need.
                assert run.run_id not in self.operations
                assert run.run_id not in self.windows
                self.per_run[run.run_id] = run_overrides(self.settings, dict(run.settings))
        elif kind == Topic.METRICS.value:
            metric = decode(StepMetric, sent.value)
            self.metrics += 1
            if math.isfinite(metric.reward):
                window = self.windows.setdefault(
                    metric.run_id,
                    RewardWindow(self._run_settings(metric.run_id).reward.window_size),
                )
                result = window.add(metric.reward, step=metric.step, attempt=metric.attempt)
                if result is not None:
                    self.stats[metric.run_id].append(
                        (
                            metric.run_id,
                            metric.step,
                            result.reward,
                            result.normalized_reward,
                            result.mean,
                            result.std,
                            result.count,
                        )
                    )
            self._emit(self._ops(metric.run_id).on_metric(metric, 0.0))
        elif kind == Topic.CHECKPOINTS.value:
            checkpoint = decode(CheckpointSaved, sent.value)
            self._emit(self._ops(checkpoint.run_id).on_checkpoint(checkpoint, 0.0))
        elif kind == Topic.ACKS.value:
            ack = decode(CommandAck, sent.value)
            self._emit(self._ops(ack.run_id).on_ack(ack, 0.0))
        elif kind == Topic.OPERATOR_REQUESTS.value:
            request = decode(OperatorRequest, sent.value)
            answer = self._ops(request.run_id).on_request(request, 0.0)
            command = answer.command
            self.answers[request.request_id] = (
                answer.accepted,
                answer.detail,
                command.command_id if command is not None else None,
            )
            self._emit([command] if command is not None else [])

    def feed_all(self, records: Iterable[Sent], prefix: str) -> TrainingOracle:
        for sent in records:
            self.feed(sent, prefix)
        return self

    def distinct_stats(self) -> set[tuple[Any, ...]]:
        return {row for rows in self.stats.values() for row in rows}


@dataclass
class BreakerOracle:
    """Each model's transitions for its outcomes in partition order (no ticks: ``open_s``
    must outlast the scenario, so the worker's clock never moves a breaker)."""

    policy: BreakerPolicy
    breakers: dict[str, ModelBreaker] = field(default_factory=dict)
    transitions: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    outcomes: int = 0

    def feed(self, value: bytes) -> None:
        outcome = decode(LlmOutcome, value)
        self.outcomes += 1
        breaker = self.breakers.setdefault(outcome.model, ModelBreaker(outcome.model, self.policy))
        transition = breaker.on_outcome(
            outcome.ok, outcome.mode, outcome.latency_ms, 0.0, call_id=outcome.call_id
        )
        if transition is not None:
            self.transitions[outcome.model].append(_transition_view(transition))

    def final(self, model: str) -> dict[str, Any]:
        return _transition_view(self.breakers[model].control())


def _transition_view(transition: Any) -> dict[str, Any]:
    control = orjson.loads(encode(LlmControl(**asdict(transition), ts=0.0)))
    return control_view(control)


@dataclass
class RetuneOracle:
    """Each target's window verdicts for its ratings in the order the worker reads them."""

    settings: Settings
    retuners: dict[str, Retuner] = field(default_factory=dict)
    proposals: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> command view
    ratings: int = 0

    def feed(self, value: bytes) -> None:
        rating = decode(Rating, value)
        self.ratings += 1
        target = retune_target(rating.run_id, self.settings.retune)
        retuner = self.retuners.setdefault(target, Retuner(target, self.settings.retune))
        outcome = retuner.add_event(rating, now=0.0)
        if outcome.verdict is not None:
            command = outcome.verdict.command(issued_at=0.0)
            if command is not None:
                view = command_view(orjson.loads(encode(command)))
                self.proposals[view["command_id"]] = view


# --- simulated clients ------------------------------------------------------------------------


def answer_commands_until(client: TrainerClient, done: threading.Event) -> None:
    """Handle and ack commands as they arrive, until ``done``, then once more."""
    while not done.is_set():
        client.poll_commands()
        time.sleep(0.02)
    client.poll_commands()


def smooth_loss(step: int, phase: float) -> float:
    """A loss that never moves by 2x between steps (range 0.7..1.3)."""
    return 1.0 + 0.3 * math.sin(step * 0.11 + phase)


def smooth_reward(step: int, phase: float) -> float:
    """A reward that never halves between steps (range 1.5..2.5)."""
    return 2.0 + 0.5 * math.sin(step * 0.37 + phase)


@dataclass
class TrainerPlan:
    """A simulated run: gaps (in steps, from each attempt's start) to its injected spikes."""

    run_id: str
    spike_gaps: list[int]
    phase: float = 0.0


class SimTrainer:
    """A trainer without a model: deterministic losses, checkpoints, a real ``TrainerClient``.

    It rolls back as ``TorchRunOps`` does (continue after the restored step, next attempt),
    and after each injected loss spike it waits for the stream's answer before the next
    step, so the metrics it publishes do not depend on how fast the worker answers.
    """

    def __init__(
        self,
        plan: TrainerPlan,
        settings: Settings,
        *,
        pause_s: float,
        answer_timeout_s: float = 120.0,
    ) -> None:
        self.plan = plan
        self.run_id = plan.run_id
        self.settings = settings
        self.transport = RecordingTransport(settings)
        self.client = TrainerClient(plan.run_id, settings=settings, transport=self.transport)
        self.interval = settings.checkpoints.interval_steps
        self.pause_s = pause_s
        self.answer_timeout_s = answer_timeout_s
        self.applied: Counter[str] = Counter()  # command id -> handler runs
        self.applied_types: dict[str, str] = {}
        self.step = 0
        self.attempt_start = 0
        self.last_checkpoint: int | None = None
        self.halted = False
        self.rollbacks = 0
        self.spikes_sent = 0
        self.unanswered: list[int] = []
        self.slowest_step_call_s = 0.0  # the longest log_step call (handlers included)
        self._gaps = list(plan.spike_gaps)
        for command_type in ("set_entropy_coef", "prune_checkpoints", "retune"):
            self.client.on_command(command_type, self._count)
        self.client.on_command("rollback", self._rollback)
        self.client.on_command("halt", self._halt)
        self.stop = threading.Event()  # stop stepping
        self.stepped = threading.Event()  # set when it has stopped stepping
        self.done = threading.Event()  # stop polling commands too
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name=f"trainer-{plan.run_id}")

    # handlers run in this trainer's thread, inside log_step/poll_commands
    def _count(self, command: Command) -> dict[str, Any]:
        self.applied[command.command_id] += 1
        self.applied_types[command.command_id] = command.type
        return {"after": {"seen": self.applied[command.command_id]}}

    def _rollback(self, command: Command) -> dict[str, Any]:
        self._count(command)
        assert command.type == "rollback"
        before = {"step": self.step, "attempt": self.client.attempt}
        self.client.attempt += 1
        self.step = command.checkpoint_step + 1
        self.attempt_start = self.step
        self.last_checkpoint = command.checkpoint_step
        self.rollbacks += 1
        return {
            "before": before,
            "after": {"step": command.checkpoint_step, "attempt": self.client.attempt},
        }

    def _halt(self, command: Command) -> None:
        self._count(command)
        self.halted = True

    def start(self) -> SimTrainer:
        self.client.announce({})
        self.thread.start()
        return self

    def _main(self) -> None:
        try:
            while not self.stop.is_set() and not self.halted:
                self._one_step()
                if self.pause_s:
                    time.sleep(self.pause_s)
            self.stepped.set()
            answer_commands_until(self.client, self.done)
        except BaseException as exc:
            self.error = exc

    def _one_step(self) -> None:
        step = self.step
        if step > 0 and step % self.interval == 0 and self.last_checkpoint != step:
            self.client.checkpoint_saved(step, f"file:///sim/{self.run_id}/step-{step}.pt")
            self.last_checkpoint = step
        spike = bool(self._gaps) and step == self.attempt_start + self._gaps[0]
        loss = smooth_loss(step, self.plan.phase) * (10.0 if spike else 1.0)
        answers = self.rollbacks
        began = time.perf_counter()
        self.client.log_step(
            step,
            loss=loss,
            reward=smooth_reward(step, self.plan.phase),
            checkpoint_step=self.last_checkpoint,
        )
        self.slowest_step_call_s = max(self.slowest_step_call_s, time.perf_counter() - began)
        if spike:
            self._gaps.pop(0)
            self.spikes_sent += 1
            self._await_answer(step, answers)
        elif self.step == step:
            self.step = step + 1

    def _await_answer(self, step: int, answers: int) -> None:
        """A real trainer would keep going; this one waits, so its inputs are reproducible."""
        deadline = time.monotonic() + self.answer_timeout_s
        while self.rollbacks == answers and not self.halted:
            if time.monotonic() > deadline:
                self.unanswered.append(step)
                self.step = step + 1
                return
            self.client.poll_commands()
            time.sleep(0.02)

    def finish(self) -> None:
        self.stop.set()

    def close(self) -> None:
        self.stop.set()
        self.done.set()
        if self.thread.is_alive():
            self.thread.join(timeout=30)
        self.client.close()
        if self.error is not None:
            raise self.error


class CommandSink:
    """A run that only receives commands (a rated policy): counts each id's applications."""

    def __init__(self, run_id: str, settings: Settings) -> None:
        self.run_id = run_id
        self.transport = RecordingTransport(settings)
        self.client = TrainerClient(run_id, settings=settings, transport=self.transport)
        self.applied: Counter[str] = Counter()
        self.client.on_command("retune", self._retune)
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name=f"sink-{run_id}")

    def _retune(self, command: Command) -> dict[str, Any]:
        self.applied[command.command_id] += 1
        assert command.type == "retune"
        # No entropy_coef in "after": the run has no metrics, nothing to rescale.
        return {"after": {"learning_rate": 0.0001, "applied": self.applied[command.command_id]}}

    def start(self) -> CommandSink:
        self.thread.start()
        return self

    def _main(self) -> None:
        try:
            answer_commands_until(self.client, self.done)
        except BaseException as exc:
            self.error = exc

    def close(self) -> None:
        self.done.set()
        self.thread.join(timeout=30)
        self.client.close()
        if self.error is not None:
            raise self.error


class Background:
    """A loop in a thread until stopped; exceptions resurface on ``close``."""

    def __init__(self, name: str, body: Callable[[], None], pause_s: float) -> None:
        self._body = body
        self._pause_s = pause_s
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.iterations = 0
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self) -> Background:
        self.thread.start()
        return self

    def _main(self) -> None:
        try:
            while not self.stop.is_set():
                self._body()
                self.iterations += 1
                time.sleep(self._pause_s)
        except BaseException as exc:
            self.error = exc

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        if self.error is not None:
            raise self.error


def flaky_outcomes(seed: int) -> Iterator[tuple[bool, float]]:
    """(ok, latency) of calls to a model that fails in bursts (a two-state Markov chain)."""
    rng = random.Random(seed)
    failing = False
    while True:
        if rng.random() < 0.03:
            failing = not failing
        ok = rng.random() > (0.85 if failing else 0.05)
        yield ok, rng.uniform(5.0, 80.0)


def rating_values(seed: int, kind: str) -> Iterator[float]:
    """Ratings whose windows propose something: low mean, high variance, or high mean."""
    rng = random.Random(seed)
    weights = {
        "low": [0.15, 0.4, 0.35, 0.1, 0.0],
        "spread": [0.3, 0.05, 0.1, 0.15, 0.4],
        "high": [0.0, 0.0, 0.05, 0.3, 0.65],
    }[kind]
    while True:
        yield float(rng.choices([1, 2, 3, 4, 5], weights)[0])


# --- the worker process -----------------------------------------------------------------------


def stall_restarts(worker: WorkerProcess) -> int:
    """How often the supervisor restarted ``worker`` after its stall watchdog crashed it;
    fails on any other exit."""
    for ended in worker.exits:
        # From the first critical record: the cause, not the shutdown that followed it.
        first = max(0, ended.log.find("[CRITICAL]"))
        cause = ended.log[first : first + 5000]
        assert "input stalled" in ended.log, f"the worker exited ({ended.returncode}):\n{cause}"
    return len(worker.exits)


def vm_rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


# --- checking a training scenario ---------------------------------------------------------


def stop_trainers(trainers: list[SimTrainer], timeout_s: float = 150.0) -> None:
    """Stop stepping (a trainer waiting for a rollback keeps waiting) and flush."""
    for trainer in trainers:
        trainer.finish()
    wait_for(lambda: all(t.stepped.is_set() for t in trainers), timeout_s, "trainers stopped")
    for trainer in trainers:
        assert trainer.client.flush(60) == 0, f"{trainer.run_id}: events left unsent"


def training_oracle(
    settings: Settings, clients: Iterable[SimTrainer | CommandSink]
) -> TrainingOracle:
    oracle = TrainingOracle(settings)
    for client in clients:
        oracle.feed_all(client.transport.records(), settings.kafka.topic_prefix)
    return oracle


def missing_training_outputs(
    oracle: TrainingOracle, records: list[Seen], prefix: str, extra_ids: Iterable[str] = ()
) -> tuple[set[tuple[Any, ...]], set[str]]:
    stats_topic = topic_name(Topic.REWARD_STATS, prefix)
    commands_topic = topic_name(Topic.COMMANDS, prefix)
    stats = {stats_view(r.json()) for r in records if r.topic == stats_topic}
    ids = {r.json()["command_id"] for r in records if r.topic == commands_topic}
    return oracle.distinct_stats() - stats, (set(oracle.commands) | set(extra_ids)) - ids


def describe_missing_training_outputs(
    oracle: TrainingOracle,
    records: list[Seen],
    prefix: str,
    extra: dict[str, dict[str, Any]] | None = None,
) -> str:
    """What a timed-out wait still misses, by run and command type, and which commands came
    out that the rules never decided (a missing id next to an unexpected one of the same
    type and run is a disagreement on the id, not a loss)."""
    expected = oracle.commands | (extra or {})
    stats, ids = missing_training_outputs(oracle, records, prefix, extra or ())
    commands_topic = topic_name(Topic.COMMANDS, prefix)
    emitted = {r.json()["command_id"]: r.json() for r in records if r.topic == commands_topic}

    def summary(views: Iterable[dict[str, Any]]) -> dict[tuple[str, str], list[Any]]:
        grouped: dict[tuple[str, str], list[Any]] = defaultdict(list)
        for view in views:
            at = view.get("step", view.get("checkpoint_step", view.get("steps")))
            grouped[(view["run_id"], view["type"])].append(at)
        return dict(sorted(grouped.items()))

    missing_stats: Counter[str] = Counter(row[0] for row in stats)
    unexpected = [view for i, view in emitted.items() if i not in expected]
    return (
        f"missing stats by run {dict(missing_stats)}; "
        f"missing commands {summary(expected[i] for i in ids)}; "
        f"unexpected commands {summary(unexpected)}"
    )[:6000]


def wait_until_applied(
    clients: Iterable[SimTrainer | CommandSink], expected: dict[str, dict[str, Any]]
) -> None:
    clients = list(clients)

    def applied() -> bool:
        return all(
            {i for i, view in expected.items() if view["run_id"] == client.run_id}
            <= set(client.applied)
            for client in clients
        )

    wait_for(applied, 60, "every command applied by its trainer")
    time.sleep(1.0)  # a late duplicate delivery would be applied now, if ever


def check_training(
    oracle: TrainingOracle,
    records: list[Seen],
    prefix: str,
    clients: Iterable[SimTrainer | CommandSink],
    expected_commands: dict[str, dict[str, Any]] | None = None,
) -> dict[str, int]:
    """Reward statistics and commands equal the rules' (decision views), each command applied
    exactly once and acknowledged as applied once; returns the figures."""
    clients = list(clients)
    expected = oracle.commands if expected_commands is None else expected_commands
    stats_topic = topic_name(Topic.REWARD_STATS, prefix)
    commands_topic = topic_name(Topic.COMMANDS, prefix)
    stats_records = [r for r in records if r.topic == stats_topic]
    observed_stats = {stats_view(r.json()) for r in stats_records}
    expected_stats = oracle.distinct_stats()
    assert observed_stats == expected_stats
    last_seen: dict[str, tuple[Any, ...]] = {}
    for record in stats_records:
        last_seen[record.json()["run_id"]] = stats_view(record.json())
    assert last_seen == {run: rows[-1] for run, rows in oracle.stats.items() if rows}

    observed: dict[str, dict[str, Any]] = {}
    command_records = [r.json() for r in records if r.topic == commands_topic]
    for command in command_records:
        view = decision_view(command)
        previous = observed.setdefault(view["command_id"], view)
        assert previous == view, f"a replay changed a decision: {previous} then {view}"
    assert set(observed) == set(expected)
    for command_id, view in expected.items():
        assert observed[command_id] == decision_view(view), (
            f"{command_id}: the worker decided {observed[command_id]}, "
            f"the rules {decision_view(view)}"
        )

    applied: Counter[str] = Counter()
    first_acks: Counter[str] = Counter()
    repeat_acks = 0
    acks_topic = topic_name(Topic.ACKS, prefix)
    for client in clients:
        applied.update(client.applied)
        mine = {i for i, view in expected.items() if view["run_id"] == client.run_id}
        assert set(client.applied) == mine, client.run_id
        for sent in client.transport.records():
            if sent.topic == acks_topic:
                ack = orjson.loads(sent.value)
                if ack["detail"].endswith("already handled"):
                    repeat_acks += 1
                else:
                    first_acks[ack["command_id"]] += 1
    duplicates = sum(n - 1 for n in applied.values())
    assert duplicates == 0, [i for i, n in applied.items() if n > 1]
    assert first_acks == Counter(dict.fromkeys(expected, 1))
    return {
        "metrics_checked": oracle.metrics,
        "reward_stats_checked": len(expected_stats),
        "reward_stats_records_incl_replays": len(stats_records),
        "commands_checked": len(expected),
        "command_records_incl_replays": len(command_records),
        "duplicate_deliveries_absorbed_by_sdk": repeat_acks,
        "duplicates_applied": duplicates,
        "losses": len(expected_stats - observed_stats) + len(set(expected) - set(applied)),
    }
