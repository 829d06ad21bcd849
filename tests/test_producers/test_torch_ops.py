"""A PyTorch loop with the operations layer, driven through the in-memory transport."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch

from config.settings import Settings, run_overrides
from producers import InMemoryTransport, TrainerClient
from producers.torch_ops import TorchRunOps
from schemas import Halt, PruneCheckpoints, Retune, Rollback, SetEntropyCoef, Topic, encode


def make_ops(tmp_path: Path, transport: InMemoryTransport) -> TorchRunOps:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    settings = run_overrides(Settings(), {"checkpoints.interval_steps": 5})
    client = TrainerClient("run-1", settings=settings, transport=transport)
    return TorchRunOps(client, model, optimizer, tmp_path / "run-1")


def train(ops: TorchRunOps, steps: int) -> None:
    for _ in range(steps):
        loss = ops.model(torch.randn(8, 4)).pow(2).mean()
        ops.optimizer.zero_grad()
        loss.backward()
        ops.optimizer.step()
        ops.end_step(loss=loss.item(), reward=float(np.random.rand() + random.random()))


def acks(transport: InMemoryTransport) -> list[dict[str, object]]:
    return [orjson.loads(r.value) for r in transport.records(Topic.ACKS)]


def rollback(uri: str, command_id: str = "rb-1") -> bytes:
    return encode(
        Rollback(
            command_id=command_id,
            run_id="run-1",
            issued_at=1.0,
            checkpoint_step=10,
            checkpoint_uri=uri,
            anomaly_step=12,
            reason="loss spike 3.0x baseline 0.1",
        )
    )


def test_checkpoints_are_saved_on_the_interval_and_announced(tmp_path: Path) -> None:
    transport = InMemoryTransport()
    ops = make_ops(tmp_path, transport)
    train(ops, 16)
    assert ops.store.steps() == [5, 10, 15]
    announced = [orjson.loads(r.value)["step"] for r in transport.records(Topic.CHECKPOINTS)]
    assert announced == [5, 10, 15]


def test_rollback_restores_parameters_optimizer_step_and_rng_exactly(tmp_path: Path) -> None:
    transport = InMemoryTransport()
    ops = make_ops(tmp_path, transport)
    train(ops, 11)  # checkpoint at step 10 holds the state after step 10
    saved = {name: p.detach().clone() for name, p in ops.model.named_parameters()}
    saved_optimizer = orjson.dumps(ops.optimizer.state_dict()["param_groups"])
    rng_after_save = (torch.rand(3), np.random.rand(3), random.random())
    train(ops, 4)
    transport.deliver(Topic.COMMANDS, b"run-1", rollback(ops.store.uri_for(10)))
    train(ops, 1)  # the command is applied at this step boundary
    assert ops.step == 11
    assert ops.client.attempt == 1
    for name, parameter in ops.model.named_parameters():
        assert torch.equal(parameter, saved[name]), name
    assert orjson.dumps(ops.optimizer.state_dict()["param_groups"]) == saved_optimizer
    assert torch.equal(torch.rand(3), rng_after_save[0])
    assert np.array_equal(np.random.rand(3), rng_after_save[1])
    assert random.random() == rng_after_save[2]
    (ack,) = acks(transport)
    assert ack["status"] == "applied"
    assert ack["after"] == {"step": 10, "attempt": 1}
    # Metrics after the rollback continue from the restored step under the new attempt.
    train(ops, 1)
    last = orjson.loads(transport.records(Topic.METRICS)[-1].value)
    assert (last["step"], last["attempt"]) == (11, 1)


@pytest.mark.parametrize("reference", ["../x", "/etc/passwd", "symlink"])
def test_unsafe_rollbacks_are_rejected_and_training_continues(
    tmp_path: Path, reference: str
) -> None:
    transport = InMemoryTransport()
    ops = make_ops(tmp_path, transport)
    train(ops, 6)
    if reference == "symlink":
        outside = tmp_path / "outside.pt"
        torch.save({"model": {}}, outside)
        (ops.store.directory / "step-000000003.pt").symlink_to(outside)
        reference = "step-000000003.pt"
    transport.deliver(Topic.COMMANDS, b"run-1", rollback(reference))
    train(ops, 2)
    (ack,) = acks(transport)
    assert ack["status"] == "rejected"
    assert "outside the run's directory" in str(ack["detail"]) or "does not exist" in str(
        ack["detail"]
    )
    assert ops.step == 8
    assert ops.client.attempt == 0


def test_entropy_prune_and_halt_commands(tmp_path: Path) -> None:
    transport = InMemoryTransport()
    ops = make_ops(tmp_path, transport)
    train(ops, 16)
    common = {"run_id": "run-1", "issued_at": 1.0}
    transport.deliver(
        Topic.COMMANDS,
        b"run-1",
        encode(SetEntropyCoef(command_id="e", entropy_coef=0.004, step=16, **common)),
    )
    transport.deliver(
        Topic.COMMANDS,
        b"run-1",
        encode(
            PruneCheckpoints(
                command_id="p", steps=[5], uris=[ops.store.uri_for(5), "/etc/passwd"], **common
            )
        ),
    )
    transport.deliver(
        Topic.COMMANDS, b"run-1", encode(Halt(command_id="h", reason="budget spent", **common))
    )
    train(ops, 1)
    assert ops.entropy_coef == 0.004
    assert ops.store.steps() == [10, 15]
    assert ops.halted
    assert ops.halt_reason == "budget spent"
    assert [ack["status"] for ack in acks(transport)] == ["applied", "applied", "applied"]


def retune(changes: dict[str, float], command_id: str = "rt-1") -> bytes:
    return encode(
        Retune(
            command_id=command_id,
            run_id="run-1",
            issued_at=1.0,
            changes=changes,
            rationale="window 100 ratings: mean 2.41 < 3.0",
            window={"size": 100},
        )
    )


def test_a_retune_sets_the_optimizer_learning_rate_and_acks_before_and_after(
    tmp_path: Path,
) -> None:
    transport = InMemoryTransport()
    ops = make_ops(tmp_path, transport)
    ops.clip_epsilon = 0.2
    train(ops, 2)
    transport.deliver(
        Topic.COMMANDS,
        b"run-1",
        retune({"learning_rate": 0.005, "entropy_coef": 0.02, "clip_epsilon": 0.16}),
    )
    train(ops, 1)
    assert [group["lr"] for group in ops.optimizer.param_groups] == [0.005]
    assert (ops.entropy_coef, ops.clip_epsilon) == (0.02, 0.16)
    (ack,) = acks(transport)
    assert ack["status"] == "applied"
    assert ack["before"] == {"learning_rate": 0.01, "entropy_coef": 0.01, "clip_epsilon": 0.2}
    assert ack["after"] == {"learning_rate": 0.005, "entropy_coef": 0.02, "clip_epsilon": 0.16}
    # The next metric reports the values in use, so the stream's view follows.
    train(ops, 1)
    last = orjson.loads(transport.records(Topic.METRICS)[-1].value)
    assert (last["learning_rate"], last["clip_epsilon"]) == (0.005, 0.16)


def test_a_retune_can_require_approval_and_unknown_parameters_are_rejected(
    tmp_path: Path,
) -> None:
    transport = InMemoryTransport()
    ops = make_ops(tmp_path, transport)
    ops.approve_retune = lambda command: "learning_rate" not in command.changes
    transport.deliver(Topic.COMMANDS, b"run-1", retune({"learning_rate": 0.5}, "rt-1"))
    transport.deliver(Topic.COMMANDS, b"run-1", retune({"clip_epsilon": 0.1}, "rt-2"))
    transport.deliver(Topic.COMMANDS, b"run-1", retune({"entropy_coef": 0.02}, "rt-3"))
    train(ops, 1)
    statuses = [(ack["command_id"], ack["status"]) for ack in acks(transport)]
    assert statuses == [("rt-1", "rejected"), ("rt-2", "rejected"), ("rt-3", "applied")]
    assert "not approved" in str(acks(transport)[0]["detail"])
    assert "clip_epsilon" in str(acks(transport)[1]["detail"])  # this loop has no clip range
    assert ops.learning_rate == 0.01
    assert ops.entropy_coef == 0.02


def test_a_restarted_trainer_resumes_from_its_newest_checkpoint_under_a_new_attempt(
    tmp_path: Path,
) -> None:
    transport = InMemoryTransport()
    ops = make_ops(tmp_path, transport)
    train(ops, 17)  # checkpoints at 5, 10, 15
    transport.deliver(Topic.COMMANDS, b"run-1", rollback(ops.store.uri_for(10)))
    train(ops, 3)  # rolled back to 10: attempt 1, steps 11 and 12 follow
    assert (ops.client.attempt, ops.step) == (1, 13)
    assert ops.store.steps() == [5, 10]  # 15 belonged to the abandoned trajectory
    saved = torch.load(ops.store.path_for(10), weights_only=True)["model"]
    restarted = make_ops(tmp_path, transport)  # a new process: same directory, same log
    assert restarted.resume_latest() == 10
    # Attempt 0 saved step 10, but attempt 1 was used since: attempts never repeat.
    assert (restarted.client.attempt, restarted.step) == (2, 11)
    for name, parameter in restarted.model.named_parameters():
        assert torch.equal(parameter, saved[name]), name
    restarted.client.poll_commands()  # the rollback is not applied again
    assert restarted.client.attempt == 2


def test_a_checkpoint_that_does_not_fit_is_rejected_and_leaves_the_run_untouched(
    tmp_path: Path,
) -> None:
    transport = InMemoryTransport()
    ops = make_ops(tmp_path, transport)
    train(ops, 6)
    other = torch.nn.Linear(7, 3)  # another model's shapes, in this run's directory
    uri = ops.store.save(3, {"model": other.state_dict(), "optimizer": {}, "step": 3})
    before = {name: p.detach().clone() for name, p in ops.model.named_parameters()}
    transport.deliver(Topic.COMMANDS, b"run-1", rollback(uri))
    ops.client.poll_commands()  # at a step boundary
    (ack,) = acks(transport)
    assert ack["status"] == "rejected"
    assert "does not fit this run" in str(ack["detail"])
    assert (ops.step, ops.client.attempt) == (6, 0)
    for name, parameter in ops.model.named_parameters():
        assert torch.equal(parameter, before[name]), name


def test_a_retuned_learning_rate_survives_a_rollback(tmp_path: Path) -> None:
    transport = InMemoryTransport()
    ops = make_ops(tmp_path, transport)
    train(ops, 11)
    transport.deliver(Topic.COMMANDS, b"run-1", retune({"learning_rate": 0.002}))
    transport.deliver(Topic.COMMANDS, b"run-1", rollback(ops.store.uri_for(10)))
    train(ops, 1)
    assert ops.client.attempt == 1
    assert ops.learning_rate == 0.002  # the checkpoint had 0.01; user feedback still holds
