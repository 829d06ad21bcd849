"""The worker's agents, one module per processor, all of one shape.

An agent is a class implementing ``Agent``, made from the shared ``ProcessorContext`` and
an ``OpenStore`` (``Agent(ctx, stores)``), and registered by ``register``, the same for
every agent. Its ``process`` hands each record to ``on_record`` through
``ProcessorContext.apply_each``: ``on_record`` decodes and validates it, and a method per
event (``on_metric``, ``on_outcome``, ``on_rating``, ...) calls the rule and forwards what
it decided. Bad input is dead-lettered per record and the batch goes on.

An agent touches Kafka and Faust only through its context's protocols and its stores, so a
unit test makes one with in-memory ones, feeds it records and fires its timer by hand
(``tests/test_streams/test_agents``).
"""

from __future__ import annotations

from typing import Protocol, TypeVar

import faust

from streams.runtime import AgentRuntime, BatchAgent


class Agent(BatchAgent, Protocol):
    """A ``BatchAgent`` that may also act on a timer and write internal topics."""

    @property
    def internal_topics(self) -> tuple[str, ...]:
        """Topics it creates (the worker declares them) and writes, besides the contract's."""
        ...

    @property
    def tick_interval_s(self) -> float | None:
        """How often ``tick`` runs (None: never)."""
        ...

    async def tick(self) -> None:
        """Act on the time that passed (never during a batch): what no input may trigger."""
        ...


A = TypeVar("A", bound=Agent)


def register(app: faust.App, runtime: AgentRuntime, agent: A) -> A:
    """Have ``app`` run ``agent``: its internal topics declared, its input topics subscribed
    (``AgentRuntime.register``), its timer ticking between its batches."""
    for topic in agent.internal_topics:
        # Internal: the conductor creates it when it subscribes.
        app.topics.add(
            app.topic(
                topic,
                internal=True,
                partitions=app.conf.topic_partitions,
                key_serializer="raw",
                value_serializer="raw",
            )
        )
    runtime.register(agent)
    interval_s = agent.tick_interval_s
    if interval_s is not None:

        async def clock() -> None:
            await runtime.run_exclusive(agent, agent.tick)

        app.timer(interval_s)(clock)
    return agent
