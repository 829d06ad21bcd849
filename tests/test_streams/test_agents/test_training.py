"""The training agent's stored run settings: what a run announced and whether it finished,
old formats included."""

from __future__ import annotations

import orjson

from rules.run_lifecycle import RunLifecycle
from streams.agents.training import stored_announcement, stored_lifecycle


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
