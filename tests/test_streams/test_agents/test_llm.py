"""The breaker agent driven with in-memory outcomes: downshift, recovery on its timer,
replays, bad input, and the state it checkpoints (no broker, no Faust app)."""

from __future__ import annotations

import pytest

from schemas import LlmOutcome, Topic
from schemas.events import LlmMode
from streams.agents.llm import Breakers
from tests.test_streams.test_agents.memory import Harness, Record

MODEL = "qwen-fragrance"


def outcome(
    harness: Harness, index: int, *, ok: bool = False, mode: LlmMode = "creative"
) -> Record:
    return harness.record(
        LlmOutcome(
            model=MODEL,
            ok=ok,
            mode=mode,
            latency_ms=25.0,
            error=None if ok else "timeout",
            ts=harness.clock(),
            call_id=f"call-{index}",
        )
    )


def controls(harness: Harness) -> list[tuple[str, str, float, int, str]]:
    return [
        (event["state"], event["mode"], event["cache_ttl_s"], event["epoch"], event["reason"])
        for event in harness.output.values(harness.topic(Topic.LLM_CONTROL))
    ]


def test_three_failures_downshift_to_balanced_with_the_degraded_ttl() -> None:
    harness = Harness()
    breakers = harness.make(Breakers)
    harness.feed(breakers, [outcome(harness, i) for i in range(2)])
    assert controls(harness) == []  # two failures: still closed
    harness.feed(breakers, [outcome(harness, 2)])
    assert controls(harness) == [
        ("open", "balanced", 300.0, 1, "3 consecutive failures in creative: downshift to balanced")
    ]
    (sent,) = harness.output.on(harness.topic(Topic.LLM_CONTROL))
    assert sent.key == MODEL.encode()  # compacted per model
    breaker = breakers.live.get(MODEL.encode(), 0)
    assert (breaker.state, breaker.mode, breaker.until) == (
        "open",
        "balanced",
        harness.clock() + 300,
    )
    # The transition read the clock: its state is checkpointed promptly.
    assert harness.checkpoints.requested == 1
    assert harness.sample("fragrance_ops_breaker_state", model=MODEL) == 2
    assert harness.sample("fragrance_ops_breaker_mode", model=MODEL) == 1
    assert (
        harness.sample(
            "fragrance_ops_breaker_downgrades_total",
            model=MODEL,
            from_mode="creative",
            to_mode="balanced",
        )
        == 1
    )


def test_the_timer_ends_the_hold_with_no_traffic() -> None:
    harness = Harness()
    breakers = harness.make(Breakers)
    harness.feed(breakers, [outcome(harness, i) for i in range(3)])
    # The checkpoint the transition asked for: the timer acts on the stored breakers.
    harness.checkpoint(breakers)
    harness.clock.advance(299.0)
    harness.tick(breakers)
    assert len(controls(harness)) == 1  # still holding
    harness.clock.advance(1.0)
    harness.tick(breakers)
    assert controls(harness)[1] == (
        "half_open",
        "balanced",
        300.0,
        2,
        "held balanced for 300 s: probing creative",
    )


def test_a_partition_this_worker_does_not_own_is_left_to_its_owner() -> None:
    harness = Harness()
    breakers = harness.make(Breakers)
    harness.feed(breakers, [outcome(harness, i) for i in range(3)])
    harness.checkpoint(breakers)
    harness.owned.actives.clear()  # the partition moved to another worker
    harness.clock.advance(300.0)
    harness.tick(breakers)
    assert len(controls(harness)) == 1


def test_a_replayed_outcome_changes_nothing() -> None:
    harness = Harness()
    breakers = harness.make(Breakers)
    records = [outcome(harness, i) for i in range(2)]
    harness.feed(breakers, records)
    harness.checkpoint(breakers)
    store = harness.stores["llm-breakers"]
    stored = store.data[MODEL.encode()]
    # A restart from that checkpoint reads the same two failures again (the commit did not
    # happen): they are recognised by position, so a third failure still trips once.
    breakers = harness.restart(Breakers)
    harness.feed(breakers, records)
    harness.checkpoint(breakers)
    assert store.data[MODEL.encode()] == stored
    assert controls(harness) == []
    assert harness.sample("fragrance_ops_replayed_events_total", agent="llm-breakers") == 2
    harness.feed(breakers, [outcome(harness, 2)])
    assert [state for state, *_ in controls(harness)] == ["open"]


def test_the_checkpointed_state_brings_the_downshift_back_after_a_restart() -> None:
    harness = Harness()
    breakers = harness.make(Breakers)
    harness.feed(breakers, [outcome(harness, i) for i in range(3)])
    harness.checkpoint(breakers)
    stored = harness.stores["llm-breakers"].json(MODEL.encode())
    assert stored["partition"] == 0
    assert stored["applied"] == {f"0:{harness.topic(Topic.LLM_OUTCOMES)}": 2}
    assert stored["applied_at"] == harness.clock()
    assert (stored["state"]["state"], stored["state"]["mode"]) == ("open", "balanced")
    restarted = harness.restart(Breakers)
    breaker = restarted.live.get(MODEL.encode(), 0)
    assert (breaker.state, breaker.mode, breaker.epoch) == ("open", "balanced", 1)


def test_bad_outcomes_are_dead_lettered_and_the_batch_goes_on() -> None:
    harness = Harness()
    breakers = harness.make(Breakers)
    source = harness.topic(Topic.LLM_OUTCOMES)
    batch = [
        outcome(harness, 0),
        harness.raw(source, b"{not json", MODEL.encode()),
        harness.raw(source, b'{"model": "qwen-fragrance", "ok": false}', MODEL.encode()),
        outcome(harness, 1),
        outcome(harness, 2),
    ]
    harness.feed(breakers, batch)
    dead = harness.dead_letters()
    assert [(d.source_topic, d.offset) for d in dead] == [(source, 1), (source, 2)]
    assert dead[0].error.startswith("not valid JSON")
    assert dead[1].field == "mode"
    assert [state for state, *_ in controls(harness)] == ["open"]  # the three good failures


@pytest.mark.parametrize("mode", ["balanced", "fast"])
def test_outcomes_of_another_mode_do_not_count(mode: LlmMode) -> None:
    harness = Harness()
    breakers = harness.make(Breakers)
    harness.feed(breakers, [outcome(harness, i, mode=mode) for i in range(5)])
    assert controls(harness) == []
    assert harness.checkpoints.requested == 0
