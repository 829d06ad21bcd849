"""A run's operations: entropy commands, rollback to the last healthy checkpoint, budget."""

from __future__ import annotations

import math
from collections.abc import Callable

import orjson
import pytest

from config.settings import Settings, run_overrides
from rules.training import HELD_BACK_MAX, RunOperations
from schemas import (
    CheckpointSaved,
    CommandAck,
    Halt,
    PruneCheckpoints,
    Rollback,
    SetEntropyCoef,
    StepMetric,
)

RUN = "run-1"


def metric(step: int, loss: float = 1.0, reward: float = 1.0, attempt: int = 0) -> StepMetric:
    return StepMetric(
        run_id=RUN, step=step, loss=loss, reward=reward, ts=float(step), attempt=attempt
    )


def checkpoint(step: int) -> CheckpointSaved:
    return CheckpointSaved(run_id=RUN, step=step, uri=f"ckpt/{step}.pt", ts=float(step) + 0.5)


def feed(ops: RunOperations, steps: range, **values: float) -> list[object]:
    commands: list[object] = []
    for step in steps:
        commands += ops.on_metric(metric(step, **values), now=1.0)
        if step and step % 500 == 0:
            commands += ops.on_checkpoint(checkpoint(step), now=1.0)
    return commands


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_entropy_commands_follow_the_closed_form(kind: str) -> None:
    settings = run_overrides(Settings(), {"entropy.kind": kind})
    ops = RunOperations(RUN, settings)
    sent = [c for c in feed(ops, range(12_000)) if isinstance(c, SetEntropyCoef)]
    assert sent[0].step == 0
    assert sent[0].entropy_coef == pytest.approx(0.01, abs=1e-12)
    for command in sent:
        progress = min(command.step, 10_000) / 10_000
        expected = (
            0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi * progress))
            if kind == "cosine"
            else 0.01 - 0.009 * progress
        )
        assert command.entropy_coef == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert 10 < len(sent) < 200  # on change past the tolerance, not one per metric
    assert sent[-1].entropy_coef == pytest.approx(0.001, rel=1e-9)


def test_a_loss_spike_rolls_back_once_to_the_last_healthy_checkpoint() -> None:
    ops = RunOperations(RUN, Settings())
    assert not [c for c in feed(ops, range(1200)) if isinstance(c, Rollback | Halt)]
    spike = ops.on_metric(metric(1200, loss=5.0), now=2.0)
    rollbacks = [c for c in spike if isinstance(c, Rollback)]
    assert len(rollbacks) == 1
    rollback = rollbacks[0]
    assert (rollback.checkpoint_step, rollback.checkpoint_uri) == (1000, "ckpt/1000.pt")
    assert rollback.anomaly_step == 1200
    assert "loss spike" in rollback.reason
    assert rollback.values["loss"] == 5.0
    # The same spike replayed, and more anomalous steps of the same streak: no second one.
    again = ops.on_metric(metric(1200, loss=5.0), now=3.0)
    later = ops.on_metric(metric(1201, loss=9.0), now=3.0)
    assert not [c for c in again + later if isinstance(c, Rollback)]


def test_a_replayed_run_yields_the_same_rollback_id() -> None:
    first, second = RunOperations(RUN, Settings()), RunOperations(RUN, Settings())
    feed(first, range(700))
    feed(second, range(700))
    one = first.on_metric(metric(700, reward=-100.0), now=1.0)
    two = second.on_metric(metric(700, reward=-100.0), now=99.0)
    ids = {c.command_id for c in one + two if isinstance(c, Rollback)}
    assert len(ids) == 1


def test_after_the_ack_the_run_continues_from_the_restored_step() -> None:
    ops = RunOperations(RUN, Settings())
    feed(ops, range(1200))
    rollback = next(
        c for c in ops.on_metric(metric(1200, loss=5.0), now=1.0) if isinstance(c, Rollback)
    )
    ops.on_ack(
        CommandAck(command_id=rollback.command_id, run_id=RUN, status="applied", detail="", ts=2e3),
        now=1.0,
    )
    assert ops.pending_rollback is None
    resumed = ops.on_metric(metric(1001, attempt=1), now=1.0)
    assert any(isinstance(c, SetEntropyCoef) for c in resumed)  # resumed: value sent at once
    # Past warm-up and cooldown, a new spike on the new attempt rolls back again.
    commands = feed(ops, range(1002, 1400), attempt=1)  # type: ignore[arg-type]
    assert not [c for c in commands if isinstance(c, Rollback)]


def test_non_finite_loss_acts_immediately() -> None:
    ops = RunOperations(RUN, Settings())
    feed(ops, range(600))
    commands = ops.on_metric(metric(600, loss=math.nan), now=1.0)
    rollback = next(c for c in commands if isinstance(c, Rollback))
    assert rollback.checkpoint_step == 500
    assert "non-finite" in rollback.reason


def test_a_checkpoint_arriving_after_the_anomaly_is_still_the_target() -> None:
    # Checkpoints and metrics are different topics: the checkpoint of step 500 may be
    # consumed after the anomaly at step 600 that needs it.
    ops = RunOperations(RUN, Settings())
    for step in range(600):
        ops.on_metric(metric(step), now=1.0)
    assert not [
        c for c in ops.on_metric(metric(600, loss=9.0), now=1.0) if isinstance(c, Rollback | Halt)
    ]
    rollback = next(
        c for c in ops.on_checkpoint(checkpoint(500), now=1.0) if isinstance(c, Rollback)
    )
    assert (rollback.checkpoint_step, rollback.anomaly_step) == (500, 600)


def test_a_run_whose_checkpoints_before_the_anomaly_are_unhealthy_is_halted() -> None:
    ops = RunOperations(RUN, run_overrides(Settings(), {"anomaly.patience": 2}))
    feed(ops, range(480))
    ops.on_metric(metric(480, loss=10.0), now=1.0)  # alone: no act, but 500 is unhealthy
    feed(ops, range(481, 600))
    ops.on_metric(metric(600, loss=10.0), now=1.0)
    assert not [c for c in ops.on_metric(metric(601, loss=10.0), now=1.0) if isinstance(c, Halt)]
    commands = feed(ops, range(602, 1602))  # none healthy within two checkpoint intervals
    halt = next(c for c in commands if isinstance(c, Halt))
    assert "no healthy checkpoint before step 600" in halt.reason
    assert ops.on_metric(metric(1602), now=1.0) == []  # halted runs get no more commands
    assert ops.take_notices() == []


def test_a_young_run_is_not_halted_for_a_finite_anomaly_it_cannot_be_rolled_back_from() -> None:
    ops = RunOperations(RUN, Settings())
    feed(ops, range(120))  # no checkpoint yet
    assert ops.on_metric(metric(120, loss=10.0), now=1.0) == []
    commands = feed(ops, range(121, 1121))  # the wait: checkpoints at 500 and 1000 come
    assert not [c for c in commands if isinstance(c, Halt | Rollback)]
    (notice,) = ops.take_notices()
    assert "anomaly at step 120" in notice
    assert "no checkpoint saved before it" in notice
    # Protected again: the next streak rolls back to the newest healthy checkpoint.
    rollback = next(
        c for c in ops.on_metric(metric(1121, loss=10.0), now=1.0) if isinstance(c, Rollback)
    )
    assert (rollback.checkpoint_step, rollback.anomaly_step) == (1000, 1121)


def test_a_young_run_with_non_finite_values_is_halted() -> None:
    ops = RunOperations(RUN, Settings())
    feed(ops, range(120))
    assert ops.on_metric(metric(120, loss=math.nan), now=1.0) == []  # waits for a checkpoint
    commands = feed(ops, range(121, 1121), loss=math.nan)
    halt = next(c for c in commands if isinstance(c, Halt))
    assert "non-finite loss; no healthy checkpoint before step 120" in halt.reason


def test_a_young_run_whose_finite_anomaly_lasts_through_the_wait_is_halted() -> None:
    ops = RunOperations(RUN, Settings())
    feed(ops, range(40))
    ops.on_metric(metric(40, loss=10.0), now=1.0)
    commands = feed(ops, range(41, 1100), loss=10.0)  # every checkpoint since is diverged
    (halt,) = [c for c in commands if isinstance(c, Halt)]
    assert "no healthy checkpoint before step 40" in halt.reason
    assert halt.command_id
    assert ops.halted
    assert ops.take_notices() == []


def test_an_unanswered_anomaly_survives_a_crash() -> None:
    ops = RunOperations(RUN, Settings())
    feed(ops, range(120))
    ops.on_metric(metric(120, loss=10.0), now=1.0)
    feed(ops, range(121, 1121))
    ops.take_notices()
    restored = RunOperations.from_state(RUN, orjson.loads(orjson.dumps(ops.to_state())), Settings())
    # The released streak does not act again; the next one does, in both.
    for run in (ops, restored):
        assert run.on_metric(metric(1121, loss=10.0), now=1.0)


def test_the_rollback_budget_halts_a_run_that_keeps_diverging() -> None:
    ops = RunOperations(RUN, run_overrides(Settings(), {"anomaly.cooldown_steps": 0}))
    feed(ops, range(600))
    attempt = 0
    for _ in range(3):
        commands = ops.on_metric(metric(700, loss=50.0, attempt=attempt), now=1.0)
        rollback = next(c for c in commands if isinstance(c, Rollback))
        ops.on_ack(
            CommandAck(
                command_id=rollback.command_id,
                run_id=RUN,
                status="applied",
                detail="",
                ts=1e4 + attempt,
            ),
            now=1.0,
        )
        attempt += 1
        for step in range(501, 700):
            ops.on_metric(metric(step, attempt=attempt), now=1.0)
    commands = ops.on_metric(metric(700, loss=50.0, attempt=attempt), now=1.0)
    halt = next(c for c in commands if isinstance(c, Halt))
    assert len(halt.history) == 3
    assert "budget" in halt.reason


def test_retention_keeps_the_newest_healthy_checkpoint_through_a_long_anomaly() -> None:
    settings = run_overrides(Settings(), {"checkpoints.auto_rollback": False})
    ops = RunOperations(RUN, settings)
    pruned: list[int] = []
    for command in feed(ops, range(1001)):
        if isinstance(command, PruneCheckpoints):
            pruned += command.steps
    # Anomalous (a reward far below its baseline) for the next 8 checkpoints.
    for command in feed(ops, range(1001, 5001), reward=-1000.0):
        if isinstance(command, PruneCheckpoints):
            assert command.protected_step == 1000
            assert 1000 not in command.steps
            pruned += command.steps
    kept = [cp.step for cp in ops.ledger.checkpoints]
    assert 1000 in kept
    assert kept == [1000, 3000, 3500, 4000, 4500, 5000]
    assert sorted(pruned) == [500, 1500, 2000, 2500]


def test_a_step_saved_again_after_a_rollback_prunes_under_a_new_command_id() -> None:
    settings = run_overrides(Settings(), {"checkpoints.auto_rollback": False})
    ops = RunOperations(RUN, settings)
    first = [c for c in feed(ops, range(3001)) if isinstance(c, PruneCheckpoints)]
    resaved = CheckpointSaved(run_id=RUN, step=3000, uri="ckpt/3000-again.pt", ts=3e3, attempt=1)
    assert ops.on_checkpoint(resaved, now=1.0) == []  # held until attempt 1's metrics come
    resumed = ops.on_metric(metric(3001, attempt=1), now=1.0)
    again = [c for c in resumed if isinstance(c, PruneCheckpoints)]
    assert first
    assert again
    assert first[-1].steps != again[0].steps  # another decision ...
    assert first[-1].command_id != again[0].command_id  # ... so another id


Produced = list[StepMetric | CheckpointSaved | CommandAck]

INTERLEAVED = {
    "checkpoints.interval_steps": 50,
    "checkpoints.keep": 5,
    "checkpoints.health_lookback_steps": 20,
}


def anomalous_stretch() -> tuple[Settings, Produced]:
    """A run whose anomalous stretch (no rollbacks) makes the newest healthy checkpoint an
    old one, in its trainer's order (``TorchRunOps.end_step``): a step's checkpoint, then
    its metric."""
    settings = run_overrides(Settings(), INTERLEAVED | {"checkpoints.auto_rollback": False})
    produced: Produced = []
    for step in range(2400):
        if step and step % 50 == 0:
            produced.append(checkpoint(step))
        produced.append(metric(step, loss=9.0 if step in range(1210, 1600, 2) else 1.0))
    return settings, produced


def late_rollback() -> tuple[Settings, Produced]:
    """A run whose trainer hears of the rollback for its spike at step 620 only at step 920,
    after saving six more checkpoints, then acks it and goes on from step 600."""
    settings = run_overrides(Settings(), INTERLEAVED)
    trainer_view = RunOperations(RUN, settings)  # what the trainer will be told
    produced: Produced = []
    attempt, step, heard, saved_step = 0, 0, None, None
    while step < 1500:
        if step and step % 50 == 0:
            saved = checkpoint(step).model_copy(update={"attempt": attempt})
            produced.append(saved)
            trainer_view.on_checkpoint(saved, now=1.0)
            saved_step = step
        spike = (attempt, step) in {(0, 620), (1, 640)}  # the second within the cooldown
        sent = metric(step, loss=9.0 if spike else 1.0, attempt=attempt)
        sent = sent.model_copy(update={"checkpoint_step": saved_step})  # its newest save
        produced.append(sent)
        for command in trainer_view.on_metric(sent, now=1.0):
            if isinstance(command, Rollback):
                heard = command
        if heard is not None and step == 920:
            ack = CommandAck(
                command_id=heard.command_id, run_id=RUN, status="applied", detail="", ts=2e3
            )
            produced.append(ack)
            trainer_view.on_ack(ack, now=1.0)
            attempt, step, heard = attempt + 1, heard.checkpoint_step, None
            saved_step = step
        step += 1
    return settings, produced


def read(
    settings: Settings,
    produced: Produced,
    lead: int,
    *,
    acks_lead: int | None = None,
    crash_at: int | None = None,
) -> list[dict[str, object]]:
    """The commands when the worker reads the checkpoints topic ``lead`` events ahead of
    the metrics topic (negative: behind; 0: the trainer's order), and the acks topic
    ``acks_lead`` ahead (default: ``lead``). An ack is read only after the command it
    answers was decided. ``crash_at``: the state round-trips through JSON after that many
    events."""
    acks_lead = lead if acks_lead is None else acks_lead
    metrics = [(i, e) for i, e in enumerate(produced) if isinstance(e, StepMetric)]
    checkpoints = [(i, e) for i, e in enumerate(produced) if isinstance(e, CheckpointSaved)]
    acks = [(i, e) for i, e in enumerate(produced) if isinstance(e, CommandAck)]
    ops, commands, read_count = RunOperations(RUN, settings), [], 0
    while metrics or checkpoints or acks:
        next_metric = metrics[0][0] if metrics else math.inf
        if checkpoints and checkpoints[0][0] < next_metric + lead:
            commands += ops.on_checkpoint(checkpoints.pop(0)[1], now=1.0)
        elif (
            acks
            and acks[0][0] < next_metric + acks_lead
            and acks[0][1].command_id in {c.command_id for c in commands}
        ):
            commands += ops.on_ack(acks.pop(0)[1], now=1.0)
        else:
            commands += ops.on_metric(metrics.pop(0)[1], now=1.0)
        read_count += 1
        if read_count == crash_at:
            ops = RunOperations.from_state(
                RUN, orjson.loads(orjson.dumps(ops.to_state())), settings
            )
    return sorted((c.model_dump(exclude={"issued_at"}) for c in commands), key=str)


@pytest.mark.parametrize(
    ("run", "lead"),
    [
        *((anomalous_stretch, lead) for lead in (-1500, -150, 150, 1500)),
        # Acks and checkpoints read ahead (read behind: the next test). An ack read after
        # the new attempt's metrics can change which checkpoint a prune calls protected
        # (not what it deletes).
        *((late_rollback, lead) for lead in (150, 1500)),
    ],
)
@pytest.mark.parametrize("acks_lead", [None, 150])
def test_decisions_do_not_depend_on_how_far_one_topic_is_read_ahead_of_the_other(
    run: Callable[[], tuple[Settings, Produced]], lead: int, acks_lead: int | None
) -> None:
    # Faust reads the small checkpoints and acks topics far ahead of the metrics after a
    # rebalance or a restart (2,000 steps in the long fault profile): the newest healthy
    # checkpoint, which retention protects, must be judged on the metrics the trainer had
    # sent by then.
    settings, produced = run()
    in_order = read(settings, produced, 0)
    prunes = [c for c in in_order if c["type"] == "prune_checkpoints"]
    assert len(prunes) > 15
    assert read(settings, produced, lead, acks_lead=acks_lead) == in_order


@pytest.mark.parametrize("lead", [-50, -150, -280])
def test_a_rollback_waits_for_the_trainers_newest_checkpoint_however_far_behind_it_is_read(
    lead: int,
) -> None:
    # A worker catching up (after a SIGKILL, in one batch) can read 1,000 metrics of a run
    # before its checkpoints: the rollback must still go to the target it went to in the
    # trainer's order (the run acts on the rollback 300 steps later, so up to 300 behind).
    # Prunes are not compared: a checkpoint recorded late is judged on more metrics.
    settings, produced = late_rollback()

    def decisions(commands: list[dict[str, object]]) -> list[dict[str, object]]:
        return [c for c in commands if c["type"] in ("rollback", "halt")]

    in_order = decisions(read(settings, produced, 0))
    assert [c["checkpoint_step"] for c in in_order if c["type"] == "rollback"] == [600]
    assert decisions(read(settings, produced, lead, acks_lead=150)) == in_order


def test_a_lost_announcement_of_the_newest_checkpoint_is_proven_by_a_newer_one() -> None:
    ops = RunOperations(RUN, run_overrides(Settings(), INTERLEAVED))
    commands: list[object] = []
    for step in range(1, 800):
        if step == 650:  # a newer save: 600 will never be read
            assert [c for c in commands if isinstance(c, Rollback)] == []
        if step % 50 == 0 and step != 600:  # 600 saved, its announcement lost
            commands += ops.on_checkpoint(checkpoint(step), now=1.0)
        sent = metric(step, loss=9.0 if step == 620 else 1.0)
        sent = sent.model_copy(update={"checkpoint_step": step - step % 50 or None})
        commands += ops.on_metric(sent, now=1.0)
        rollbacks = [c for c in commands if isinstance(c, Rollback)]
        if 620 <= step < 650:  # waiting for 600; a newer save ends the wait
            assert rollbacks == []
            assert ops.awaiting_target is not None
    assert [(c.checkpoint_step, c.anomaly_step) for c in rollbacks] == [(550, 620)]


def test_the_late_rollback_and_the_anomalous_stretch_are_what_they_say() -> None:
    _, produced = late_rollback()
    assert sum(isinstance(e, CommandAck) for e in produced) == 1
    assert [e.step for e in produced if isinstance(e, CheckpointSaved) and e.attempt == 0][-6:] == [
        650,
        700,
        750,
        800,
        850,
        900,
    ]
    settings, produced = anomalous_stretch()
    prunes = [c for c in read(settings, produced, 0) if c["type"] == "prune_checkpoints"]
    assert {c["protected_step"] for c in prunes} > {1200}  # the anomaly pinned an old one


def test_held_back_checkpoints_and_restores_survive_a_crash() -> None:
    for run in (anomalous_stretch, late_rollback):
        settings, produced = run()
        for crash_at in (700, 1000):
            assert read(settings, produced, 1500, crash_at=crash_at) == read(
                settings, produced, 1500
            )


def test_checkpoints_are_held_back_for_a_bounded_number_only() -> None:
    ops = RunOperations(RUN, run_overrides(Settings(), {"checkpoints.keep": 5}))
    pruned = []
    for step in range(1, HELD_BACK_MAX + 50):
        pruned += ops.on_checkpoint(checkpoint(step * 500), now=1.0)  # no metric ever comes
    assert len(ops.held_back) == HELD_BACK_MAX
    assert pruned  # the oldest were recorded, and retention went on


def test_state_round_trips_and_continues_identically() -> None:
    uncrashed, crashed = RunOperations(RUN, Settings()), RunOperations(RUN, Settings())
    feed(uncrashed, range(1100))
    feed(crashed, range(1100))
    crashed = RunOperations.from_state(RUN, crashed.to_state(), Settings())
    assert crashed.to_state() == uncrashed.to_state()
    assert crashed.on_metric(metric(1100, loss=9.0), now=5.0) == uncrashed.on_metric(
        metric(1100, loss=9.0), now=5.0
    )


def spiked_naming_an_unread_checkpoint() -> RunOperations:
    """Checkpoint 500 read; a spike at step 1100 whose metric names the trainer's save of
    step 1000, not read (yet): the rollback waits for it."""
    ops = RunOperations(RUN, Settings())
    ops.on_checkpoint(checkpoint(500), now=1.0)
    for step in range(1100):
        ops.on_metric(metric(step), now=1.0)
    spike = StepMetric(run_id=RUN, step=1100, loss=9.0, reward=1.0, ts=1100.0, checkpoint_step=1000)
    assert not [c for c in ops.on_metric(spike, now=1.0) if isinstance(c, Rollback)]
    return ops


def test_the_trainers_newest_checkpoint_is_awaited_before_an_older_one_is_chosen() -> None:
    ops = spiked_naming_an_unread_checkpoint()
    rollback = next(
        c for c in ops.on_checkpoint(checkpoint(1000), now=1.0) if isinstance(c, Rollback)
    )
    assert rollback.checkpoint_step == 1000


def test_a_silent_run_is_rolled_back_without_the_checkpoint_its_metrics_named() -> None:
    # The announcement of step 1000 never comes: the trainer died after the spike. Once
    # silent, the run is rolled back to the newest healthy checkpoint read.
    ops = spiked_naming_an_unread_checkpoint()
    [rollback] = ops.on_silence(now=61.0)
    assert isinstance(rollback, Rollback)
    assert (rollback.checkpoint_step, rollback.anomaly_step) == (500, 1100)
    assert ops.awaiting_target is None
    assert ops.on_silence(now=122.0) == []  # decided once


def test_a_silent_run_with_no_healthy_checkpoint_is_decided_as_after_the_wait() -> None:
    # No checkpoint before a non-finite loss: halted (a finite one would be reported).
    ops = RunOperations(RUN, Settings())
    feed(ops, range(120))
    assert ops.on_metric(metric(120, loss=math.nan), now=1.0) == []
    [halt] = ops.on_silence(now=61.0)
    assert isinstance(halt, Halt)
    assert "non-finite loss; no healthy checkpoint before step 120" in halt.reason
    # A run that waits for nothing is left alone.
    assert RunOperations(RUN, Settings()).on_silence(now=61.0) == []


def test_an_anomaly_on_a_checkpoint_step_waits_for_the_checkpoint_before_it() -> None:
    # The trainer saves step 700, then logs metric 700 naming that save; the worker has read
    # the checkpoints topic only up to 600. The target is 650, read with 700.
    ops = RunOperations(RUN, run_overrides(Settings(), INTERLEAVED))
    for step in range(700):
        if step and step % 50 == 0 and step <= 600:
            ops.on_checkpoint(checkpoint(step), now=1.0)
        ops.on_metric(metric(step).model_copy(update={"checkpoint_step": step // 50 * 50}), 1.0)
    spike = metric(700, loss=9.0).model_copy(update={"checkpoint_step": 700})
    assert not [c for c in ops.on_metric(spike, now=1.0) if isinstance(c, Rollback)]
    assert not [c for c in ops.on_checkpoint(checkpoint(650), now=1.0) if isinstance(c, Rollback)]
    [rollback] = [c for c in ops.on_checkpoint(checkpoint(700), now=1.0) if isinstance(c, Rollback)]
    assert (rollback.checkpoint_step, rollback.anomaly_step) == (650, 700)


def test_a_run_resumed_on_a_host_whose_clock_is_behind_keeps_its_checkpoints() -> None:
    """Checkpoints are ordered by (attempt, step), never by the trainer's clock: after a
    resume from 1000 on a host 10 minutes behind, its checkpoint at 1500 is the target."""
    ops = RunOperations(RUN, Settings())
    feed(ops, range(1001))  # checkpoints 500 and 1000, stamped 500.5 and 1000.5
    for step in range(1001, 1601):  # attempt 1, stamped 600 s behind the first host
        resumed = metric(step, attempt=1).model_copy(update={"ts": step - 600.0})
        ops.on_metric(resumed, now=1.0)
        if step == 1500:
            saved = checkpoint(1500).model_copy(update={"ts": 900.0, "attempt": 1})
            assert ops.on_checkpoint(saved, now=1.0) == []
    assert [cp.step for cp in ops.ledger.checkpoints] == [500, 1000, 1500]
    # A replay of the resumed attempt's announcement is still recognised as one.
    assert not ops.ledger.record(1500, "ckpt/1500.pt", attempt=1)
    [rollback] = [
        c
        for c in ops.on_metric(metric(1601, loss=9.0, attempt=1), now=1.0)
        if isinstance(c, Rollback)
    ]
    assert rollback.checkpoint_step == 1500


def test_an_applied_retune_rescales_the_entropy_schedule_once() -> None:
    ops = RunOperations(RUN, Settings())
    feed(ops, range(2000))
    scheduled = ops.entropy.schedule.value(1999)
    ack = CommandAck(
        command_id="rt-1",
        run_id=RUN,
        status="applied",
        detail="retune applied",
        ts=2e3,
        before={"entropy_coef": scheduled},
        after={"entropy_coef": 2 * scheduled},
        command_type="retune",
    )
    (command,) = ops.on_ack(ack, now=1.0)
    assert isinstance(command, SetEntropyCoef)
    assert command.entropy_coef == pytest.approx(2 * scheduled)
    assert ops.on_ack(ack, now=1.0) == []  # a replayed ack changes nothing
    feed(ops, range(2000, 2100))
    assert ops.on_ack(ack, now=1.0) == []  # nor later, at a newer position
    restored = RunOperations.from_state(RUN, ops.to_state(), Settings())
    assert restored.on_ack(ack, now=1.0) == []  # nor after a restart
    # Later values follow the schedule's decay from the retuned level, not the old curve.
    later = [c for c in feed(ops, range(2100, 6000)) if isinstance(c, SetEntropyCoef)]
    assert later
    assert later[-1].entropy_coef == pytest.approx(
        2 * ops.entropy.schedule.value(later[-1].step), rel=1e-9
    )
    rejected = ack.model_copy(update={"command_id": "rt-2", "status": "rejected"})
    assert ops.on_ack(rejected, now=1.0) == []


def test_acks_replayed_from_any_depth_are_recognised_by_position() -> None:
    ops = RunOperations(RUN, Settings())
    origin = "3:p.trainer.acks"
    assert [ops.is_replayed_input(origin, offset) for offset in (10, 11, 40)] == [False] * 3
    assert ops.is_replayed_input(origin, 40)  # a duplicate read of the newest
    assert ops.is_replayed_input(origin, 0)  # however far back (ids are kept for 32 retunes)
    assert not ops.is_replayed_input("4:p.trainer.acks", 0)  # another partition's own positions
    restored = RunOperations.from_state(RUN, ops.to_state(), Settings())
    assert restored.is_replayed_input(origin, 39)
    assert not restored.is_replayed_input(origin, 41)


def test_the_ack_of_a_forged_rollback_does_not_cancel_the_pending_one() -> None:
    ops = RunOperations(RUN, Settings())
    feed(ops, range(1200))
    rollback = next(
        c for c in ops.on_metric(metric(1200, loss=5.0), now=1.0) if isinstance(c, Rollback)
    )
    forged = CommandAck(
        command_id=rollback.command_id,
        run_id=RUN,
        status="rejected",
        detail="invalid signature",
        ts=2e3,
        command_type="rollback",
    )
    ops.on_ack(forged, now=1.0)
    assert ops.pending_rollback is not None
    genuine = forged.model_copy(update={"status": "applied", "detail": "rollback applied"})
    ops.on_ack(genuine, now=1.0)
    assert ops.pending_rollback is None
