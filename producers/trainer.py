"""The trainer SDK: announce a run, publish metrics and checkpoints, receive commands.

    with TrainerClient("run-42") as ops:
        ops.on_command("set_entropy_coef", lambda cmd: trainer.set_entropy(cmd.entropy_coef))
        for step in range(total):
            loss, reward = train_step()
            ops.log_step(step, loss=loss, reward=reward)   # never blocks, never raises
        ops.finish()  # the run ended: the worker may forget it

Commands are delivered at step boundaries: ``log_step`` (or ``poll_commands``) runs the
handlers in the caller's thread, so a handler may touch the model and optimizer safely.
Each command id is handled once and acknowledged on ``trainer.acks``; with ``applied_log``
(``TorchRunOps`` sets one in the run's checkpoint directory) that holds across restarts.
With ``security.require_signed_commands``, a command whose signature (``schemas/signing.py``)
is missing or wrong is not applied: it is acknowledged ``rejected`` with the reason.

With ``receive_reward_stats=True`` the worker's reward statistics for the run
(``trainer.reward-stats``: the step's normalized reward and the window's mean, std and count)
are read in the background too, from the end of the partition (only the newest counts, so
the history of the runs sharing it is never read); ``reward_stats`` is the newest, without
waiting (None until the first arrives). Off by default: a second consumer per trainer,
reading every run's statistics on the partition, is a cost only a loop that uses them pays.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from config.settings import Settings
from producers.applied import AppliedCommands
from producers.transport import DeliveryStats, KafkaTransport, Transport
from schemas import (
    DEFAULT_ALGORITHM,
    CheckpointSaved,
    Command,
    CommandAck,
    Event,
    InvalidEvent,
    RewardStats,
    RunAnnounced,
    RunFinished,
    StepMetric,
    Topic,
    decode,
    decode_command,
    encode,
    topic_name,
    validate,
)
from schemas.signing import SignatureError, verify

log = logging.getLogger(__name__)

_OPTIONAL_METRICS = frozenset(StepMetric.model_fields) - {
    "run_id",
    "step",
    "loss",
    "reward",
    "ts",
    "attempt",
    "checkpoint_step",
}


class CommandRejected(Exception):
    """Raise from a handler to reject a command; the message becomes the ack's detail."""


HandlerResult = dict[str, Any] | None
"""A handler may return ``{"before": {...}, "after": {...}}`` to record what it changed."""
CommandHandler = Callable[[Command], HandlerResult]


class TrainerClient:
    """One training run's connection to the operations layer."""

    def __init__(
        self,
        run_id: str,
        *,
        settings: Settings | None = None,
        transport: Transport | None = None,
        attempt: int = 0,
        receive_commands: bool = True,
        receive_reward_stats: bool = False,
        applied_log: Path | str | None = None,
    ) -> None:
        self.run_id = run_id
        self.attempt = attempt
        self.settings = settings if settings is not None else Settings()
        self._transport = transport if transport is not None else KafkaTransport(self.settings)
        self._key = run_id.encode()
        self._handlers: dict[str, CommandHandler] = {}
        self.applied = AppliedCommands(applied_log)
        security = self.settings.security
        signing_key = security.command_signing_key
        # Set only when signatures are required (the settings refuse that without a key).
        self._verify_key = (
            signing_key.get_secret_value().encode()
            if security.require_signed_commands and signing_key is not None
            else None
        )
        prefix = self.settings.kafka.topic_prefix
        self._topics = {topic: topic_name(topic, prefix) for topic in Topic}
        self._commands = (
            self._transport.reader(
                self._topics[Topic.COMMANDS],
                self._key,
                group_id=f"{self.settings.worker.app_id}.trainer.{run_id}",
            )
            if receive_commands
            else None
        )
        # From the partition's end, newest record only, nothing committed.
        self._stats_reader = (
            self._transport.reader(
                self._topics[Topic.REWARD_STATS],
                self._key,
                group_id=f"{self.settings.worker.app_id}.trainer.{run_id}.reward-stats",
                latest_only=True,
            )
            if receive_reward_stats
            else None
        )
        self._reward_stats: RewardStats | None = None
        self._last_logged: tuple[int, int] | None = None  # (attempt, step) of the last metric
        self._closed = False

    def record_applied_in(self, path: Path | str) -> None:
        """Keep the applied command ids in ``path`` too (kept if one is already set)."""
        if self.applied.path is None:
            handled, self.applied = self.applied.items(), AppliedCommands(path)
            for command_id, status in handled:  # handled before the log existed
                if command_id not in self.applied:
                    self.applied.add(command_id, status)

    @property
    def stats(self) -> DeliveryStats:
        return self._transport.stats

    def _publish(self, event: Event) -> None:
        self._transport.produce(self._topics[event.TOPIC], self._key, encode(event))

    def announce(
        self,
        settings: dict[str, bool | int | float | str] | None = None,
        *,
        algorithm: str = DEFAULT_ALGORITHM,
    ) -> None:
        """Announce (or re-announce on resume) the run with its per-run setting overrides and
        the algorithm training it (lower case; the label of its metrics)."""
        announced = validate(
            RunAnnounced,
            {
                "run_id": self.run_id,
                "ts": time.time(),
                "settings": settings or {},
                "algorithm": algorithm,
            },
        )
        self._publish(announced)

    def log_step(
        self,
        step: int,
        *,
        loss: float,
        reward: float,
        checkpoint_step: int | None = None,
        **optional: float,
    ) -> None:
        """Publish one step's metrics, then run handlers for any commands that arrived.

        Non-finite loss or reward is reported as such (the stream treats it as an anomaly).
        Invalid arguments (a negative step, an unknown field) are the caller's bug and raise
        ``InvalidEvent`` at once; Kafka being down never raises.
        """
        unknown = set(optional) - _OPTIONAL_METRICS
        if unknown:
            raise InvalidEvent(f"unknown metric fields {sorted(unknown)}")
        metric = validate(
            StepMetric,
            {
                "run_id": self.run_id,
                "step": int(step),
                "loss": float(loss),
                "reward": float(reward),
                "ts": time.time(),
                "attempt": self.attempt,
                "checkpoint_step": checkpoint_step,
                **{name: float(value) for name, value in optional.items()},
            },
        )
        self._publish(metric)
        self._last_logged = (metric.attempt, metric.step)
        self.poll_commands()

    def finish(self) -> None:
        """Say that the run ended. The worker keeps the run's state (settings, reward
        window, operations, rating window) and its per-run metric series for
        ``worker.finished_run_retention_s`` (1 hour) after the run's last event, then drops
        them, so runs that ended cost it nothing. Call it when training is done, not when a
        process stops to be resumed. To resume a finished run, announce it again: before
        the drop it keeps its state; after, the worker starts it afresh.

        Names the last metric logged (attempt and step): the worker reads the run's
        metrics up to it before the retention starts. Never blocks, never raises because
        Kafka is down (like ``log_step``); ``close()`` delivers it.
        """
        last = self._last_logged
        finished = validate(
            RunFinished,
            {
                "type": "finished",
                "run_id": self.run_id,
                "ts": time.time(),
                "attempt": last[0] if last is not None else self.attempt,
                "step": last[1] if last is not None else None,
            },
        )
        self._publish(finished)

    def checkpoint_saved(self, step: int, uri: str) -> None:
        self._publish(
            CheckpointSaved(
                run_id=self.run_id, step=step, uri=uri, ts=time.time(), attempt=self.attempt
            )
        )

    @property
    def reward_stats(self) -> RewardStats | None:
        """The newest reward statistics the worker published for this run (the window after
        one step's reward: ``normalized_reward``, ``mean``, ``std``, ``count``), as read so
        far in the background since the client started (None before the first, and always
        without ``receive_reward_stats``). Never waits, never raises: an invalid record is
        skipped with a warning and the previous statistics are kept."""
        if self._stats_reader is None:
            return None
        for record in self._stats_reader.poll():  # the newest record only
            try:
                stats = decode(RewardStats, record.value)
            except InvalidEvent as exc:
                log.warning("ignoring invalid reward stats at offset %d: %s", record.offset, exc)
                continue
            if stats.run_id == self.run_id:
                self._reward_stats = stats
        return self._reward_stats

    def on_command(self, command_type: str, handler: CommandHandler) -> None:
        """Register the handler for one command type (set_entropy_coef, rollback, ...)."""
        self._handlers[command_type] = handler

    def poll_commands(self) -> int:
        """Run handlers for commands that arrived; returns how many were handled."""
        if self._commands is None:
            return 0
        handled = 0
        for record in self._commands.poll():
            try:
                command = decode_command(record.value)
            except InvalidEvent as exc:
                log.warning("ignoring an invalid command at offset %d: %s", record.offset, exc)
                self._commands.commit(record)
                continue
            if command.run_id != self.run_id:
                self._commands.commit(record)
                continue
            if self._verify_key is not None:
                try:
                    verify(
                        self._verify_key,
                        Topic.COMMANDS.value,
                        record.key,
                        record.value,
                        record.headers,
                    )
                except SignatureError as exc:
                    # Not recorded in self.applied: a forged record reusing a genuine command's
                    # id must not stop the genuine one from being applied when it arrives.
                    log.warning(
                        "rejected %s %s at offset %d: %s",
                        command.type,
                        command.command_id,
                        record.offset,
                        exc.reason,
                    )
                    self._ack(command, "rejected", exc.reason, None, None)
                    self._commands.commit(record)
                    continue
            previous = self.applied.status(command.command_id)
            if previous is not None:
                # Delivered again (a duplicate, or a restart before the offset commit):
                # acknowledged again, in case the first ack was lost, but not applied again.
                self._ack(command, previous, f"{command.type} already handled", None, None)
                self._commands.commit(record)
                continue
            self._handle(command)
            self._commands.commit(record)
            handled += 1
        return handled

    def _handle(self, command: Command) -> None:
        handler = self._handlers.get(command.type)
        status: Literal["applied", "rejected"]
        before: dict[str, Any] | None = None
        after: dict[str, Any] | None = None
        if handler is None:
            status, detail = "rejected", f"no handler for {command.type!r}"
        else:
            try:
                result = handler(command)
            except CommandRejected as exc:
                status, detail = "rejected", str(exc) or "rejected by handler"
            except Exception as exc:
                # A broken handler must not stop training; the ack says what happened.
                log.exception("handler for %s failed", command.type)
                status, detail = "rejected", f"handler raised {type(exc).__name__}: {exc}"
            else:
                status, detail = "applied", f"{command.type} applied"
                if result:
                    before, after = result.get("before"), result.get("after")
        self.applied.add(command.command_id, status)
        self._ack(command, status, detail, before, after)

    def _ack(
        self,
        command: Command,
        status: Literal["applied", "rejected"],
        detail: str,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
    ) -> None:
        self._publish(
            CommandAck(
                command_id=command.command_id,
                run_id=self.run_id,
                status=status,
                detail=detail,
                ts=time.time(),
                before=before,
                after=after,
                command_type=command.type,
            )
        )

    def flush(self, timeout_s: float | None = None) -> int:
        """Wait for buffered events to be delivered; returns how many are still pending."""
        return self._transport.flush(
            self.settings.sdk.close_timeout_s if timeout_s is None else timeout_s
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for reader in (self._commands, self._stats_reader):
            if reader is not None:
                reader.close()
        self._transport.close(self.settings.sdk.close_timeout_s)

    def __enter__(self) -> TrainerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def algorithm_label(class_name: str) -> str:
    """The contract's algorithm name for a model class (``PPO`` -> ``ppo``); a name the
    contract cannot carry (a long or non-ASCII subclass name) falls back to PPO's."""
    label = re.sub(r"[^a-z0-9_-]", "", class_name.lower()).lstrip("0123456789_-")[:32]
    return label or DEFAULT_ALGORITHM
