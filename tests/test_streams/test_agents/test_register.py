"""``streams.agents.register``, the same for every agent: input topics subscribed, internal
topics declared, and the timer of an agent that has one running its ``tick`` between
batches (a Faust app made, never started: no broker)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, cast

import faust
import pytest

from streams.agents import register
from streams.agents.feedback import Feedback
from streams.agents.llm import Breakers
from streams.agents.training import SILENCE_CHECK_INTERVAL_S, TrainingAgent
from streams.metrics import WorkerMetrics
from streams.runtime import AgentRuntime
from tests.test_streams.test_agents.memory import PARTITIONS, Harness
from tests.test_streams.test_agents.test_feedback import low_ratings, ratings

Timer = Callable[[], Coroutine[Any, Any, None]]


def test_every_agent_is_registered_the_same_way(monkeypatch: pytest.MonkeyPatch) -> None:
    app = faust.App(
        "unit", broker="kafka://127.0.0.1:1", topic_partitions=PARTITIONS, web_enabled=False
    )
    runtime = AgentRuntime(app, cast(Any, None), cast(Any, None), WorkerMetrics())
    timers: list[tuple[float, Timer]] = []

    def timer(interval_s: float) -> Callable[[Timer], Timer]:
        def add(clock: Timer) -> Timer:
            timers.append((interval_s, clock))
            return clock

        return add

    monkeypatch.setattr(app, "timer", timer)
    harness = Harness()
    training = register(app, runtime, harness.make(TrainingAgent))
    breakers = register(app, runtime, harness.make(Breakers))
    feedback = register(app, runtime, harness.make(Feedback))

    assert runtime.input_topics == {*training.topics, *breakers.topics, *feedback.topics}
    internal = [
        (topic.get_topic_name(), topic.partitions) for topic in app.topics if topic.internal
    ]
    assert internal == [(feedback.by_target, PARTITIONS)]
    # The training agent looks for silent runs every second; the others tick at their
    # settings' intervals.
    settings = harness.settings
    assert [interval for interval, _ in timers] == [
        SILENCE_CHECK_INTERVAL_S,
        settings.breaker.tick_interval_s,
        settings.retune.tick_interval_s,
    ]
    # A tick runs the agent's own: here a rating window past its timeout closes.
    harness.feed(feedback, ratings(harness, low_ratings(40)))
    harness.checkpoint(feedback)
    harness.clock.advance(settings.retune.window_timeout_s)
    asyncio.run(timers[2][1]())
    (proposal,) = harness.commands("retune")
    assert proposal["window"]["closed_by"] == "timeout"
