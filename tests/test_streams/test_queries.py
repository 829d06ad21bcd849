"""State on request: the JSON made from the rule objects, and the agents read without a
broker (tables filled by hand, the assignment faked), never creating state."""

from __future__ import annotations

import math
import statistics
from typing import Any

import orjson
import pytest
from faust.types import TP

from config.settings import KafkaSettings, MetricsSettings, RetuneSettings, Settings
from rules.breaker import BreakerPolicy, ModelBreaker
from rules.retune import Retuner
from rules.reward_window import RewardWindow
from rules.run_lifecycle import RunLifecycle
from rules.training import RunOperations
from schemas import CheckpointSaved, OperatorRequest, Rollback, StepMetric
from streams.queries import StateQueries, model_state, rating_window, run_state
from streams.state import key_partition

RUN = "run-q"


def metric(step: int, loss: float = 1.0, reward: float = 1.0) -> StepMetric:
    return StepMetric(run_id=RUN, step=step, loss=loss, reward=reward, ts=float(step))


def ops_after_a_nan_loss() -> tuple[RunOperations, list[object]]:
    """Checkpoints at 500 and 1000, then a NaN loss at step 1200: a rollback to 1000."""
    ops = RunOperations(RUN, Settings())
    commands: list[object] = []
    for step in range(1200):
        commands += ops.on_metric(metric(step), now=1.0)
        if step and step % 500 == 0:
            checkpoint = CheckpointSaved(run_id=RUN, step=step, uri=f"ckpt/{step}.pt", ts=1.0)
            commands += ops.on_checkpoint(checkpoint, now=1.0)
    commands += ops.on_metric(metric(1200, loss=math.nan), now=2.0)
    return ops, commands


def state_of(
    ops: RunOperations,
    window: RewardWindow | None = None,
    *,
    lifecycle: RunLifecycle | None = None,
    last_metric_at: float | None = 100.0,
    now: float = 130.0,
) -> dict[str, Any]:
    state = run_state(
        RUN,
        partition=3,
        algorithm="ppo",
        ops=ops,
        window=window or RewardWindow(1000),
        lifecycle=lifecycle or RunLifecycle(),
        rating=None,
        last_metric_at=last_metric_at,
        now=now,
        stale_after_s=300.0,
    )
    return dict(orjson.loads(orjson.dumps(state)))  # as the HTTP answer carries it


def test_a_run_after_a_nan_loss_shows_the_pending_rollback_and_the_budget_used() -> None:
    ops, commands = ops_after_a_nan_loss()
    (rollback,) = [command for command in commands if isinstance(command, Rollback)]
    state = state_of(ops)
    assert (state["run_id"], state["partition"], state["algorithm"]) == (RUN, 3, "ppo")
    assert (state["halted"], state["finished"]) == (False, False)
    assert (state["last_metric_at"], state["silent_s"], state["stale"]) == (100.0, 30.0, False)
    assert (state["attempt"], state["step"]) == (0, 1200)
    assert state["pending_rollback"] == {
        "command_id": rollback.command_id,
        "step": 1000,
        "attempt": 1,
    }
    assert state["awaiting_target"] is None
    rollbacks = state["rollbacks"]
    assert (rollbacks["used"], rollbacks["budget"]) == (1, Settings().checkpoints.max_rollbacks)
    assert rollbacks["history"] == [
        {"attempt": 0, "step": 1200, "checkpoint_step": 1000, "reason": rollback.reason}
    ]
    assert [(cp["step"], cp["health"]) for cp in state["checkpoints"]["kept"]] == [
        (500, "healthy"),
        (1000, "healthy"),
    ]
    assert state["checkpoints"]["protected"] == 1000
    assert state["entropy_coef"] == ops.entropy.last_sent is not None


def test_rollbacks_far_from_the_newest_step_are_not_counted_against_the_next() -> None:
    ops, _ = ops_after_a_nan_loss()
    within = Settings().checkpoints.rollback_within_steps
    ops.pending_rollback = None
    for step in range(1001, 1200 + within + 1):  # the new attempt, out of the anomaly's span
        ops.on_metric(
            StepMetric(run_id=RUN, step=step, loss=1.0, reward=1.0, ts=1.0, attempt=1), now=3.0
        )
    rollbacks = state_of(ops)["rollbacks"]
    assert (rollbacks["used"], len(rollbacks["history"])) == (0, 1)


def test_a_halted_run_says_so() -> None:
    ops = RunOperations(RUN, Settings())
    assert state_of(ops)["halted"] is False
    request = OperatorRequest(
        request_id="r1", run_id=RUN, action="halt", requested_by="ops", reason="t", ts=1.0
    )
    assert ops.on_request(request, now=1.0).accepted
    state = state_of(ops)
    assert state["halted"] is True
    assert (state["attempt"], state["step"], state["entropy_coef"]) == (None, None, None)
    assert state["checkpoints"] == {"kept": [], "protected": None}


def test_the_reward_window_gives_its_count_mean_and_population_std() -> None:
    window = RewardWindow(4)
    assert state_of(RunOperations(RUN, Settings()), window)["reward_window"] == {
        "count": 0,
        "capacity": 4,
        "mean": None,
        "std": None,
    }
    rewards = [1.0, 2.5, -3.0, 7.25, 0.5]
    for step, reward in enumerate(rewards):
        window.add(reward, step=step)
    shown = state_of(RunOperations(RUN, Settings()), window)["reward_window"]
    assert (shown["count"], shown["capacity"]) == (4, 4)
    assert shown["mean"] == pytest.approx(statistics.fmean(rewards[1:]), rel=1e-15)
    assert shown["std"] == pytest.approx(statistics.pstdev(rewards[1:]), rel=1e-15)


def test_the_rating_window_shows_its_progress_and_timeout() -> None:
    settings = RetuneSettings()
    retuner = Retuner(RUN, settings)
    assert rating_window(retuner, settings, now=10.0) is None
    for i in range(3):
        retuner.add(4.0, user_id=f"u{i}", formula_id="f", ts=1.0, now=100.0 + i)
    shown = rating_window(retuner, settings, now=110.0)
    assert shown == {
        "target": RUN,
        "sequence": 0,
        "size": 3,
        "min_window": settings.min_window,
        "max_window": settings.max_window,
        "opened_at": 100.0,
        "times_out_at": 100.0 + settings.window_timeout_s,
        "times_out_in_s": settings.window_timeout_s - 10.0,
    }


def test_a_breaker_shows_its_state_mode_ttl_and_time_to_recovery() -> None:
    policy = BreakerPolicy()
    breaker = ModelBreaker("qwen", policy)
    closed = model_state(breaker, partition=1, now=5.0)
    assert (closed["state"], closed["mode"], closed["cache_ttl_s"]) == ("closed", "creative", 3600)
    assert (closed["until"], closed["recovers_in_s"], closed["epoch"]) == (None, None, 0)
    for call in range(3):
        breaker.on_outcome(False, "creative", 10.0, now=100.0, call_id=f"c{call}")
    held = model_state(breaker, partition=1, now=160.0)
    assert (held["state"], held["mode"], held["cache_ttl_s"]) == ("open", "balanced", 300)
    assert held["until"] == 100.0 + policy.open_s
    assert held["recovers_in_s"] == policy.open_s - 60.0
    assert (held["recovery"], held["epoch"], held["partition"]) == ("probe", 1, 1)
    assert "3 consecutive failures" in held["reason"]
    assert model_state(breaker, partition=1, now=1e9)["recovers_in_s"] == 0.0


# --- the agents, read through StateQueries -------------------------------------------------


PARTITIONS = 4


@pytest.fixture
def worker() -> tuple[Any, StateQueries]:
    """A worker app built as in production (no broker reached), its assignment faked."""
    from streams import app as app_module

    captured: list[StateQueries] = []
    original = app_module.StateQueries

    def capture(*args: Any) -> StateQueries:
        captured.append(original(*args))
        return captured[-1]

    settings = Settings(
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:9", partitions=PARTITIONS),
        metrics=MetricsSettings(port=None),
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(app_module, "StateQueries", capture)
        app = app_module.create_app(settings)
    (queries,) = captured
    return app, queries


def assign(app: Any, topic: str, partitions: set[int]) -> None:
    app.assignor.assigned_actives = lambda: {TP(topic, p) for p in partitions}


def test_an_unknown_run_or_model_is_none_and_nothing_is_created(
    worker: tuple[Any, StateQueries],
) -> None:
    app, queries = worker
    training = queries.training
    assign(app, training.topics[0], set(range(PARTITIONS)))
    assert queries.run("never-seen") is None
    assert queries.model("never-seen") is None
    assert queries.runs() == {}
    assert queries.models() == {}
    assert training._runs == {}
    assert training.tables.operations.keys() == []
    assert list(queries.breakers.live.held_keys()) == []


def test_a_stored_run_is_read_on_its_owner_only_and_not_kept_live(
    worker: tuple[Any, StateQueries],
) -> None:
    app, queries = worker
    training = queries.training
    ops, _ = ops_after_a_nan_loss()
    key = RUN.encode()
    training.tables.operations.mirror(key, orjson.dumps(ops.to_state()))
    settings_record = {"overrides": {}, "algorithm": "grpo", "announced_at": None, "partition": 2}
    training.tables.run_settings.mirror(key, orjson.dumps(settings_record))
    metrics_topic = next(topic for topic in training.topics if topic.endswith("trainer.metrics"))
    assign(app, metrics_topic, {0, 1})  # not the run's partition: another worker's
    assert queries.run(RUN) is None
    assign(app, metrics_topic, {2})
    state = queries.run(RUN)
    assert state is not None
    assert (state["partition"], state["algorithm"]) == (2, "grpo")
    assert state["pending_rollback"] is not None
    assert state["pending_rollback"]["step"] == 1000
    assert list(queries.runs()) == [RUN]
    assert training._runs == {}  # read, not loaded into the live runs


def test_a_model_is_answered_from_the_live_breakers(worker: tuple[Any, StateQueries]) -> None:
    app, queries = worker
    live = queries.breakers.live
    breaker = ModelBreaker("qwen", BreakerPolicy())
    record = {"partition": 1, "state": breaker.to_state(), "applied": {}, "applied_at": None}
    live.table.mirror(b"qwen", orjson.dumps(record))
    assign(app, live.source_topics[0], {1})
    state = queries.model("qwen")
    assert state is not None
    assert (state["state"], state["partition"]) == ("closed", 1)
    assert list(queries.models()) == ["qwen"]
    assign(app, live.source_topics[0], {0})
    assert queries.model("qwen") is None


def test_the_owner_of_a_key_is_the_worker_holding_its_partition(
    worker: tuple[Any, StateQueries],
) -> None:
    app, queries = worker
    changelog = queries.training.tables.operations.changelog_topic
    partition = key_partition(RUN.encode(), PARTITIONS)
    others = [p for p in range(PARTITIONS) if p != partition]
    layout = {
        "http://a:9300": {changelog: others},
        "http://b:9300": {changelog: [partition]},
    }
    app.router.tables_metadata = lambda: layout
    assert queries.run_owner(RUN) == "http://b:9300"
    assert queries.workers() == ["http://a:9300", "http://b:9300"]
    app.router.tables_metadata = lambda: {"http://a:9300": {changelog: others}}
    assert queries.run_owner(RUN) is None


def test_the_advertised_url_is_the_bind_and_port_or_the_one_given() -> None:
    assert MetricsSettings().advertised_url() == "http://127.0.0.1:9300"
    assert MetricsSettings(port=0).advertised_url() is None
    assert MetricsSettings(port=None).advertised_url() is None
    assert MetricsSettings(bind="::1").advertised_url() == "http://[::1]:9300"
    given = MetricsSettings(url="http://worker-0.ops:9300/")
    assert given.advertised_url() == "http://worker-0.ops:9300"
    assert MetricsSettings().worker_urls() == ["http://127.0.0.1:9300"]
    assert MetricsSettings(port=0).worker_urls() == []
    assert MetricsSettings(status_urls=["http://w:1/"]).worker_urls() == ["http://w:1"]


def test_a_worker_advertising_no_url_names_itself_where_it_listens(
    worker: tuple[Any, StateQueries],
) -> None:
    app, queries = worker  # metrics.port None: Faust's default canonical URL, not reachable
    canonical = str(app.conf.canonical_url)
    app.router.tables_metadata = lambda: {canonical: {}, "http://b:9300": {}}
    assert queries.own_url() == canonical
    queries.serving_at = "http://127.0.0.1:41234"
    assert queries.own_url() == "http://127.0.0.1:41234"
    assert queries.is_self(canonical)
    assert queries.workers() == ["http://127.0.0.1:41234", "http://b:9300"]


def test_a_run_whose_state_cannot_be_read_is_left_out_of_the_list(
    worker: tuple[Any, StateQueries],
) -> None:
    app, queries = worker
    training = queries.training
    assign(app, training.topics[0], set(range(PARTITIONS)))
    ops, _ = ops_after_a_nan_loss()
    training.tables.operations.mirror(RUN.encode(), orjson.dumps(ops.to_state()))
    training.tables.operations.mirror(b"unreadable", orjson.dumps({"version": 99}))
    assert list(queries.runs()) == [RUN]
    with pytest.raises(ValueError, match="state version 99"):
        queries.run("unreadable")  # asked alone: the HTTP server answers 500 with the reason


def test_a_run_silent_past_the_setting_is_stale_unless_it_finished() -> None:
    ops = RunOperations(RUN, Settings())
    assert state_of(ops, now=400.0)["stale"] is False  # silent 300 s: not longer
    silent = state_of(ops, now=400.5)
    assert (silent["silent_s"], silent["stale"]) == (300.5, True)
    finished = RunLifecycle()
    finished.on_finish(150.0, None)
    assert state_of(ops, lifecycle=finished, now=1000.0)["stale"] is False
    unknown = state_of(ops, last_metric_at=None, now=1000.0)  # as status from the topics
    assert (unknown["silent_s"], unknown["stale"]) == (None, True)
