"""Prometheus metrics of the LLM SDK, per model (needs ``prometheus-client``: extra ``metrics``).

    from producers.llm_metrics import LlmMetrics
    llm = LlmClient("qwen-fragrance", metrics=LlmMetrics.default())
    # expose them as any prometheus_client metric, e.g. prometheus_client.start_http_server

The LLM SDK imports nothing from here unless given an ``LlmMetrics``, so a replica that
does not export metrics does not need ``prometheus-client``.

Metrics (counters end in ``_total`` when exported):

- ``fragrance_ops_llm_cache_hits`` / ``_cache_misses`` (model): ``wrap(cache=...)``
  lookups that served the cached answer / found nothing (the call was made);
- ``fragrance_ops_llm_cache_size`` (gauge, model): live entries of the client's response
  cache, read at each scrape (the operations guide's cache-size metric);
- ``fragrance_ops_llm_calls`` / ``_failures`` (model, mode): calls recorded (outcomes) per
  mode served / of which failed (deadlines included);
- ``fragrance_ops_llm_deadlines_exceeded`` (model, mode): calls still running at their
  deadline;
- ``fragrance_ops_llm_local_trips`` (model): trips of the replica's local breaker;
- ``fragrance_ops_llm_latency_seconds`` (histogram, model, mode): a call's latency (a
  stream's: the whole stream); ``fragrance_ops_llm_first_token_seconds``: a stream's time
  to its first chunk.

Label values are bounded: a deployment has a few models, and three modes. The cache-size
gauge reads ``cache.size()`` at scrape time: a scan for ``RedisCache`` (its docstring), so
scrape every few seconds at most. One registry holds one ``LlmMetrics`` (prometheus-client
refuses a name twice): share ``LlmMetrics.default()`` between clients, or give each
registry its own. Two clients of one model in a process share its series (and the last one
made reports the cache size).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable
from typing import ClassVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class LlmMetrics:
    """The LLM SDK's metrics in one registry (the module docstring lists them)."""

    _default: ClassVar[LlmMetrics | None] = None
    _default_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = REGISTRY if registry is None else registry
        registry = self.registry
        self.cache_hits = Counter(
            "fragrance_ops_llm_cache_hits",
            "LLM calls served from the response cache",
            ["model"],
            registry=registry,
        )
        self.cache_misses = Counter(
            "fragrance_ops_llm_cache_misses",
            "response-cache lookups that found nothing (the call was made)",
            ["model"],
            registry=registry,
        )
        self.cache_size = Gauge(
            "fragrance_ops_llm_cache_size",
            "live entries of the LLM client's response cache",
            ["model"],
            registry=registry,
        )
        self.calls = Counter(
            "fragrance_ops_llm_calls",
            "LLM calls recorded, per mode served",
            ["model", "mode"],
            registry=registry,
        )
        self.failures = Counter(
            "fragrance_ops_llm_failures",
            "LLM calls recorded as failed (deadlines included), per mode",
            ["model", "mode"],
            registry=registry,
        )
        self.deadlines = Counter(
            "fragrance_ops_llm_deadlines_exceeded",
            "LLM calls still running at their deadline, per mode",
            ["model", "mode"],
            registry=registry,
        )
        self.local_trips = Counter(
            "fragrance_ops_llm_local_trips",
            "trips of the replica's local breaker",
            ["model"],
            registry=registry,
        )
        self.latency = Histogram(
            "fragrance_ops_llm_latency_seconds",
            "LLM call latency (a stream: the whole stream), per mode",
            ["model", "mode"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.first_token = Histogram(
            "fragrance_ops_llm_first_token_seconds",
            "time to the first chunk of a streamed LLM call, per mode",
            ["model", "mode"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )

    @classmethod
    def default(cls) -> LlmMetrics:
        """The metrics in prometheus-client's default registry, made once per process."""
        with cls._default_lock:
            if cls._default is None:
                cls._default = cls()
            return cls._default

    # -- what the client reports -------------------------------------------------------

    def observe_call(
        self,
        model: str,
        mode: str,
        *,
        ok: bool,
        latency_s: float,
        first_token_s: float | None,
    ) -> None:
        self.calls.labels(model, mode).inc()
        if not ok:
            self.failures.labels(model, mode).inc()
        self.latency.labels(model, mode).observe(latency_s)
        if first_token_s is not None:
            self.first_token.labels(model, mode).observe(first_token_s)

    def observe_deadline(self, model: str, mode: str) -> None:
        self.deadlines.labels(model, mode).inc()

    def observe_trip(self, model: str) -> None:
        self.local_trips.labels(model).inc()

    def observe_cache(self, model: str, *, hit: bool) -> None:
        (self.cache_hits if hit else self.cache_misses).labels(model).inc()

    def track_cache_size(self, model: str, size: Callable[[], int]) -> None:
        """Report ``size()`` as the model's cache size at each scrape (NaN if it raises)."""

        def read() -> float:
            try:
                return float(size())
            except Exception:
                return math.nan

        self.cache_size.labels(model).set_function(read)

    def untrack_cache_size(self, model: str) -> None:
        with contextlib.suppress(KeyError):
            self.cache_size.remove(model)
