"""The training agent's stored run settings: what a run announced, old formats included."""

from __future__ import annotations

import orjson

from streams.agents.training import stored_announcement


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
