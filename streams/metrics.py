"""The worker's Prometheus metrics: one registry, one place for every name.

Served over HTTP by the worker on ``metrics.port`` (``/metrics``). Label sets are bounded:
``topic``, ``type``, ``agent`` and ``mode`` have a handful of values each; ``model`` is one
per LLM model (a deployment has a few); ``run_id`` appears only on the per-run training
gauges, and only for the first ``metrics.max_run_labels`` runs this worker sees, after
which runs share the label value ``"other"``.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

OTHER_RUNS = "other"
RUN_VALUE_NAMES = ("loss", "policy_loss", "value_loss", "reward", "entropy", "entropy_coef")
"""The ``name`` label values of ``fragrance_ops_rl_value``: a run's latest reported values."""
WINDOW_STATS = ("mean", "std", "count")
"""The ``stat`` label values of ``fragrance_ops_reward_window``."""
STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}
MODE_VALUES = {"creative": 0, "balanced": 1, "fast": 2}


class WorkerMetrics:
    """Every metric the worker exports, registered in its own registry."""

    def __init__(self, max_run_labels: int = 50) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.max_run_labels = max_run_labels
        self._run_labels: set[str] = set()

        # Operator basics.
        self.events = Counter(
            "fragrance_ops_events",
            "input events processed, per source topic",
            ["topic"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "fragrance_ops_dead_letters",
            "input events sent to the dead-letter topic, per source topic",
            ["topic"],
            registry=registry,
        )
        self.commands = Counter(
            "fragrance_ops_commands",
            "commands issued, per type (set_entropy_coef, rollback, retune, halt, ...)",
            ["type"],
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "fragrance_ops_batch_processing_seconds",
            "time to process one batch of events, outputs acknowledged included, per agent",
            ["agent"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=registry,
        )
        self.tick_errors = Counter(
            "fragrance_ops_tick_errors",
            "timer ticks that failed on one key (logged; retried next tick), per agent",
            ["agent"],
            registry=registry,
        )
        self.replayed_events = Counter(
            "fragrance_ops_replayed_events",
            "input events skipped because the state restored after a restart had applied "
            "them already (their offset is at or below the state's), per agent",
            ["agent"],
            registry=registry,
        )
        self.signature_rejections = Counter(
            "fragrance_ops_signature_rejections",
            "acks of commands a trainer refused for their signature (unsigned or invalid): "
            "a forgery, or a signing key out of step between worker and trainers",
            ["run_id"],
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "fragrance_ops_consumer_lag",
            "records not yet consumed (high watermark - position), per topic and partition",
            ["topic", "partition"],
            registry=registry,
        )

        # RL updates (operations guide, Monitoring).
        self.rl_updates = Counter(
            "fragrance_ops_rl_updates",
            "training step metrics received, per algorithm",
            ["algorithm"],
            registry=registry,
        )
        self.unanswered_anomalies = Counter(
            "fragrance_ops_unanswered_anomalies",
            "anomalies not rolled back because the run had saved no checkpoint before them "
            "(a young run is not halted for a finite anomaly; the worker logs each)",
            registry=registry,
        )
        self.rl_values = Gauge(
            "fragrance_ops_rl_value",
            "the latest reported value per run: loss, policy_loss, value_loss, reward, "
            "entropy, entropy_coef",
            ["run_id", "name"],
            registry=registry,
        )

        self.run_last_metric = Gauge(
            "fragrance_ops_run_last_metric_timestamp_seconds",
            "when the worker last read a new metric of the run (its clock, Unix seconds, to "
            "the nearest 10 s; kept across restarts and rebalances): time() minus it is how "
            "long the run has been silent (alert RunSilent)",
            ["run_id"],
            registry=registry,
        )

        self.run_halted = Gauge(
            "fragrance_ops_run_halted",
            "1 while the worker holds the run halted (until an operator resumes it), else 0",
            ["run_id"],
            registry=registry,
        )
        self.reward_window = Gauge(
            "fragrance_ops_reward_window",
            "the run's reward window (reward.window_size steps): mean, std and count, as "
            "published on trainer.reward-stats",
            ["run_id", "stat"],
            registry=registry,
        )

        self.run_finished = Gauge(
            "fragrance_ops_run_finished_timestamp_seconds",
            "when the worker read the run's finish (its clock, Unix seconds): the run ended, "
            "its silence is expected (alert RunSilent stays quiet); the series goes with the "
            "run's state, worker.finished_run_retention_s after its last input",
            ["run_id"],
            registry=registry,
        )

        # The LLM breaker (operations guide, Monitoring).
        self.breaker_downgrades = Counter(
            "fragrance_ops_breaker_downgrades",
            "breaker mode downgrades, per model (component), from-mode and to-mode",
            ["model", "from_mode", "to_mode"],
            registry=registry,
        )
        self.breaker_state = Gauge(
            "fragrance_ops_breaker_state",
            "breaker state per model: 0 closed, 1 half-open, 2 open",
            ["model"],
            registry=registry,
        )
        self.breaker_mode = Gauge(
            "fragrance_ops_breaker_mode",
            "generation mode per model: 0 creative, 1 balanced, 2 fast",
            ["model"],
            registry=registry,
        )
        self.cache_ttl = Gauge(
            "fragrance_ops_cache_ttl_seconds",
            "response-cache TTL the breaker sets per model",
            ["model"],
            registry=registry,
        )

        # Feedback retuning.
        self.ratings = Counter(
            "fragrance_ops_ratings",
            "ratings by outcome: counted, duplicate, capped",
            ["status"],
            registry=registry,
        )
        self.feedback_windows = Counter(
            "fragrance_ops_feedback_windows",
            "closed rating windows by result: proposed, nothing (every rule decided "
            "against), undecided (a rule's interval straddled its threshold)",
            ["result"],
            registry=registry,
        )
        self.feedback_window_size = Gauge(
            "fragrance_ops_feedback_window_ratings",
            "ratings in each target's open window",
            ["target"],
            registry=registry,
        )

    def start_at_zero(self, input_topics: list[str], command_types: list[str]) -> None:
        """Create the known label sets at 0, so a first increment shows in ``increase()``."""
        for topic in input_topics:
            self.events.labels(topic)
            self.dead_letters.labels(topic)
        for command_type in command_types:
            self.commands.labels(command_type)
        for status in ("counted", "duplicate", "capped"):
            self.ratings.labels(status)
        for result in ("proposed", "nothing", "undecided"):
            self.feedback_windows.labels(result)

    def forget_partition_state(self) -> None:
        """After a rebalance: gauges of keys this worker may no longer own are dropped
        (their new owner exports them), so no dashboard or alert sees a stale value."""
        for gauge in (
            self.rl_values,
            self.run_last_metric,
            self.run_halted,
            self.reward_window,
            self.run_finished,
            self.breaker_state,
            self.breaker_mode,
            self.cache_ttl,
            self.feedback_window_size,
            self.consumer_lag,
        ):
            gauge.clear()

    def forget_run(self, run_id: str) -> None:
        """A finished run's state was dropped: remove every series labelled with it and free
        its label for a later run. A run counted under ``other`` has no series of its own."""
        if run_id not in self._run_labels:
            return
        self._run_labels.discard(run_id)
        for name in RUN_VALUE_NAMES:
            remove_series(self.rl_values, run_id, name)
        for stat in WINDOW_STATS:
            remove_series(self.reward_window, run_id, stat)
        # Its rating window's size is labelled by target, the run's id.
        for metric in (
            self.run_last_metric,
            self.run_halted,
            self.run_finished,
            self.signature_rejections,
            self.feedback_window_size,
        ):
            remove_series(metric, run_id)

    def run_label(self, run_id: str) -> str:
        """``run_id`` while fewer than ``max_run_labels`` runs were labelled, else ``other``."""
        if run_id in self._run_labels:
            return run_id
        if len(self._run_labels) < self.max_run_labels:
            self._run_labels.add(run_id)
            return run_id
        return OTHER_RUNS


def remove_series(metric: MetricWrapperBase, *labels: str) -> None:
    """Remove one labelled series if it exists (prometheus_client raises if it does not)."""
    with contextlib.suppress(KeyError):
        metric.remove(*labels)
