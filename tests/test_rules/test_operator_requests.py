"""Operator requests on a run's operations (``RunOperations.on_request``)."""

from __future__ import annotations

import math

import orjson

from config.settings import Settings, run_overrides
from rules.training import RunOperations
from schemas import CommandAck, Halt, OperatorRequest, Rollback, SetEntropyCoef
from schemas.events import OperatorAction
from tests.test_rules.test_training import RUN, checkpoint, feed, metric

NO_COOLDOWN = {"anomaly.cooldown_steps": 0}


def request(
    action: OperatorAction,
    request_id: str = "req-1",
    *,
    step: int | None = None,
    value: float | None = None,
) -> OperatorRequest:
    return OperatorRequest(
        request_id=request_id,
        run_id=RUN,
        action=action,
        step=step,
        value=value,
        reason="looked at the curves",
        requested_by="alice@lab",
        ts=1.0,
    )


def healthy_run(steps: int = 1200) -> RunOperations:
    ops = RunOperations(RUN, run_overrides(Settings(), NO_COOLDOWN))
    feed(ops, range(steps))  # checkpoints at 500 and 1000
    return ops


def exhaust_budget(ops: RunOperations) -> Halt:
    """Three rollbacks, then a fourth anomaly: the budget halts the run."""
    attempt = 0
    for _ in range(3):
        commands = ops.on_metric(metric(1100, loss=50.0, attempt=attempt), now=1.0)
        rollback = next(c for c in commands if isinstance(c, Rollback))
        ack = CommandAck(
            command_id=rollback.command_id, run_id=RUN, status="applied", detail="", ts=1.0
        )
        ops.on_ack(ack, now=1.0)
        attempt += 1
        for step in range(1001, 1100):
            ops.on_metric(metric(step, attempt=attempt), now=1.0)
    commands = ops.on_metric(metric(1100, loss=50.0, attempt=attempt), now=1.0)
    return next(c for c in commands if isinstance(c, Halt))


def test_a_halt_request_halts_the_run_and_says_who_asked_and_why() -> None:
    ops = healthy_run()
    answer = ops.on_request(request("halt"), now=2.0)
    assert answer.accepted
    assert isinstance(answer.command, Halt)
    assert answer.command.reason == "operator alice@lab: looked at the curves"
    assert ops.halted
    assert ops.on_metric(metric(1200, loss=math.nan), now=2.0) == []  # ignored while halted
    again = ops.on_request(request("halt", "req-2"), now=2.0)
    assert (again.accepted, again.detail, again.command) == (
        False,
        "the run is halted: resume it first",
        None,
    )


def test_a_resumed_run_is_protected_again_with_a_fresh_budget() -> None:
    ops = healthy_run(1100)
    assert not ops.on_request(request("resume"), now=1.0).accepted  # not halted
    halt = exhaust_budget(ops)
    assert "budget" in halt.reason
    assert ops.on_metric(metric(1101, loss=math.nan, attempt=3), now=1.0) == []
    answer = ops.on_request(request("resume", "req-2"), now=1.0)
    assert answer.accepted
    assert answer.command is None
    assert answer.detail == "resumed: protected again, 3 rollbacks in the budget"
    # The resumed run's NaN is answered: a rollback to its last healthy checkpoint.
    commands = ops.on_metric(metric(1102, loss=math.nan, attempt=3), now=1.0)
    (rollback,) = [c for c in commands if isinstance(c, Rollback)]
    assert rollback.checkpoint_step == 1000


def test_a_rollback_request_goes_to_a_kept_checkpoint_and_waits_for_its_ack() -> None:
    ops = healthy_run()
    refused = ops.on_request(request("rollback", step=750), now=1.0)
    assert not refused.accepted
    assert refused.detail == "no kept checkpoint at step 750 (kept: 500, 1000)"
    answer = ops.on_request(request("rollback", "req-2", step=500), now=1.0)
    assert answer.accepted
    rollback = answer.command
    assert isinstance(rollback, Rollback)
    assert (rollback.checkpoint_step, rollback.checkpoint_uri) == (500, "ckpt/500.pt")
    assert rollback.reason == "operator alice@lab: looked at the curves"
    pending = ops.on_request(request("rollback", "req-3", step=1000), now=1.0)
    assert pending.detail == "a rollback to step 500 waits for the trainer's ack"
    ack = CommandAck(
        command_id=rollback.command_id, run_id=RUN, status="applied", detail="", ts=1.0
    )
    ops.on_ack(ack, now=1.0)
    ops.on_metric(metric(501, attempt=1), now=1.0)
    assert ops.pending_rollback is None
    assert ops.budget.history == []  # an operator's rollback is not the rules' budget
    assert ops.detector.last_position == (1, 501)


def test_set_entropy_sends_the_value_and_the_schedule_continues_from_it() -> None:
    ops = healthy_run()
    answer = ops.on_request(request("set_entropy", value=0.005), now=1.0)
    assert answer.accepted
    command = answer.command
    assert isinstance(command, SetEntropyCoef)
    assert (command.entropy_coef, command.step) == (0.005, 1199)
    same_step = ops.on_request(request("set_entropy", "req-2", value=0.002), now=1.0)
    assert not same_step.accepted
    assert same_step.detail == "the entropy coefficient was set at step 1199 already; retry later"
    scheduled = ops.entropy.schedule.value(1199)
    later = [c for c in feed(ops, range(1200, 3000)) if isinstance(c, SetEntropyCoef)]
    assert later
    ratio = later[-1].entropy_coef / ops.entropy.schedule.value(later[-1].step)
    assert math.isclose(ratio, 0.005 / scheduled)
    assert ops.on_request(request("set_entropy", "req-3", value=0.002), now=1.0).accepted


def test_the_same_request_gives_the_same_command_id_and_survives_a_crash() -> None:
    first, second = healthy_run(), healthy_run()
    answer = first.on_request(request("halt", "req-9"), now=1.0)
    restored = RunOperations.from_state(
        RUN, orjson.loads(orjson.dumps(second.to_state())), run_overrides(Settings(), NO_COOLDOWN)
    )
    replayed = restored.on_request(request("halt", "req-9"), now=5.0)
    assert answer.command is not None
    assert replayed.command is not None
    assert replayed.command.command_id == answer.command.command_id
    other = healthy_run().on_request(request("halt", "req-10"), now=1.0)
    assert other.command is not None
    assert other.command.command_id != answer.command.command_id
    assert first.to_state()["halted"]
    assert RunOperations.from_state(RUN, first.to_state(), Settings()).halted


def test_a_checkpoint_read_after_the_request_is_not_a_target_yet() -> None:
    ops = healthy_run(1000)  # the checkpoint at 1000 is read with no metric of step 1000
    ops.on_checkpoint(checkpoint(1500), now=1.0)  # read ahead of the metrics: held back
    assert not ops.on_request(request("rollback", step=1500), now=1.0).accepted
