"""``llm.outcomes`` -> one circuit breaker per model -> ``llm.control`` (compacted).

Per batch the agent decodes each outcome, calls the model's breaker
(``rules.breaker``) and forwards each transition as an ``LlmControl`` event; the
runtime's checkpoints write each touched breaker's state once they are acknowledged. A
timer (``breaker.tick_interval_s``) drives recovery from the worker's clock, so a held
breaker goes half-open on time with no traffic at all. Breakers stay live in memory between
batches and ticks (``streams.live``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from rules.breaker import BreakerPolicy, ModelBreaker, Transition
from schemas import LlmControl, LlmOutcome, Topic, decode
from schemas.events import LlmMode
from streams.context import ProcessorContext
from streams.live import LiveStates, register_live_agent
from streams.metrics import MODE_VALUES, STATE_VALUES
from streams.runtime import InputRecord
from streams.state import StateTable

log = logging.getLogger(__name__)


class Breakers:
    """The breakers of the models whose partitions this worker owns, and their outputs."""

    def __init__(self, ctx: ProcessorContext) -> None:
        self.ctx = ctx
        self.source = ctx.topic(Topic.LLM_OUTCOMES)
        self._policies: dict[str, BreakerPolicy] = {}
        table = StateTable(ctx.app, "llm-breakers", ctx.settings)
        self.live: LiveStates[ModelBreaker] = LiveStates(
            ctx,
            table,
            [self.source],
            name="llm-breakers",
            new=lambda model: ModelBreaker(model, self.policy(model)),
            load=lambda model, state: ModelBreaker.from_state(model, self.policy(model), state),
            dump=lambda breaker: breaker.to_state(),
        )

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
        if transition is None:
            return
        self.live.touch(model_key)
        # A transition reads the clock (when the hold ends): a replay must not remake it.
        self.ctx.runtime.checkpoint_soon()
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
        metrics, model = self.ctx.metrics, control.model
        metrics.breaker_state.labels(model).set(STATE_VALUES[control.state])
        metrics.breaker_mode.labels(model).set(MODE_VALUES[control.mode])
        metrics.cache_ttl.labels(model).set(control.cache_ttl_s)

    async def on_outcome(self, outcome: LlmOutcome, message: InputRecord) -> None:
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
        previous_mode = breaker.mode
        await self.emit(breaker.on_tick(self.ctx.now()), model_key, previous_mode)
        self.export(breaker.control())  # a new owner exports without waiting for a change


def register(ctx: ProcessorContext) -> Breakers:
    breakers = Breakers(ctx)
    max_bytes = ctx.settings.worker.max_event_bytes

    async def on_record(record: InputRecord) -> None:
        outcome = decode(LlmOutcome, record.value, max_bytes=max_bytes)
        await breakers.on_outcome(outcome, record)

    register_live_agent(
        ctx,
        breakers.live,
        [breakers.source],
        on_record=on_record,
        on_tick=breakers.on_tick,
        tick_interval_s=ctx.settings.breaker.tick_interval_s,
    )
    return breakers
