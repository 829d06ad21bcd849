"""Latency from a metric's publication to the trainer receiving the resulting rollback.

    python benchmarks/rollback_latency.py                  # embedded broker (Tansu)
    python benchmarks/rollback_latency.py --broker apache  # Apache Kafka (KRaft, JVM)

Simulated trainers (``--runs`` 50, together ``--rate`` 1,000 metrics/s) publish through the
trainer SDK, announce a checkpoint every 50 steps, and spike their loss at known steps. The
latency of one sample runs from the ``log_step`` call that published the spike to the
moment the trainer's ``rollback`` handler runs (the SDK's command thread received it and
the trainer's next poll, at most 1 ms later, handed it over). Each trainer then rolls back
(new attempt, restored step) as a real one would, and spikes again later.

Each latency is also split at the rollback's ``issued_at`` (the deciding service's clock;
the same host's here): *decision*, from the spike's publication to the decision (the SDK's
send, the broker, the service's fetch and processing), and *delivery*, from the decision to
the handler (the service's produce, the broker, the SDK's command reader). On a shared
machine the tails of both move with the load of the broker and the driver, which runs every
simulated trainer in one process.

The same trainers are measured twice in one run: against the fragrance-ops worker, and
against a plain confluent-kafka service (consume, decode, "loss >= 2x previous", produce a
rollback) on the same broker. Printed: p50/p99 of each and the ratio worker / plain.
This is a benchmark, not a test: figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import orjson
from confluent_kafka import Consumer, Producer
from harness import (
    add_worker_setting_option,
    broker,
    fresh_settings,
    latency_summary,
    running_service,
    running_worker,
    subscribe_then_ready,
    worker_settings,
)

from config.settings import Settings
from producers import KafkaTransport, TrainerClient
from schemas import Command, Rollback, Topic, encode, topic_name

CHECKPOINT_EVERY = 50
SPIKE_AFTER_RESTORE = 130  # past the detector's 100-step cooldown after a rollback
RUN_SETTINGS: dict[str, bool | int | float | str] = {
    "checkpoints.interval_steps": CHECKPOINT_EVERY,
    "checkpoints.max_rollbacks": 1000,  # measure rollbacks, not the halt budget
}


@dataclass
class SimulatedRun:
    client: TrainerClient
    index: int
    step: int = 0
    spike_at: int = SPIKE_AFTER_RESTORE
    spike_sent: float | None = None
    spike_sent_at: float = 0.0  # the same moment on the wall clock, which issued_at reads
    latencies: list[float] = field(default_factory=list)
    decisions: list[float] = field(default_factory=list)  # publication to issued_at

    def on_rollback(self, command: Command) -> None:
        assert isinstance(command, Rollback)
        if self.spike_sent is None:
            return  # a duplicate of an answered spike
        self.latencies.append(time.perf_counter() - self.spike_sent)
        self.decisions.append(command.issued_at - self.spike_sent_at)
        self.spike_sent = None
        self.client.attempt += 1
        self.step = command.checkpoint_step + 1
        self.spike_at = command.checkpoint_step + SPIKE_AFTER_RESTORE + self.index % 10

    def publish_next(self) -> None:
        step = self.step
        if step > 0 and step % CHECKPOINT_EVERY == 0:
            self.client.checkpoint_saved(step, f"file:///bench/{self.client.run_id}/{step}.pt")
        spike = step == self.spike_at and self.spike_sent is None
        if spike:
            self.spike_sent, self.spike_sent_at = time.perf_counter(), time.time()
        newest = step - step % CHECKPOINT_EVERY
        self.client.log_step(
            step,
            loss=10.0 if spike else 1.0 + (step % 7) * 0.01,
            reward=1.0 + (step % 5) * 0.01,
            checkpoint_step=newest or None,
        )
        if self.step == step:
            self.step = step + 1


def drive(settings: Settings, runs: int, rate: float, samples_per_run: int) -> list[SimulatedRun]:
    """Run the simulated trainers until each measured ``samples_per_run`` rollbacks."""
    transport = KafkaTransport(settings)
    tag = uuid.uuid4().hex[:6]
    simulated = []
    for index in range(runs):
        client = TrainerClient(f"latency-{tag}-{index}", settings=settings, transport=transport)
        run = SimulatedRun(client, index)
        client.on_command("rollback", run.on_rollback)
        client.announce(RUN_SETTINGS)
        simulated.append(run)
    time.sleep(3.0)  # let every command reader join before the first spike
    started, sent = time.perf_counter(), 0
    deadline = time.monotonic() + 60.0 + samples_per_run * 15.0
    while time.monotonic() < deadline:
        if all(len(run.latencies) >= samples_per_run for run in simulated):
            break
        due = int((time.perf_counter() - started) * rate)
        while sent < due:
            simulated[sent % runs].publish_next()
            sent += 1
        for run in simulated:
            run.client.poll_commands()
        time.sleep(0.001)
    for run in simulated:
        run.client.close()
    transport.close(10)
    return simulated


def summary(name: str, simulated: list[SimulatedRun], samples_per_run: int) -> tuple[float, float]:
    """Print the latencies' p50/p99 with their split at the decision; return the former."""
    latencies = [x for run in simulated for x in run.latencies[:samples_per_run]]
    decisions = [x for run in simulated for x in run.decisions[:samples_per_run]]
    deliveries = [total - decided for total, decided in zip(latencies, decisions, strict=True)]
    result = latency_summary(name, "rollbacks", latencies)
    latency_summary("  decision (publication to issued_at)", "rollbacks", decisions)
    latency_summary("  delivery (issued_at to the handler)", "rollbacks", deliveries)
    return result


def plain_service(
    bootstrap: str, prefix: str, ready: threading.Event, stop: threading.Event
) -> None:
    """The baseline: consume metrics, decode, loss >= 2x previous, produce a rollback."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"plain-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",  # fresh topics; a slow group join loses nothing
            "fetch.wait.max.ms": 10,
        }
    )
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 1, "partitioner": "murmur2_random"}
    )
    subscribe_then_ready(consumer, topic_name(Topic.METRICS, prefix), ready)
    commands = topic_name(Topic.COMMANDS, prefix)
    previous: dict[str, float] = {}
    newest_checkpoint: dict[str, int] = {}
    while not stop.is_set():
        for message in consumer.consume(1000, timeout=0.001):  # returns at once when idle
            if message.error() is not None:
                continue
            metric = orjson.loads(message.value())
            run_id, loss = metric["run_id"], float(metric["loss"])
            checkpoint = newest_checkpoint[run_id] = metric.get("checkpoint_step") or 0
            if run_id in previous and loss >= 2.0 * previous[run_id]:
                rollback = Rollback(
                    command_id=uuid.uuid4().hex,
                    run_id=run_id,
                    issued_at=time.time(),
                    checkpoint_step=checkpoint,
                    checkpoint_uri=f"file:///bench/{run_id}/{checkpoint}.pt",
                    anomaly_step=metric["step"],
                    reason="loss spike",
                )
                producer.produce(commands, encode(rollback), message.key())
            previous[run_id] = loss
        producer.poll(0)
    producer.flush(10)
    consumer.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", choices=["tansu", "apache"], default="tansu")
    parser.add_argument("--bootstrap", help="use this Kafka instead of starting one")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--rate", type=float, default=1000.0, help="metrics/s over all runs")
    parser.add_argument("--samples-per-run", type=int, default=4)
    parser.add_argument("--partitions", type=int, default=8)
    add_worker_setting_option(parser)
    args = parser.parse_args()

    with broker(args.broker, args.bootstrap) as (bootstrap, embedded):
        print(
            f"broker: {args.bootstrap or args.broker} at {bootstrap}; {args.runs} runs, "
            f"{args.rate:.0f} metrics/s, {args.samples_per_run} rollbacks per run"
        )
        plain_settings = fresh_settings(bootstrap, embedded, args.partitions, "plain")
        with running_service(plain_service, bootstrap, plain_settings.kafka.topic_prefix):
            plain = summary(
                "plain confluent-kafka service",
                drive(plain_settings, args.runs, args.rate, args.samples_per_run),
                args.samples_per_run,
            )
        settings = fresh_settings(bootstrap, embedded, args.partitions, "lat")
        with running_worker(settings, **worker_settings(args)):
            ops = summary(
                "fragrance-ops worker",
                drive(settings, args.runs, args.rate, args.samples_per_run),
                args.samples_per_run,
            )
        print(f"ratio worker / plain: p50 {ops[0] / plain[0]:.2f}, p99 {ops[1] / plain[1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
