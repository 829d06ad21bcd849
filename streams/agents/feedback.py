"""``feedback.ratings`` -> rating windows per target run -> ``retune`` commands.

Per record the agent decodes the rating, adds it to its target's window (``rules.retune``)
once (a rating read again, a replay, changes nothing) and, when a window closes, forwards
the proposal as a ``retune`` command on ``trainer.commands`` (nothing when no rule fired; a
log line and the ``fragrance_ops_feedback_windows_total{result}`` metric say why). A timer
closes windows whose wall-clock timeout passed, so a run with few ratings still gets an
answer.

Targets and partitions: a rating naming a run is keyed by its run id, the target. A
rating without one is keyed by its formula id, but its target is the configured default
(``retune.default_target``): the agent re-keys it through an internal topic, so each
target's window lives on exactly one partition.

A run's window is part of the run's state: when the training agent drops a finished run
(``rules.run_lifecycle``), it drops the run's window too (``drop_run``), once no rating of
it was applied for the retention (``run_quiet``); a rating that comes later opens a new
window, as for any target. (Its proposals are numbered from 0 again: a trainer that keeps
its applied command ids across the drop, a resumed ``TorchRunOps``, takes them for ones it
handled.)

The run's current hyperparameters (what a proposal changes) come from its latest metrics:
the training agent, on the same partition, shares them in ``ProcessorContext``, and the
window's state keeps the last values seen, so a restarted worker proposes from them too.
"""

from __future__ import annotations

import logging

from config.settings import Settings
from rules.retune import Retuner, WindowVerdict, retune_target
from schemas import Rating, Topic, decode
from streams.context import ProcessorContext
from streams.live import LiveStates, LiveStatesAgent, origin_header
from streams.metrics import remove_series
from streams.runtime import InputRecord
from streams.state import OpenStore, StateSink

log = logging.getLogger(__name__)


def by_target_topic(settings: Settings) -> str:
    """The internal topic ratings are re-keyed through, to their target run."""
    return f"{settings.kafka.topic_prefix}{settings.worker.app_id}-ratings-by-target"


class Feedback(LiveStatesAgent[Retuner]):
    """The rating windows of the targets whose partitions this worker owns, and their
    proposals."""

    name = "feedback"

    def __init__(self, ctx: ProcessorContext, stores: OpenStore) -> None:
        self.ctx = ctx
        settings = ctx.settings.retune
        self.settings = settings
        self.source = ctx.topic(Topic.RATINGS)
        self.by_target = by_target_topic(ctx.settings)
        self.topics = (self.source, self.by_target)
        self.internal_topics = (self.by_target,)
        self.tick_interval_s: float | None = settings.tick_interval_s
        self._max_bytes = ctx.settings.worker.max_event_bytes
        self.live: LiveStates[Retuner] = LiveStates(
            ctx,
            stores("feedback-windows"),
            self.topics,
            name=self.name,
            new=lambda target: Retuner(target, settings),
            load=lambda _target, state: Retuner.from_state(state, settings),
            dump=lambda retuner: retuner.to_state(),
        )
        # A run's window goes with the run's state (see the module doc).
        ctx.run_state.append(self)

    # Per record: decode, call the rule, forward.
    async def on_record(self, record: InputRecord) -> None:
        """Decode a rating (``InvalidEvent``: dead-lettered) and apply it."""
        rating = decode(Rating, record.value, max_bytes=self._max_bytes)
        await self.on_rating(rating, record)

    async def on_rating(self, rating: Rating, message: InputRecord) -> None:
        """Re-key the rating to its target's partition, or add it to the target's window,
        once; forward the proposal of a window it closed."""
        target = retune_target(rating.run_id, self.settings)
        key = target.encode()
        if message.key != key and message.topic == self.source:
            # Keyed by formula (no run named, or a producer's choice): re-key to the target,
            # whose window must live on one partition.
            await self.ctx.output.send(
                self.by_target, key, message.value or b"", [origin_header(message)]
            )
            return
        if self.live.is_replay(key, message):
            return
        retuner = self.live.get(key, message.partition)
        retuner.observe_current(**self.ctx.hyperparameters.get(target, {}))
        outcome = retuner.add_event(rating, now=self.ctx.now())
        self.live.applied(key, message)
        self.ctx.metrics.ratings.labels(outcome.status).inc()
        await self.close(outcome.verdict)

    async def close(self, verdict: WindowVerdict | None) -> None:
        """A closed window's verdict: its ``retune`` command forwarded, if a rule fired."""
        if verdict is None:
            return
        # A window closes at a time (its timeout, its ratings' arrival): a replay, later,
        # could close it differently, so the state that closed it is checkpointed now.
        self.ctx.checkpoints.checkpoint_soon()
        command = verdict.command(issued_at=self.ctx.now())
        if command is not None:
            result = "proposed"
            log.warning("retune proposed for %s: %s", verdict.target, verdict.rationale)
            await self.ctx.forward(command)
        else:
            result = "undecided" if verdict.undecided else "nothing"
            log.warning("no retune for %s: %s", verdict.target, verdict.rationale)
        self.ctx.metrics.feedback_windows.labels(result).inc()

    async def on_tick(self, key: bytes, retuner: Retuner) -> None:
        """The time that passed, for one window: one whose timeout passed closes."""
        verdict = retuner.on_tick(self.ctx.now())
        if verdict is not None:
            self.live.touch(key)
            await self.close(verdict)
        label = self.ctx.metrics.run_label(retuner.target)
        self.ctx.metrics.feedback_window_size.labels(label).set(retuner.size)

    # The run's window, as part of the run's state (``ProcessorContext.run_state``).
    def run_quiet(self, run_id: str, since: float) -> bool:
        return self.live.quiet(run_id.encode(), since)

    def drop_run(self, run_id: str, writer: StateSink) -> bool:
        if not self.live.drop(run_id.encode(), writer):
            return False
        remove_series(self.ctx.metrics.feedback_window_size, run_id)
        return True
