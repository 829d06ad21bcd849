"""The training rules as an in-process worker, for trainer tests without a broker."""

from __future__ import annotations

from dataclasses import dataclass, field

from config.settings import Settings, run_overrides
from producers import InMemoryTransport, Record
from rules.training import RunOperations
from schemas import (
    CheckpointSaved,
    CommandAck,
    CommandBase,
    RunFinished,
    StepMetric,
    Topic,
    decode,
    decode_run_event,
    encode,
    topic_name,
)


@dataclass
class InMemoryOperations:
    """Every record a trainer publishes through ``transport`` goes through the run's
    ``RunOperations`` at once, in the trainer's order, as the worker's training agent would
    take it; the commands decided come back on the commands topic for the trainer to read."""

    transport: InMemoryTransport
    settings: Settings = field(default_factory=Settings)
    runs: dict[str, RunOperations] = field(default_factory=dict)
    commands: list[CommandBase] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        prefix = self.settings.kafka.topic_prefix
        self._topics = {topic_name(topic, prefix): topic for topic in Topic}
        self.transport.on_produce = self.feed

    def feed(self, record: Record) -> None:
        topic = self._topics.get(record.topic)
        decided: list[CommandBase] = []
        if topic is Topic.RUNS:
            announced = decode_run_event(record.value)
            if isinstance(announced, RunFinished):
                return  # the worker keeps the run a while: nothing to decide here
            settings = run_overrides(self.settings, dict(announced.settings))
            self.runs[announced.run_id] = RunOperations(announced.run_id, settings)
        elif topic is Topic.METRICS:
            metric = decode(StepMetric, record.value)
            decided = self._run(metric.run_id).on_metric(metric, now=0.0)
        elif topic is Topic.CHECKPOINTS:
            checkpoint = decode(CheckpointSaved, record.value)
            decided = self._run(checkpoint.run_id).on_checkpoint(checkpoint, now=0.0)
        elif topic is Topic.ACKS:
            ack = decode(CommandAck, record.value)
            decided = self._run(ack.run_id).on_ack(ack, now=0.0)
        commands = topic_name(Topic.COMMANDS, self.settings.kafka.topic_prefix)
        for command in decided:
            self.commands.append(command)
            self.transport.deliver(commands, command.key().encode(), encode(command))
        for run in self.runs.values():
            self.notices += run.take_notices()

    def _run(self, run_id: str) -> RunOperations:
        if run_id not in self.runs:
            self.runs[run_id] = RunOperations(run_id, self.settings)
        return self.runs[run_id]

    def of_type(self, command_type: str) -> list[CommandBase]:
        return [c for c in self.commands if c.type == command_type]  # type: ignore[attr-defined]
