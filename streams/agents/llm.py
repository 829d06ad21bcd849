"""``llm.outcomes`` -> one circuit breaker per model -> ``llm.control`` (compacted).

Per record the agent decodes the outcome, calls the model's breaker (``rules.breaker``)
and forwards each transition as an ``LlmControl`` event; the runtime's checkpoints write
each touched breaker's state once they are acknowledged. Its timer
(``breaker.tick_interval_s``) drives recovery from the worker's clock, so a held breaker
goes half-open on time with no traffic at all. Breakers stay live in memory between
batches and ticks (``streams.live``); an outcome read again (a replay) changes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from rules.breaker import BreakerPolicy, ModelBreaker, Transition
from schemas import LlmControl, LlmOutcome, Topic, decode
from schemas.events import LlmMode
from streams.context import ProcessorContext
from streams.live import LiveStates, LiveStatesAgent
from streams.metrics import MODE_VALUES, STATE_VALUES
from streams.runtime import InputRecord
from streams.state import OpenStore

log = logging.getLogger(__name__)


class Breakers(LiveStatesAgent[ModelBreaker]):
    """The breakers of the models whose partitions this worker owns, and their outputs."""

    name = "llm-breakers"
    internal_topics: tuple[str, ...] = ()

    def __init__(self, ctx: ProcessorContext, stores: OpenStore) -> None:
        self.ctx = ctx
        self.source = ctx.topic(Topic.LLM_OUTCOMES)
        self.topics = (self.source,)
        self.tick_interval_s: float | None = ctx.settings.breaker.tick_interval_s
        self._max_bytes = ctx.settings.worker.max_event_bytes
        self._policies: dict[str, BreakerPolicy] = {}
        self.live: LiveStates[ModelBreaker] = LiveStates(
            ctx,
            stores("llm-breakers"),
            self.topics,
            name=self.name,
            new=lambda model: ModelBreaker(model, self.policy(model)),
            load=lambda model, state: ModelBreaker.from_state(model, self.policy(model), state),
            dump=lambda breaker: breaker.to_state(),
        )

    # Per record: decode, call the rule, forward.
    async def on_record(self, record: InputRecord) -> None:
        """Decode an ``llm.outcomes`` record (``InvalidEvent``: dead-lettered) and apply it."""
        outcome = decode(LlmOutcome, record.value, max_bytes=self._max_bytes)
        await self.on_outcome(outcome, record)

    async def on_outcome(self, outcome: LlmOutcome, message: InputRecord) -> None:
        """Count the outcome in its model's breaker, once; forward the transition it made."""
        model_key = outcome.model.encode()
        if self.live.is_replay(model_key, message):
            return
        breaker = self.live.get(model_key, message.partition)
        previous_mode = breaker.mode
        transition = breaker.on_outcome(
            outcome.ok, outcome.mode, outcome.response_ms(), self.ctx.now(), call_id=outcome.call_id
        )
        self.live.applied(model_key, message)  # counters change without a transition too
        await self.emit(transition, model_key, previous_mode)

    async def on_tick(self, model_key: bytes, breaker: ModelBreaker) -> None:
        """The time that passed, for one breaker: a hold that ended goes half-open."""
        previous_mode = breaker.mode
        await self.emit(breaker.on_tick(self.ctx.now()), model_key, previous_mode)
        self.export(breaker.control())  # a new owner exports without waiting for a change

    # Transitions out.
    def policy(self, model: str) -> BreakerPolicy:
        """The model's breaker numbers: ``breaker`` with its ``breaker.models`` values."""
        policy = self._policies.get(model)
        if policy is None:
            settings = self.ctx.settings.breaker.for_model(model)
            policy = self._policies[model] = BreakerPolicy.from_settings(settings)
        return policy

    async def emit(
        self, transition: Transition | None, model_key: bytes, previous_mode: LlmMode
    ) -> None:
        """Forward a transition as ``LlmControl``, its breaker written at a prompt checkpoint."""
        if transition is None:
            return
        self.live.touch(model_key)
        # A transition reads the clock (when the hold ends): a replay must not remake it.
        self.ctx.checkpoints.checkpoint_soon()
        event = LlmControl(**asdict(transition), ts=self.ctx.now())
        log.info(
            "breaker %s: %s, mode %s, ttl %gs (%s)",
            event.model,
            event.state,
            event.mode,
            event.cache_ttl_s,
            event.reason,
        )
        if MODE_VALUES[event.mode] > MODE_VALUES[previous_mode]:
            self.ctx.metrics.breaker_downgrades.labels(event.model, previous_mode, event.mode).inc()
        self.export(transition)
        await self.ctx.forward(event)

    def export(self, control: Transition) -> None:
        """The breaker's gauges (state, mode, cache TTL) as ``control`` sets them."""
        metrics, model = self.ctx.metrics, control.model
        metrics.breaker_state.labels(model).set(STATE_VALUES[control.state])
        metrics.breaker_mode.labels(model).set(MODE_VALUES[control.mode])
        metrics.cache_ttl.labels(model).set(control.cache_ttl_s)
