"""What a protected run gains: the reference PPO trainer's final reward, clean and with a
divergence injected, with the fragrance-ops worker watching it and without.

    python benchmarks/outcome.py --broker apache          # Apache Kafka (KRaft, JVM)
    python benchmarks/outcome.py --bootstrap HOST:PORT    # a Kafka already running
    python benchmarks/outcome.py --steps 1000 --seeds 1   # a quick check

The reference trainer (``producers.reference``) runs ``--steps`` (4,000) minibatch updates
for each of ``--seeds`` (3) seeds, in four arms: clean or faulted (its parameters corrupted
once at 60% of the steps, ``inject_fault``), with a worker processing its metrics or
without one. Without the worker the SDK still publishes to the same broker and nothing
answers: the trainer pays the same publishing cost, and no command can reach it. The four
arms announce no per-run overrides (the worker's defaults apply); a fifth arm runs the
clean trainer with the worker and the reference trainer's own overrides
(``REFERENCE_RUN_SETTINGS``), for the false-rollback rate both ways.

The final reward of a run is the mean of the reward it reported over the last 10% of its
steps (the reference trainer reports, per update, the mean return of the episodes its
minibatch learns from). After a rollback the steps from the checkpoint on are reported
again; the curve and the final reward keep the last report of each step (the run as it
ended). A rollback counts when the trainer's attempt number moved. Printed: each run,
each arm's mean, the faulted/clean ratios with and without the worker, the rollbacks per
clean run; a PNG of the mean reward curves goes to ``--png``.
torch runs on ``--torch-threads`` (1) threads: on 2 shared cores, torch's default of one
thread per core beside the broker and the worker (and a type check) made a 4,000-step run
take 222 s instead of 18 s. With the worker, clean runs also differ slightly from those
without: the worker sends the entropy schedule's commands, which the trainer applies.
This is a benchmark, not a test: figures depend on the machine, its load and the seeds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from harness import (
    add_worker_setting_option,
    broker,
    fresh_settings,
    running_worker,
    worker_settings,
)

from config.settings import Settings
from producers import TrainerClient
from producers.reference import ReferencePPOTrainer
from producers.reference.ppo import REFERENCE_RUN_SETTINGS, StepReport


@dataclass(frozen=True, slots=True)
class Arm:
    name: str
    faulted: bool
    worker: bool
    overrides: bool = False


ARMS = (
    Arm("clean, no worker", faulted=False, worker=False),
    Arm("faulted, no worker", faulted=True, worker=False),
    Arm("clean, worker", faulted=False, worker=True),
    Arm("faulted, worker", faulted=True, worker=True),
    Arm("clean, worker, run overrides", faulted=False, worker=True, overrides=True),
)


@dataclass(frozen=True, slots=True)
class RunResult:
    curve: list[float]  # the reward of each step, as the run ended
    final: float
    rollbacks: int
    halted: bool
    seconds: float


def run(settings: Settings, arm: Arm, steps: int, seed: int) -> RunResult:
    """One reference run; its reward per step (the last report of each step)."""
    rewards: dict[int, float] = {}

    def record(report: StepReport) -> None:
        rewards[report.step] = report.reward

    with tempfile.TemporaryDirectory() as checkpoints:
        client = TrainerClient(f"outcome-{uuid.uuid4().hex[:6]}", settings=settings)
        trainer = ReferencePPOTrainer(
            client,
            Path(checkpoints),
            seed=seed,
            run_settings=dict(REFERENCE_RUN_SETTINGS) if arm.overrides else {},
        )
        if arm.faulted:
            trainer.inject_fault(int(0.6 * steps))
        started = time.perf_counter()
        trainer.train(steps, on_step=record)
        elapsed = time.perf_counter() - started
        rollbacks, halted = client.attempt, trainer.ops.halted
        client.close()
    ended = max(rewards) + 1
    curve = [rewards[step] for step in range(ended)]
    tail = curve[int(0.9 * steps) :] or curve[-1:]
    return RunResult(curve, statistics.fmean(tail), rollbacks, halted, elapsed)


def write_png(
    path: Path, results: dict[Arm, list[RunResult]], steps: int, seeds: list[int]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for panel, with_worker in zip(panels, (False, True), strict=True):
        for arm, runs in results.items():
            if arm.worker != with_worker:
                continue
            length = min(len(result.curve) for result in runs)
            mean = [
                statistics.fmean(result.curve[step] for result in runs) for step in range(length)
            ]
            panel.plot(
                range(length),
                mean,
                label=arm.name,
                color="tab:red" if arm.faulted else "tab:blue",
                linestyle=":" if arm.overrides else "-",
            )
        panel.axvline(int(0.6 * steps), color="grey", linewidth=0.8, linestyle="--")
        panel.set_title("with the worker" if with_worker else "without the worker")
        panel.set_xlabel("step (minibatch update)")
        panel.legend(fontsize=8, loc="lower right")
    panels[0].set_ylabel("reward (mean return of the update's episodes)")
    figure.suptitle(
        f"reference PPO, {steps} steps, fault at {int(0.6 * steps)} (dashed), "
        f"mean of {len(seeds)} seeds"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", choices=["tansu", "apache"], default="tansu")
    parser.add_argument("--bootstrap", help="use this Kafka instead of starting one")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1..N")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--png", type=Path, default=Path("benchmarks/outcome.png"))
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch's intra-op threads (1: no oversubscription beside the broker and worker)",
    )
    add_worker_setting_option(parser)
    args = parser.parse_args()
    seeds = list(range(1, args.seeds + 1))
    torch.set_num_threads(args.torch_threads)
    print("command: " + " ".join(["python", *sys.argv]))

    results: dict[Arm, list[RunResult]] = {arm: [] for arm in ARMS}
    with broker(args.broker, args.bootstrap) as (bootstrap, embedded):
        print(
            f"broker: {args.bootstrap or args.broker} at {bootstrap}; {args.steps} steps, "
            f"fault at step {int(0.6 * args.steps)}, seeds {seeds}"
        )
        alone = fresh_settings(bootstrap, embedded, args.partitions, "outalone")
        watched = fresh_settings(bootstrap, embedded, args.partitions, "outwatched")
        with running_worker(watched, **worker_settings(args)):
            time.sleep(3.0)  # past its first commits after readiness
            for seed in seeds:
                for arm in ARMS:
                    result = run(watched if arm.worker else alone, arm, args.steps, seed)
                    results[arm].append(result)
                    print(
                        f"seed {seed}, {arm.name}: final reward {result.final:.4f}, "
                        f"{result.rollbacks} rollback(s)"
                        f"{', halted' if result.halted else ''}, {result.seconds:.1f} s",
                        flush=True,
                    )

    means = {arm: statistics.fmean(result.final for result in results[arm]) for arm in ARMS}
    print()
    print("| arm | " + " | ".join(f"seed {seed}" for seed in seeds) + " | mean | rollbacks |")
    print("|---|" + "---|" * (len(seeds) + 2))
    for arm in ARMS:
        finals = " | ".join(f"{result.final:.4f}" for result in results[arm])
        rollbacks = sum(result.rollbacks for result in results[arm])
        print(f"| {arm.name} | {finals} | {means[arm]:.4f} | {rollbacks} |")
    print()
    clean_off, faulted_off, clean_on, faulted_on, clean_overrides = ARMS
    print(
        f"faulted / clean final reward: {means[faulted_on] / means[clean_on]:.2f} with the "
        f"worker, {means[faulted_off] / means[clean_off]:.2f} without"
    )
    for arm, how in ((clean_on, "default settings"), (clean_overrides, "run overrides")):
        rate = sum(result.rollbacks for result in results[arm]) / len(results[arm])
        print(f"false rollbacks per clean run, {how}: {rate:.2f}")
    args.png.parent.mkdir(parents=True, exist_ok=True)
    write_png(args.png, results, args.steps, seeds)
    print(f"reward curves: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
