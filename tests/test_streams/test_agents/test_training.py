"""The training agent: its stored run settings (old formats included), and the agent driven
with in-memory events: rollbacks, statistics, replays, bad input, requests, finished runs."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest

from rules.commands import rollback_command_id
from rules.run_lifecycle import RunLifecycle
from schemas import (
    CheckpointSaved,
    OperatorRequest,
    RunAnnounced,
    RunFinished,
    StepMetric,
    Topic,
)
from streams.agents.training import TrainingAgent, stored_announcement, stored_lifecycle
from tests.test_streams.test_agents.memory import Harness, Record


def test_a_run_never_announced_has_the_defaults_and_trains_with_ppo() -> None:
    assert stored_announcement(None) == (None, "ppo", None)


def test_settings_stored_before_runs_named_their_algorithm_read_as_ppo() -> None:
    assert stored_announcement(b"null") == (None, "ppo", None)
    assert stored_announcement(b'{"reward.window_size": 500}') == (
        {"reward.window_size": 500},
        "ppo",
        None,
    )


def test_the_stored_announcement_gives_back_overrides_and_algorithm() -> None:
    stored = orjson.dumps(
        {
            "overrides": {"anomaly.patience": 3},
            "algorithm": "grpo",
            "announced_at": ["0:trainer.runs", 7],
        }
    )
    assert stored_announcement(stored) == ({"anomaly.patience": 3}, "grpo", ("0:trainer.runs", 7))


def test_a_run_stored_before_finishes_existed_is_running_on_an_unknown_partition() -> None:
    assert stored_lifecycle(None) == (RunLifecycle(), None)
    assert stored_lifecycle(b"null") == (RunLifecycle(), None)
    assert stored_lifecycle(b'{"reward.window_size": 500}') == (RunLifecycle(), None)
    old = orjson.dumps({"overrides": None, "algorithm": "ppo", "announced_at": None})
    assert stored_lifecycle(old) == (RunLifecycle(), None)


def test_a_finished_run_is_read_back_with_its_partition() -> None:
    lifecycle = RunLifecycle(reached=(0, 9))
    lifecycle.on_finish(100.0, (0, 9))
    stored = orjson.dumps(
        {
            "overrides": {"anomaly.patience": 3},
            "algorithm": "grpo",
            "announced_at": ["2:trainer.runs", 8],
            "partition": 2,
            "finished": lifecycle.to_state(),
        }
    )
    assert stored_lifecycle(stored) == (lifecycle, 2)
    assert stored_announcement(stored) == ({"anomaly.patience": 3}, "grpo", ("2:trainer.runs", 8))


# The agent driven with in-memory events (no broker, no Faust app).
RUN = "run-1"
URI = "file:///checkpoints/run-1/100.pt"


def metric(harness: Harness, step: int, *, loss: float | None = None, **fields: Any) -> Record:
    """A healthy step's metric (a loss of about 1), unless told otherwise."""
    value = 1.0 + 0.01 * (step % 3) if loss is None else loss
    return harness.record(
        StepMetric(run_id=RUN, step=step, loss=value, reward=0.5, ts=harness.clock(), **fields)
    )


def checkpoint(harness: Harness, step: int) -> Record:
    return harness.record(CheckpointSaved(run_id=RUN, step=step, uri=URI, ts=harness.clock()))


def healthy_run(harness: Harness) -> list[Record]:
    """Steps 0-100 healthy, the checkpoint of step 100, steps 101-109 naming it."""
    records = [metric(harness, step) for step in range(101)]
    records.append(checkpoint(harness, 100))
    records += [metric(harness, step, checkpoint_step=100) for step in range(101, 110)]
    return records


def test_a_nan_loss_after_a_healthy_checkpoint_rolls_back_to_it() -> None:
    harness = Harness()
    agent = harness.make(TrainingAgent)
    harness.feed(agent, healthy_run(harness))
    assert harness.commands("rollback") == []
    harness.feed(agent, [metric(harness, 110, loss=math.nan, checkpoint_step=100)])
    (rollback,) = harness.commands("rollback")
    assert rollback["run_id"] == RUN
    assert (rollback["checkpoint_step"], rollback["checkpoint_uri"]) == (100, URI)
    assert rollback["anomaly_step"] == 110
    assert rollback["values"]["loss"] == "NaN"
    assert "loss" in rollback["reason"]
    assert rollback["command_id"] == rollback_command_id(RUN, attempt=0, streak_start=110)
    assert harness.sample("fragrance_ops_commands_total", type="rollback") == 1
    # Every metric's (finite) reward entered the window and was answered.
    stats = harness.output.values(harness.topic(Topic.REWARD_STATS))
    assert [s["step"] for s in stats] == list(range(111))
    assert harness.output.on(harness.topic(Topic.REWARD_STATS))[0].key == RUN.encode()
    assert (stats[-1]["mean"], stats[-1]["std"], stats[-1]["count"]) == (0.5, 0.0, 111)


def test_a_non_finite_reward_is_acted_on_but_kept_out_of_the_window() -> None:
    harness = Harness()
    agent = harness.make(TrainingAgent)
    harness.feed(agent, healthy_run(harness))
    bad = harness.record(
        StepMetric(
            run_id=RUN,
            step=110,
            loss=1.0,
            reward=-math.inf,
            ts=harness.clock(),
            checkpoint_step=100,
        )
    )
    harness.feed(agent, [bad, metric(harness, 111, checkpoint_step=100)])
    (rollback,) = harness.commands("rollback")
    assert (rollback["checkpoint_step"], rollback["anomaly_step"]) == (100, 110)
    stats = harness.output.values(harness.topic(Topic.REWARD_STATS))
    assert [s["step"] for s in stats][-2:] == [109, 111]
    assert stats[-1]["count"] == 111
    assert harness.dead_letters() == []  # not bad input: the contract carries it


def test_the_first_metric_sets_the_entropy_coefficient() -> None:
    harness = Harness()
    agent = harness.make(TrainingAgent)
    harness.feed(agent, [metric(harness, 0)])
    (command,) = harness.commands()
    assert (command["type"], command["entropy_coef"], command["step"]) == (
        "set_entropy_coef",
        pytest.approx(0.01),
        0,
    )
    # The hyperparameters the feedback agent proposes from are shared after the batch.
    harness.feed(agent, [metric(harness, 1, entropy_coef=0.02, learning_rate=0.001)])
    assert harness.ctx.hyperparameters == {RUN: {"entropy_coef": 0.02, "learning_rate": 0.001}}


def test_replayed_records_change_nothing() -> None:
    harness = Harness()
    agent = harness.make(TrainingAgent)
    records = healthy_run(harness)
    harness.feed(agent, records)
    harness.checkpoint(agent)
    sent = len(harness.output.sent)
    stored = {name: dict(store.data) for name, store in harness.stores.opened.items()}
    assert set(stored) == {"run-settings", "reward-windows", "run-operations"}
    assert RUN.encode() in stored["reward-windows"]
    assert RUN.encode() in stored["run-operations"]
    # A worker restarted from that checkpoint reads the same records again.
    agent = harness.restart(TrainingAgent)
    harness.feed(agent, records)
    harness.checkpoint(agent)
    assert len(harness.output.sent) == sent  # no command, no statistics again
    for name, store in harness.stores.opened.items():
        assert store.data == stored[name], name
    # And the run goes on as if read once: the anomaly rolls back to the same checkpoint.
    harness.feed(agent, [metric(harness, 110, loss=math.nan, checkpoint_step=100)])
    (rollback,) = harness.commands("rollback")
    assert rollback["checkpoint_step"] == 100


def test_bad_input_is_dead_lettered_and_the_batch_goes_on() -> None:
    harness = Harness()
    agent = harness.make(TrainingAgent)
    metrics = harness.topic(Topic.METRICS)
    runs = harness.topic(Topic.RUNS)
    batch = [
        metric(harness, 0),
        harness.raw(metrics, b"[1, 2]", RUN.encode()),
        harness.raw(metrics, b'{"run_id": "run-1", "step": 1, "loss": 1.0, "ts": 1}', b"run-1"),
        harness.record(
            RunAnnounced(run_id=RUN, ts=harness.clock(), settings={"reward.window_size": -3})
        ),
        harness.raw(runs, b'{"type": "paused", "run_id": "run-1", "ts": 1}', b"run-1"),
        metric(harness, 1),
    ]
    harness.feed(agent, batch)
    dead = harness.dead_letters()
    assert [(d.source_topic, d.offset, d.field) for d in dead] == [
        (metrics, 1, None),
        (metrics, 2, "reward"),
        (runs, 0, "settings"),
        (runs, 1, "type"),
    ]
    assert dead[0].error == "expected a JSON object, got list"
    assert harness.sample("fragrance_ops_dead_letters_total", topic=metrics) == 2
    stats = harness.output.values(harness.topic(Topic.REWARD_STATS))
    assert [s["step"] for s in stats] == [0, 1]  # the good ones on both sides


def test_an_operator_request_for_an_unknown_run_is_refused_with_the_reason() -> None:
    harness = Harness()
    agent = harness.make(TrainingAgent)
    request = OperatorRequest(
        request_id="req-1",
        run_id="run-never-seen",
        action="halt",
        requested_by="alice",
        reason="test",
        ts=harness.clock(),
    )
    harness.feed(agent, [harness.record(request)])
    (reply,) = harness.output.values(harness.topic(Topic.OPERATOR_REPLIES))
    assert (reply["request_id"], reply["accepted"]) == ("req-1", False)
    assert reply["detail"].startswith("unknown run")
    assert harness.commands() == []


def test_the_run_health_gauges_show_the_window_and_a_halt_at_each_checkpoint() -> None:
    harness = Harness()
    agent = harness.make(TrainingAgent)
    harness.feed(agent, healthy_run(harness))
    harness.checkpoint(agent)

    def gauges() -> tuple[float | None, ...]:
        window = [
            harness.sample("fragrance_ops_reward_window", run_id=RUN, stat=stat)
            for stat in ("mean", "std", "count")
        ]
        return (harness.sample("fragrance_ops_run_halted", run_id=RUN), *window)

    assert gauges() == (0.0, 0.5, 0.0, 110.0)
    request = OperatorRequest(
        request_id="req-halt",
        run_id=RUN,
        action="halt",
        requested_by="alice",
        reason="looks wrong",
        ts=harness.clock(),
    )
    harness.feed(agent, [harness.record(request)])
    assert gauges()[0] == 0.0  # exported at the checkpoint, as the state is written
    harness.checkpoint(agent)
    assert gauges() == (1.0, 0.5, 0.0, 110.0)


def test_a_finished_run_is_dropped_once_quiet_for_the_retention() -> None:
    harness = Harness()
    agent = harness.make(TrainingAgent)
    harness.feed(
        agent,
        [
            harness.record(RunAnnounced(run_id=RUN, ts=harness.clock(), settings={})),
            metric(harness, 0),
            harness.record(RunFinished(type="finished", run_id=RUN, ts=harness.clock())),
        ],
    )
    harness.checkpoint(agent)
    assert harness.stores["run-settings"].json(RUN.encode())["finished"] is not None
    assert harness.sample("fragrance_ops_run_halted", run_id=RUN) == 0.0
    retention = harness.settings.worker.finished_run_retention_s
    harness.clock.advance(retention - 1)
    harness.checkpoint(agent)
    assert RUN.encode() in harness.stores["run-operations"].data
    harness.owned.rebalancing = True  # ownership unknown: nothing is decided
    harness.clock.advance(1)
    harness.checkpoint(agent)
    assert RUN.encode() in harness.stores["run-operations"].data
    harness.owned.rebalancing = False
    harness.checkpoint(agent)
    tombstones = {(name, key) for name, key, value, _ in harness.sink.writes if value is None}
    assert tombstones == {
        ("run-settings", RUN.encode()),
        ("reward-windows", RUN.encode()),
        ("run-operations", RUN.encode()),
    }
    assert all(store.data == {} for store in harness.stores.opened.values())
    # Its series went with it.
    assert harness.sample("fragrance_ops_run_halted", run_id=RUN) is None
    assert harness.sample("fragrance_ops_reward_window", run_id=RUN, stat="mean") is None


def waiting_for_a_lost_checkpoint(harness: Harness) -> list[Record]:
    """An announced healthy run whose metrics name a save of step 130 that never comes (the
    trainer died), then a NaN loss: the rollback waits for step 130's checkpoint."""
    records = [harness.record(RunAnnounced(run_id=RUN, ts=harness.clock(), settings={}))]
    records += healthy_run(harness)
    records += [metric(harness, step, checkpoint_step=100) for step in range(110, 131)]
    records += [metric(harness, step, checkpoint_step=130) for step in range(131, 140)]
    records.append(metric(harness, 140, loss=math.nan, checkpoint_step=130))
    return records


def test_a_rollback_waiting_on_a_silent_run_is_sent_by_the_timer() -> None:
    harness = Harness()
    agent = harness.make(TrainingAgent)
    harness.feed(agent, waiting_for_a_lost_checkpoint(harness))
    harness.checkpoint(agent)
    assert harness.stores["run-operations"].json(RUN.encode())["awaiting_target"] is not None
    assert harness.commands("rollback") == []
    wait_s = harness.settings.checkpoints.silent_decision_after_s
    harness.clock.advance(wait_s - 1)
    harness.tick(agent)
    assert harness.commands("rollback") == []  # not silent for long enough yet
    requested = harness.checkpoints.requested
    harness.clock.advance(1)
    harness.tick(agent)
    (rollback,) = harness.commands("rollback")
    assert (rollback["checkpoint_step"], rollback["anomaly_step"]) == (100, 140)
    assert rollback["command_id"] == rollback_command_id(RUN, attempt=0, streak_start=140)
    assert harness.checkpoints.requested == requested + 1  # a clock decision: made durable
    harness.tick(agent)
    harness.checkpoint(agent)
    stored = harness.stores["run-operations"].json(RUN.encode())
    assert (stored["awaiting_target"], stored["pending_rollback"]["step"]) == (None, 100)
    # Decided once, and stored: the restarted worker does not decide again.
    restarted = harness.restart(TrainingAgent)
    harness.clock.advance(2 * wait_s)
    harness.tick(restarted)
    assert len(harness.commands("rollback")) == 1


def test_a_restarted_worker_finds_the_waiting_run_and_counts_its_silence_anew() -> None:
    harness = Harness()
    agent = harness.make(TrainingAgent)
    harness.feed(agent, waiting_for_a_lost_checkpoint(harness))
    harness.checkpoint(agent)
    harness.clock.advance(1_000)  # silent while no worker ran
    restarted = harness.restart(TrainingAgent)
    harness.tick(restarted)
    assert harness.commands("rollback") == []  # silence counts from the takeover
    harness.clock.advance(harness.settings.checkpoints.silent_decision_after_s)
    harness.tick(restarted)
    (rollback,) = harness.commands("rollback")
    assert rollback["checkpoint_step"] == 100


def test_when_a_run_was_last_heard_of_survives_a_restart_and_a_replay() -> None:
    harness = Harness()
    agent = harness.make(TrainingAgent)
    announced = harness.record(RunAnnounced(run_id=RUN, ts=harness.clock(), settings={}))
    heard_at = harness.clock()
    harness.feed(agent, [announced, *(metric(harness, step) for step in range(20))])
    harness.checkpoint(agent)
    assert harness.stores["run-settings"].json(RUN.encode())["last_metric_at"] == heard_at
    # A replayed metric is not news.
    harness.clock.advance(100)
    harness.feed(agent, [Record(**{**vars(metric(harness, 19)), "offset": 19})])
    harness.checkpoint(agent)
    assert harness.stores["run-settings"].json(RUN.encode())["last_metric_at"] == heard_at
    # A restarted worker exports it at once (its first tick), not only at the run's next
    # metric: a run silent across a restart stays visible to RunSilent.
    harness.metrics.forget_partition_state()
    restarted = harness.restart(TrainingAgent)
    harness.tick(restarted)
    assert harness.sample("fragrance_ops_run_last_metric_timestamp_seconds", run_id=RUN) == heard_at


def test_a_finished_run_waiting_for_a_target_is_left_alone() -> None:
    harness = Harness()
    agent = harness.make(TrainingAgent)
    records = waiting_for_a_lost_checkpoint(harness)
    records.append(harness.record(RunFinished(type="finished", run_id=RUN, ts=harness.clock())))
    harness.feed(agent, records)
    harness.clock.advance(2 * harness.settings.checkpoints.silent_decision_after_s)
    harness.tick(agent)
    assert harness.commands("rollback") == harness.commands("halt") == []


def test_a_restarted_worker_shows_a_halted_runs_health_before_it_sends_anything() -> None:
    harness = Harness()
    agent = harness.make(TrainingAgent)
    records = [harness.record(RunAnnounced(run_id=RUN, ts=harness.clock(), settings={}))]
    records += [metric(harness, step) for step in range(30)]
    request = OperatorRequest(
        request_id="req-halt", run_id=RUN, action="halt", requested_by="a", reason="r", ts=0.0
    )
    harness.feed(agent, [*records, harness.record(request)])
    harness.checkpoint(agent)
    harness.metrics.forget_partition_state()  # a rebalance or a restart: gauges cleared
    restarted = harness.restart(TrainingAgent)
    harness.tick(restarted)
    assert harness.sample("fragrance_ops_run_halted", run_id=RUN) == 1.0
    assert harness.sample("fragrance_ops_reward_window", run_id=RUN, stat="count") == 30.0
