"""What the operations layer costs the training it protects: the reference PPO trainer's wall
time with a worker running on the same host, against the same trainer without one.

    python benchmarks/trainer_overhead.py --broker apache  # Apache Kafka (KRaft, JVM)
    python benchmarks/trainer_overhead.py                  # embedded broker (Tansu)

The reference trainer (``producers.reference``) runs ``--steps`` (4,000) minibatch updates
through the trainer SDK, ``--repeats`` (2) times each way, alternating: with the
fragrance-ops worker processing its metrics (and sending its entropy commands), and with
no worker (the SDK still publishes; nothing reads). The run is announced with no per-run
overrides. Printed: each run's wall time and the worker's CPU over it, the medians, and
the ratio with / without. Same broker, same seed, same machine, in one run.
This is a benchmark, not a test: figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from harness import (
    add_worker_setting_option,
    broker,
    fresh_settings,
    running_worker,
    worker_settings,
)
from worker_cpu import cpu_seconds

from config.settings import Settings
from producers import TrainerClient
from producers.reference import ReferencePPOTrainer


def train(settings: Settings, steps: int, seed: int) -> float:
    """Seconds the reference trainer takes for ``steps`` updates."""
    with tempfile.TemporaryDirectory() as checkpoints:
        client = TrainerClient(f"overhead-{uuid.uuid4().hex[:6]}", settings=settings)
        trainer = ReferencePPOTrainer(client, Path(checkpoints), seed=seed, run_settings={})
        started = time.perf_counter()
        trainer.train(steps)
        elapsed = time.perf_counter() - started
        client.close()
    assert trainer.ops.step == steps, f"stopped at step {trainer.ops.step} (halted?)"
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", choices=["tansu", "apache"], default="tansu")
    parser.add_argument("--bootstrap", help="use this Kafka instead of starting one")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--partitions", type=int, default=8)
    add_worker_setting_option(parser)
    args = parser.parse_args()

    with broker(args.broker, args.bootstrap) as (bootstrap, embedded):
        print(f"broker: {args.bootstrap or args.broker} at {bootstrap}; {args.steps} steps")
        without: list[float] = []
        with_worker: list[float] = []
        for repeat in range(args.repeats):
            alone = fresh_settings(bootstrap, embedded, args.partitions, "alone")
            without.append(train(alone, args.steps, args.seed))
            print(f"run {repeat + 1}, no worker: {without[-1]:.1f} s")
            watched = fresh_settings(bootstrap, embedded, args.partitions, "watched")
            with running_worker(watched, **worker_settings(args)) as worker:
                assert worker.pid is not None
                time.sleep(3.0)  # past its first commits after readiness
                cpu = cpu_seconds(worker.pid)
                with_worker.append(train(watched, args.steps, args.seed))
                used = cpu_seconds(worker.pid) - cpu
            print(
                f"run {repeat + 1}, with the worker: {with_worker[-1]:.1f} s "
                f"(worker CPU {used:.2f} s, {used / args.steps * 1e6:,.0f} us per metric)"
            )
        alone_s, watched_s = statistics.median(without), statistics.median(with_worker)
        print(
            f"median: {alone_s:.1f} s without a worker, {watched_s:.1f} s with one; "
            f"ratio {watched_s / alone_s:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
