"""The LLM SDK: wrap a generate callable; its outcomes feed the shared breaker.

    llm = LlmClient("qwen-fragrance")
    generate = llm.wrap(qwen_generate)      # qwen_generate(prompt, *, mode) -> text
    text = generate("a fresh citrus accord")  # called in llm.mode (or a probe mode)

Each call is made in the mode the operations layer says (``creative``, ``balanced`` or
``fast``), timed, and its outcome (ok or error, latency, mode, a call id) published to
``llm.outcomes`` without waiting for Kafka. The stream keeps one breaker per model and
publishes every state change on the compacted ``llm.control``; the client follows it for
its model, so all replicas serve in the same mode. A new client reads the current state
before its first call (up to ``sdk.control_wait_s``).

Local fast path: the client runs the same breaker rule (``rules.breaker``) on its
own calls. When it trips locally (3 failures by default) the client downshifts at once,
before the stream's decision arrives, and converges to the shared state with the next
``llm.control`` event. If Kafka is unreachable the local breaker alone decides, on the
replica's clock; a warning says so and ``status()["following_stream"]`` is False. The same
happens when the stream's last decision is stale: its hold or probe round ended more than
``sdk.control_grace_s`` ago (by the replica's clock) and nothing newer arrived, so a
replica never stays degraded because the worker went away.

Half-open: the client sends up to ``probe_calls`` calls per probe round in the probe mode,
the rest in the current mode.

What counts as the model failing is ``producers/llm_failures.py``'s policy: by default the
caller's own errors (``ValueError``, ``TypeError``, HTTP 4xx other than 408 and 429) are
not counted nor published; settings ``breaker.record_exceptions`` and
``breaker.ignore_exceptions``, or ``wrap(..., record=, ignore=)``, change it.

Streams: ``wrap_stream(generate)`` wraps a function returning a sync or async stream of
chunks (``stream=True``); the stream's one outcome carries its time to first chunk
(``first_token_ms``) and its total (``latency_ms``), and a failure mid-stream counts.

Deadlines (``producers/llm_deadlines.py``): with ``sdk.llm_deadline_s`` set, or
``wrap(..., deadline_s=)``, or ``with llm.deadline(s):`` around a call (which wins), a call
still running at its deadline counts as a failure then. An async call is cancelled and
raises ``DeadlineExceeded`` (a ``TimeoutError``); a sync call is recorded at the deadline
by the client's watcher thread and returns (or raises) whenever it does, unchanged, its
late outcome not recorded again.

Cache (``wrap(..., cache=True)``, ``Caching``): get-or-call on ``self.cache``, keyed by the
sha256 of model, mode and prompt, stored with the TTL the control stream sets at that
moment; failures are not cached and probes always reach the model. The cache is called
synchronously, in async wrappers too (``RedisCache`` bounds that to its short timeouts).

Also: ``on_change(listener)`` for state changes, ``LlmClient(..., metrics=LlmMetrics())``
for Prometheus (``producers/llm_metrics.py``, optional), ``report()`` for calls made
outside ``wrap`` (the LiteLLM callback, ``producers/llm_litellm.py``), and the OpenAI
wrapper in ``producers/llm_openai.py``; ``openai``, ``litellm`` and ``prometheus-client``
are imported only by those modules.

Nothing here raises into the caller because the operations layer is down: the wrapped
function raises exactly what ``generate`` raises (or ``DeadlineExceeded`` at an async
deadline), and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hashlib
import inspect
import logging
import threading
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Iterator,
)
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

import orjson

from config.settings import Settings
from producers.llm_deadlines import DeadlineExceeded, DeadlineWatcher, Watch
from producers.llm_failures import ExceptionSpec, FailurePolicy, exception_types
from producers.response_cache import InProcessCache, ResponseCache
from producers.transport import KafkaTransport, Transport
from rules.breaker import ModelBreaker, Transition
from schemas import InvalidEvent, LlmControl, LlmOutcome, Topic, decode, encode, topic_name
from schemas.events import LlmMode

if TYPE_CHECKING:
    from producers.llm_metrics import LlmMetrics

log = logging.getLogger(__name__)

#: ``listener(new, old)``: the state calls follow changed (``LlmClient.on_change``).
ChangeListener = Callable[[Transition, Transition], None]

R = TypeVar("R")
T = TypeVar("T")

_FROM_SETTINGS = object()  # no per-call deadline: the function's, else the settings'


@dataclass
class LlmStats:
    calls: int = 0
    failures: int = 0
    probes: int = 0
    local_trips: int = 0
    control_events: int = 0
    sdk_errors: int = 0  # the SDK's own failures, logged and swallowed
    ignored: int = 0  # exceptions that were the caller's own (not counted, not published)
    deadlines: int = 0  # calls that ran past their deadline (counted among failures)
    cache_hits: int = 0  # wrap(cache=...) calls answered from the response cache
    cache_misses: int = 0


@dataclass(frozen=True)
class Caching:
    """How ``wrap(cache=...)`` serves from the response cache (``cache=True``: these defaults).

    ``key(*args, **kwargs)`` names the prompt (None: this call is not cached); by default
    the call's arguments as JSON. The cache key is the sha256 of model, mode and that name.
    ``dumps``/``loads`` turn an answer into the cache's bytes and back: JSON by default
    (orjson: a string, a dict of strings and numbers, ...).
    """

    key: Callable[..., str | None] | None = None
    dumps: Callable[[Any], bytes] = orjson.dumps
    loads: Callable[[bytes], Any] = orjson.loads


class LlmClient:
    """One LLM replica's connection to the operations layer, for one model."""

    def __init__(
        self,
        model: str,
        *,
        settings: Settings | None = None,
        transport: Transport | None = None,
        cache: ResponseCache | None = None,
        clock: Callable[[], float] = time.time,
        metrics: LlmMetrics | None = None,
    ) -> None:
        self.model = model
        self.settings = settings if settings is not None else Settings()
        self._transport = transport if transport is not None else KafkaTransport(self.settings)
        self._clock = clock
        self._key = model.encode()
        breaker = self.settings.breaker.for_model(model)
        self._local = ModelBreaker.from_settings(model, breaker)
        self._failures = FailurePolicy.from_names(
            breaker.record_exceptions, breaker.ignore_exceptions
        )
        self._shared: Transition | None = None  # the stream's latest decision
        self._local_override = False  # a local trip newer than the shared decision
        self._probe_round = (-1, 0)  # (epoch, probe calls sent in it)
        self._lock = threading.Lock()
        self.cache = (
            cache if cache is not None else InProcessCache(self.settings.sdk.cache_max_entries)
        )
        self.stats = LlmStats()
        self._metrics = metrics
        self._listeners: list[ChangeListener] = []
        self._changes: list[tuple[Transition, Transition]] = []  # (new, old), not yet told
        self._announced = self._local.control()
        self._deadlines = DeadlineWatcher(model)
        self._call_deadline: contextvars.ContextVar[object] = contextvars.ContextVar(
            f"llm_deadline_{model}", default=_FROM_SETTINGS
        )
        prefix = self.settings.kafka.topic_prefix
        self._outcomes = topic_name(Topic.LLM_OUTCOMES, prefix)
        # A group of its own that never commits: every start reads the compacted state.
        self._control = self._transport.reader(
            topic_name(Topic.LLM_CONTROL, prefix),
            self._key,
            group_id=f"{self.settings.worker.app_id}.llm.{model}.{uuid.uuid4().hex}",
        )
        if not self._control.wait_caught_up(self.settings.sdk.control_wait_s):
            log.warning(
                "llm.control unreadable for %s within %gs: serving on the local breaker",
                model,
                self.settings.sdk.control_wait_s,
            )
        with self._lock:
            self._current()
            self._changes.clear()  # the state found at start is not a change
        if metrics is not None:
            try:
                metrics.track_cache_size(model, self.cache.size)
            except Exception:
                self.stats.sdk_errors += 1
                log.exception("reporting the cache size failed; metrics go on without it")

    # -- the shared state -------------------------------------------------------------

    def _follow(self) -> None:
        """Adopt control events that arrived (caller holds the lock)."""
        for record in self._control.poll():
            try:
                control = decode(LlmControl, record.value)
            except InvalidEvent as exc:
                log.warning("ignoring an invalid llm.control event: %s", exc)
                continue
            if control.model != self.model:
                continue
            if self._shared is not None and control.epoch < self._shared.epoch:
                continue  # older than what we follow
            # The control event is a transition plus its timestamp.
            self._shared = Transition(**control.model_dump(exclude={"ts"}))
            self._local.adopt(self._shared)
            self._local_override = False
            self.stats.control_events += 1

    def _following(self) -> bool:
        """Whether calls follow the stream's latest decision (caller holds the lock)."""
        shared = self._shared
        if shared is None or self._local_override:
            return False
        # A hold or probe round that ended long ago with no newer decision means the worker
        # or Kafka is down: the local breaker (which adopted that state) takes over.
        grace = self.settings.sdk.control_grace_s
        return shared.until is None or self._clock() <= shared.until + grace

    def _current(self) -> Transition:
        """The state calls follow now (caller holds the lock); queues a change for the
        listeners when it differs from the last one they were told."""
        current = self._decide()
        if current != self._announced:
            self._changes.append((current, self._announced))
            self._announced = current
        return current

    def _decide(self) -> Transition:
        self._follow()
        if self._following():
            assert self._shared is not None
            return self._shared
        self._local.on_tick(self._clock())  # no stream decision to wait for: local clock
        if self._local_override and self._local.state == "closed":
            self._local_override = False  # recovered locally: the stream's view applies again
            if self._following():
                assert self._shared is not None
                return self._shared
        return self._local.control()

    def on_change(self, listener: ChangeListener) -> Callable[[], None]:
        """Call ``listener(new, old)`` (``Transition``s) when the state calls follow changes.

        Whether the change came from ``llm.control`` or the local breaker. A change is
        noticed when the client is used (a call, ``mode``, ``cache_ttl_s``, ``status()``,
        ``record()``) and the listener runs then, in that thread, outside the client's lock;
        an exception it raises is logged, never raised into the call. Returns a function
        that removes the listener.
        """
        with self._lock:
            self._listeners.append(listener)

        def remove() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return remove

    def _notify(self) -> None:
        """Tell the listeners about queued changes (without the lock held)."""
        with self._lock:
            if not self._changes:
                return
            changes, self._changes = self._changes, []
            listeners = list(self._listeners)
        for new, old in changes:
            for listener in listeners:
                try:
                    listener(new, old)
                except Exception:
                    self.stats.sdk_errors += 1
                    log.exception("an LLM state-change listener failed")

    @property
    def mode(self) -> LlmMode:
        with self._lock:
            mode = self._current().mode
        self._notify()
        return mode

    @property
    def cache_ttl_s(self) -> float:
        with self._lock:
            ttl = self._current().cache_ttl_s
        self._notify()
        return ttl

    def status(self) -> dict[str, Any]:
        with self._lock:
            current = self._current()
            status = {
                "model": self.model,
                "state": current.state,
                "mode": current.mode,
                "cache_ttl_s": current.cache_ttl_s,
                "until": current.until,
                "reason": current.reason,
                "following_stream": self._following(),
                "outcomes_dropped": self._transport.stats.dropped,
            }
        self._notify()
        return status

    # -- calls ------------------------------------------------------------------------

    def choose_mode(self) -> LlmMode:
        """The mode for the next call: a probe while the probe budget lasts, else current."""
        return self._choose()[0]

    def _choose(self) -> tuple[LlmMode, bool]:
        """The mode for the next call, and whether the call is a probe."""
        with self._lock:
            current = self._current()
            chosen: tuple[LlmMode, bool] = (current.mode, False)
            if current.state == "half_open" and current.probe_mode and current.probe_calls:
                epoch, sent = self._probe_round
                if epoch != current.epoch:
                    epoch, sent = current.epoch, 0
                if sent < current.probe_calls:
                    self._probe_round = (epoch, sent + 1)
                    self.stats.probes += 1
                    chosen = (current.probe_mode, True)
        self._notify()
        return chosen

    def record(
        self,
        *,
        ok: bool,
        mode: LlmMode,
        latency_ms: float,
        error: str | None = None,
        first_token_ms: float | None = None,
    ) -> None:
        """Publish one call's outcome and feed the local breaker.

        ``first_token_ms``: a streamed call's time to its first chunk (``latency_ms`` is
        then the whole stream's); the breaker judges slowness by it.
        """
        now = self._clock()
        call_id = uuid.uuid4().hex
        outcome = LlmOutcome(
            model=self.model,
            ok=ok,
            mode=mode,
            latency_ms=max(latency_ms, 0.0),
            error=None if ok else (error or "error"),
            ts=now,
            call_id=call_id,
            first_token_ms=None if first_token_ms is None else max(first_token_ms, 0.0),
        )
        self._transport.produce(self._outcomes, self._key, encode(outcome))
        tripped = False
        with self._lock:
            self.stats.calls += 1
            self.stats.failures += not ok
            transition = self._local.on_outcome(
                ok, mode, outcome.response_ms(), now, call_id=call_id
            )
            if transition is not None and transition.state == "open":
                self._local_override = True
                self.stats.local_trips += 1
                tripped = True
                log.warning("local breaker for %s: %s", self.model, transition.reason)
            if transition is not None:
                self._current()  # the listeners hear of it now
        if self._metrics is not None:
            try:
                self._metrics.observe_call(
                    self.model,
                    mode,
                    ok=ok,
                    latency_s=outcome.latency_ms / 1000.0,
                    first_token_s=None
                    if outcome.first_token_ms is None
                    else outcome.first_token_ms / 1000.0,
                )
                if tripped:
                    self._metrics.observe_trip(self.model)
            except Exception:
                self.stats.sdk_errors += 1
                log.exception("updating the LLM metrics failed")
        self._notify()

    def report(
        self,
        mode: LlmMode,
        *,
        latency_ms: float,
        error: BaseException | None = None,
        first_token_ms: float | None = None,
    ) -> None:
        """Report a call made outside ``wrap`` (a LiteLLM callback, your own client).

        ``error`` None: it succeeded; otherwise it is judged by the settings' failure policy
        (``producers/llm_failures.py``): the caller's own errors are not published. Never
        raises.
        """
        try:
            verdict = "success" if error is None else self._failures.judge(error)
            if verdict == "ignored":
                self.stats.ignored += 1
                return
            detail = None if error is None else f"{type(error).__name__}: {error}"[:500]
            self.record(
                ok=verdict == "success",
                mode=mode,
                latency_ms=latency_ms,
                error=detail if verdict == "failure" else None,
                first_token_ms=first_token_ms,
            )
        except Exception:
            self.stats.sdk_errors += 1
            log.exception("reporting an outcome failed; the call itself is unaffected")

    def _chosen_mode(self) -> tuple[LlmMode, bool]:
        """``_choose()``, never raising: on the SDK's own failure, the local breaker's mode."""
        try:
            return self._choose()
        except Exception:
            self.stats.sdk_errors += 1
            log.exception("choosing the mode failed; serving in the local breaker's mode")
            with self._lock:
                return self._local.mode, False

    def _recorded(
        self,
        ok: bool,
        mode: LlmMode,
        started: float,
        error: BaseException | None,
        first_token: float | None = None,
    ) -> None:
        """Record a call that started at ``started`` (and, streamed, whose first chunk came
        at ``first_token``; both ``time.perf_counter()``); never raises."""
        try:
            latency_ms = (time.perf_counter() - started) * 1000.0
            first_token_ms = None if first_token is None else (first_token - started) * 1000.0
            detail = None if ok or error is None else f"{type(error).__name__}: {error}"[:500]
            self.record(
                ok=ok,
                mode=mode,
                latency_ms=latency_ms,
                error=detail,
                first_token_ms=first_token_ms,
            )
        except Exception:
            self.stats.sdk_errors += 1
            log.exception("recording an outcome failed; the call itself is unaffected")

    def _failure_policy(
        self, record: Iterable[ExceptionSpec] | None, ignore: Iterable[ExceptionSpec] | None
    ) -> FailurePolicy:
        default = self._failures
        return FailurePolicy(
            record=default.record if record is None else exception_types(record),
            ignore=default.ignore if ignore is None else exception_types(ignore),
        )

    def _recorded_error(
        self,
        policy: FailurePolicy,
        mode: LlmMode,
        started: float,
        error: BaseException,
        first_token: float | None = None,
    ) -> None:
        try:
            verdict = policy.judge(error)
        except Exception:  # an exception whose attributes raise: count it, never raise
            self.stats.sdk_errors += 1
            log.exception("judging %s failed; counted as a failure", type(error).__name__)
            verdict = "failure"
        if verdict == "ignored":
            self.stats.ignored += 1
        else:
            self._recorded(verdict == "success", mode, started, error, first_token)

    @contextlib.contextmanager
    def deadline(self, seconds: float | None) -> Iterator[None]:
        """Calls of this client made inside the block get this deadline (None: none).

        It wins over ``wrap(deadline_s=)`` and ``sdk.llm_deadline_s``. A context variable:
        it applies to the current thread or task and to tasks started inside the block.
        """
        _check_deadline(seconds)
        token = self._call_deadline.set(seconds)
        try:
            yield
        finally:
            self._call_deadline.reset(token)

    def _deadline_s(self, wrapped: float | None) -> float | None:
        """The deadline of a call starting now: the block's, the function's, the settings'."""
        override = self._call_deadline.get()
        if override is not _FROM_SETTINGS:
            return cast(float | None, override)
        return wrapped if wrapped is not None else self.settings.sdk.llm_deadline_s

    def _exceeded(
        self,
        mode: LlmMode,
        started: float,
        deadline_s: float,
        first_token: float | None = None,
    ) -> DeadlineExceeded:
        """Record a call that ran past its deadline; the exception an async call raises."""
        what = "no answer" if first_token is None else "the stream did not end"
        exceeded = DeadlineExceeded(f"{what} within the {deadline_s:g} s deadline")
        self.stats.deadlines += 1
        if self._metrics is not None:
            try:
                self._metrics.observe_deadline(self.model, mode)
            except Exception:
                self.stats.sdk_errors += 1
                log.exception("counting a deadline failed")
        self._recorded(False, mode, started, exceeded, first_token)
        return exceeded

    def _watch(
        self,
        mode: LlmMode,
        started: float,
        deadline_s: float | None,
        first_token: Callable[[], float | None] = lambda: None,
    ) -> Watch:
        """A sync call's deadline: recorded as a failure by the watcher if it fires first."""
        if deadline_s is None:
            return Watch(None, float("inf"))
        try:

            def expired() -> None:
                self._exceeded(mode, started, deadline_s, first_token())

            return self._deadlines.watch(deadline_s, expired)
        except Exception:  # e.g. no thread could be started: the call goes on unwatched
            self.stats.sdk_errors += 1
            log.exception("watching a deadline failed; the call goes on without it")
            return Watch(None, float("inf"))

    def wrap(
        self,
        generate: Callable[..., R],
        *,
        record: Iterable[ExceptionSpec] | None = None,
        ignore: Iterable[ExceptionSpec] | None = None,
        deadline_s: float | None = None,
        cache: bool | Caching = False,
    ) -> Callable[..., R]:
        """``generate(*args, mode=..., **kwargs)``, sync or async, timed and reported.

        ``record`` and ``ignore`` (exception classes or dotted names) replace the settings'
        lists for this function: which of its exceptions count as the model failing
        (``producers/llm_failures.py``); a name that does not resolve raises here.
        ``deadline_s`` replaces ``sdk.llm_deadline_s`` for this function (the module doc).
        ``cache`` (True, or a ``Caching``) serves from the response cache: get-or-call
        keyed by model, mode and prompt, stored with the TTL the control stream sets now.
        """
        policy = self._failure_policy(record, ignore)
        _check_deadline(deadline_s)
        caching = Caching() if cache is True else (cache or None)
        if inspect.iscoroutinefunction(generate):
            async_generate = cast(Callable[..., Awaitable[Any]], generate)

            @functools.wraps(generate)
            async def wrapped_async(*args: Any, **kwargs: Any) -> Any:
                mode, probe = self._chosen_mode()
                key = self._cache_key(caching, mode, args, kwargs)
                if key is not None and not probe:
                    found, value = self._cache_lookup(caching, key)
                    if found:
                        return value
                deadline = self._deadline_s(deadline_s)
                started = time.perf_counter()
                timeout = asyncio.timeout(deadline)
                try:
                    async with timeout:
                        result = await async_generate(*args, mode=mode, **kwargs)
                except TimeoutError as exc:
                    if deadline is not None and timeout.expired():
                        raise self._exceeded(mode, started, deadline) from exc
                    self._recorded_error(policy, mode, started, exc)
                    raise
                except Exception as exc:
                    self._recorded_error(policy, mode, started, exc)
                    raise
                self._recorded(True, mode, started, None)
                if key is not None:
                    self._cache_store(caching, key, result)
                return result

            return cast(Callable[..., R], wrapped_async)

        @functools.wraps(generate)
        def wrapped(*args: Any, **kwargs: Any) -> R:
            mode, probe = self._chosen_mode()
            key = self._cache_key(caching, mode, args, kwargs)
            if key is not None and not probe:
                found, value = self._cache_lookup(caching, key)
                if found:
                    return cast(R, value)
            started = time.perf_counter()
            watch = self._watch(mode, started, self._deadline_s(deadline_s))
            try:
                result = generate(*args, mode=mode, **kwargs)
            except Exception as exc:
                if watch.settle():
                    self._recorded_error(policy, mode, started, exc)
                raise
            except BaseException:  # KeyboardInterrupt, SystemExit: not the model's outcome,
                watch.settle()  # and no deadline failure for it later
                raise
            if watch.settle():
                self._recorded(True, mode, started, None)
            if key is not None:
                self._cache_store(caching, key, result)
            return result

        return wrapped

    def _cache_key(
        self, caching: Caching | None, mode: LlmMode, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> str | None:
        """The cache key of a call (sha256 of model, mode and prompt), or None: not cached."""
        if caching is None:
            return None
        try:
            if caching.key is not None:
                prompt = caching.key(*args, **kwargs)
                if prompt is None:
                    return None
                prompt_bytes = prompt.encode()
            else:
                prompt_bytes = orjson.dumps([args, kwargs], option=orjson.OPT_SORT_KEYS)
            digest = hashlib.sha256()
            for part in (self.model.encode(), mode.encode(), prompt_bytes):
                digest.update(len(part).to_bytes(8, "big"))
                digest.update(part)
            return digest.hexdigest()
        except Exception:
            self.stats.sdk_errors += 1
            log.exception("no cache key for a call of %s; calling the model", self.model)
            return None

    def _cache_lookup(self, caching: Caching | None, key: str) -> tuple[bool, Any]:
        """(True, the cached answer) on a hit; (False, None) on a miss or the cache's error."""
        assert caching is not None
        try:
            stored = self.cache.get(key)
            value = None if stored is None else caching.loads(stored)
        except Exception:
            self.stats.sdk_errors += 1
            log.exception("reading the response cache failed; calling the model")
            stored = None
        hit = stored is not None
        if hit:
            self.stats.cache_hits += 1
        else:
            self.stats.cache_misses += 1
        if self._metrics is not None:
            try:
                self._metrics.observe_cache(self.model, hit=hit)
            except Exception:
                self.stats.sdk_errors += 1
                log.exception("counting a cache lookup failed")
        return hit, value

    def _cache_store(self, caching: Caching | None, key: str, result: Any) -> None:
        """Store an answer with the TTL the control stream sets now; never raises."""
        assert caching is not None
        try:
            with self._lock:
                ttl_s = self._current().cache_ttl_s
            self.cache.set(key, caching.dumps(result), ttl_s)
        except Exception:
            self.stats.sdk_errors += 1
            log.exception("storing an answer in the response cache failed")

    @overload
    def wrap_stream(
        self,
        generate: Callable[..., AsyncIterable[T]],
        *,
        record: Iterable[ExceptionSpec] | None = None,
        ignore: Iterable[ExceptionSpec] | None = None,
        deadline_s: float | None = None,
    ) -> Callable[..., AsyncGenerator[T, None]]: ...

    @overload
    def wrap_stream(
        self,
        generate: Callable[..., Awaitable[AsyncIterable[T]]],
        *,
        record: Iterable[ExceptionSpec] | None = None,
        ignore: Iterable[ExceptionSpec] | None = None,
        deadline_s: float | None = None,
    ) -> Callable[..., AsyncGenerator[T, None]]: ...

    @overload
    def wrap_stream(
        self,
        generate: Callable[..., Iterable[T]],
        *,
        record: Iterable[ExceptionSpec] | None = None,
        ignore: Iterable[ExceptionSpec] | None = None,
        deadline_s: float | None = None,
    ) -> Callable[..., Generator[T, None, None]]: ...

    def wrap_stream(
        self,
        generate: Callable[..., Any],
        *,
        record: Iterable[ExceptionSpec] | None = None,
        ignore: Iterable[ExceptionSpec] | None = None,
        deadline_s: float | None = None,
    ) -> Callable[..., Any]:
        """``generate(*args, mode=..., **kwargs)`` returning a stream of chunks, wrapped.

        ``generate`` is a generator function, or a function returning an iterable (a sync
        stream), or an async generator function, or a coroutine function returning an async
        iterable (an async stream: ``AsyncOpenAI``'s ``create(stream=True)``). The wrapped
        function returns an iterator (or async iterator) of the same chunks; the call is
        made when the first chunk is asked for. Its one outcome is recorded when the stream
        ends: a success with ``first_token_ms`` (time to the first chunk) and
        ``latency_ms`` (the whole stream, the reader's time between chunks included); an
        exception before or between chunks is judged as ``wrap``'s are; a reader that
        stops early (``close()``; async: ``aclose()``, e.g. ``contextlib.aclosing``, as a
        bare ``break`` leaves that to the event loop's finalizer) records a success, and
        the source stream is closed. Deadlines cover the whole stream, as ``wrap``'s: an
        async stream raises ``DeadlineExceeded`` at its deadline and its source is closed;
        a sync stream is recorded at its deadline and its chunks keep coming.
        """
        policy = self._failure_policy(record, ignore)
        _check_deadline(deadline_s)
        if inspect.isasyncgenfunction(generate) or inspect.iscoroutinefunction(generate):

            @functools.wraps(generate)
            def wrapped_async(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, None]:
                return self._async_stream(generate, policy, deadline_s, args, kwargs)

            return wrapped_async

        @functools.wraps(generate)
        def wrapped(*args: Any, **kwargs: Any) -> Generator[Any, None, None]:
            return self._sync_stream(generate, policy, deadline_s, args, kwargs)

        return wrapped

    def _sync_stream(
        self,
        generate: Callable[..., Iterable[T]],
        policy: FailurePolicy,
        deadline_s: float | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Generator[T, None, None]:
        mode, _ = self._chosen_mode()
        started = time.perf_counter()
        first: float | None = None
        watch = self._watch(mode, started, self._deadline_s(deadline_s), lambda: first)
        opened: Iterable[T] | None = None
        source: Iterator[T] | None = None
        try:
            opened = generate(*args, mode=mode, **kwargs)
            source = iter(opened)
            for chunk in source:
                if first is None:
                    first = time.perf_counter()
                yield chunk
        except GeneratorExit:  # the reader stopped early: the model was answering
            if watch.settle():
                self._recorded(True, mode, started, None, first)
            raise
        except Exception as exc:
            if watch.settle():
                self._recorded_error(policy, mode, started, exc, first)
            raise
        except BaseException:  # interrupted: no outcome, and no deadline failure later
            watch.settle()
            raise
        finally:
            # iter(openai.Stream) is a new generator: closing it alone leaves the HTTP
            # response open until the garbage collector finds it, so close both.
            for closable in (source, None if opened is source else opened):
                if closable is not None:
                    _close(closable)
        if watch.settle():
            self._recorded(True, mode, started, None, first)

    async def _async_stream(
        self,
        generate: Callable[..., Any],
        policy: FailurePolicy,
        deadline_s: float | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> AsyncGenerator[Any, None]:
        mode, _ = self._chosen_mode()
        deadline = self._deadline_s(deadline_s)
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        when = None if deadline is None else loop.time() + deadline
        first: float | None = None
        opened: Any = None
        source: AsyncIterator[Any] | None = None
        try:
            called = generate(*args, mode=mode, **kwargs)
            opened = await _within(called, when, loop) if inspect.isawaitable(called) else called
            source = aiter(opened)
            while True:
                try:
                    chunk = await _within(anext(source), when, loop)
                except StopAsyncIteration:
                    break
                if first is None:
                    first = time.perf_counter()
                yield chunk
        except _Late as late:
            assert deadline is not None
            raise self._exceeded(mode, started, deadline, first) from late.__cause__
        except GeneratorExit:  # the reader stopped early: the model was answering
            self._recorded(True, mode, started, None, first)
            raise
        except Exception as exc:
            self._recorded_error(policy, mode, started, exc, first)
            raise
        finally:
            # As for sync streams: aiter(openai.AsyncStream) is a new async generator.
            for closable in (source, None if opened is source else opened):
                if closable is not None:
                    await _aclose(closable)
        self._recorded(True, mode, started, None, first)

    # -- the response cache -----------------------------------------------------------

    def cache_get(self, key: str) -> bytes | None:
        return self.cache.get(key)

    def cache_put(self, key: str, value: bytes) -> None:
        """Store with the TTL the control stream sets now (3,600 s, or 300 s downshifted).

        A TTL change applies to entries stored after it; entries already stored keep the
        TTL they were stored with (at most 3,600 s), so a recovery never serves a
        response older than its own TTL promised.
        """
        self.cache.set(key, value, self.cache_ttl_s)

    def flush(self, timeout_s: float | None = None) -> int:
        """Wait for published outcomes to be delivered; returns how many are still pending."""
        return self._transport.flush(
            self.settings.sdk.close_timeout_s if timeout_s is None else timeout_s
        )

    def close(self) -> None:
        if self._metrics is not None:
            try:
                self._metrics.untrack_cache_size(self.model)
            except Exception:  # the client's threads and connections must close regardless
                self.stats.sdk_errors += 1
                log.exception("removing the cache size metric failed")
        self._deadlines.close()
        self._control.close()
        self._transport.close(self.settings.sdk.close_timeout_s)

    def __enter__(self) -> LlmClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _check_deadline(seconds: float | None) -> None:
    if seconds is not None and not 0 < seconds < float("inf"):
        raise ValueError(f"a deadline is a positive number of seconds, got {seconds!r}")


class _Late(Exception):
    """An async step ran past the stream's deadline (turned into ``DeadlineExceeded``)."""


async def _within(step: Awaitable[T], when: float | None, loop: asyncio.AbstractEventLoop) -> T:
    """Await ``step`` until the loop time ``when``; ``_Late`` (step cancelled) after it."""
    if when is None:
        return await step
    if loop.time() >= when:  # the reader held the stream past its deadline
        if inspect.iscoroutine(step):
            step.close()
        raise _Late
    timeout = asyncio.timeout_at(when)
    try:
        async with timeout:
            return await step
    except TimeoutError as exc:
        if timeout.expired():
            raise _Late from exc
        raise


def _close(source: object) -> None:
    """Close a sync stream's source if it can be (generators, ``openai.Stream``)."""
    close = getattr(source, "close", None)
    if callable(close):
        try:
            close()
        except Exception:
            log.exception("closing an LLM stream failed")


async def _aclose(source: object) -> None:
    """Close an async stream's source (``aclose()``, or ``AsyncStream``'s ``close()``)."""
    close = getattr(source, "aclose", None) or getattr(source, "close", None)
    if not callable(close):
        return
    try:
        result = close()
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("closing an LLM stream failed")
