"""A trainer process for scenario 8: trains, follows its commands, may die mid-command.

    python -m tests.test_faults.crash_trainer --dir D --run-id R --steps N
        [--kill-at after_apply|after_log] [--resume]

``after_apply``: SIGKILL itself right after the rollback handler returned (before its id is
logged, acknowledged or committed). ``after_log``: right after the id reached the durable
applied log (before the ack and the commit). Each run of the rollback handler appends a line
to ``D/applications.log``; the last stdout line is a JSON summary.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import orjson
import torch

from producers import TrainerClient
from producers.torch_ops import TorchRunOps
from schemas import Command


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--kill-at", choices=["after_apply", "after_log"])
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    client = TrainerClient(args.run_id)
    ops = TorchRunOps(client, model, optimizer, args.dir / "checkpoints")
    resumed = ops.resume_latest() if args.resume else None
    applications = args.dir / "applications.log"

    def rollback(command: Command) -> dict[str, object]:
        result = ops._rollback(command)
        with applications.open("a") as log:
            log.write(f"{command.command_id} pid {os.getpid()}\n")
            log.flush()
            os.fsync(log.fileno())
        if args.kill_at == "after_apply":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    client.on_command("rollback", rollback)
    if args.kill_at == "after_log":
        add = client.applied.add

        def add_then_die(command_id: str, status: str) -> None:
            add(command_id, status)  # type: ignore[arg-type]
            os.kill(os.getpid(), signal.SIGKILL)

        client.applied.add = add_then_die  # type: ignore[method-assign]

    inputs = torch.randn(64, 4)
    while ops.step < args.steps:
        loss = model(inputs).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ops.end_step(loss=loss.item(), reward=1.0)
        time.sleep(0.05)  # a real trainer's pace: commands arrive mid-run
    client.close()
    print(orjson.dumps({"resumed": resumed, "step": ops.step, "attempt": client.attempt}).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
