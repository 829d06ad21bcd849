"""The LLM SDK's response cache: one small interface, an in-process and a Redis implementation.

    cache: ResponseCache = InProcessCache(maxsize=1024)          # the default
    cache = RedisCache("redis://cache.internal:6379/0")           # shared by replicas
    hit = cache.get(key)
    if hit is None:
        hit = serialise(generate(prompt))
        cache.set(key, hit, ttl_s=control.cache_ttl_s)           # 3,600 s healthy, 300 s degraded

**Values are bytes.** The caller serialises (e.g. orjson) and deserialises; the cache never
pickles or interprets a value. **Keys are strings** used as given: make them short and
stable, e.g. the sha256 hex of model, mode and prompt; the cache does not hash them.

**TTL semantics.** Every entry keeps the TTL it was stored with. When the control stream
shortens the TTL (a downshift: 3,600 s -> 300 s), the new TTL applies to entries stored from
then on; entries stored before expire at their own, later deadline, so a response cached while
healthy may be served for up to the old TTL. ``ttl_s <= 0`` means "do not cache": nothing is
stored and any entry under the key is removed. A non-finite ``ttl_s`` is a caller's bug and
raises ``ValueError``; a value that is not ``bytes`` raises ``TypeError``.

``InProcessCache`` can also cap the existing entries: ``shorten_existing(max_ttl_s)`` moves
every deadline later than ``now + max_ttl_s`` to that time, keeping the recency order (so
which entry is evicted next does not change). Call it on a downshift to stop serving
responses cached while healthy after the new TTL. ``RedisCache`` has no such method: its
entries always keep their TTL (Redis 7 could do it with ``SCAN`` + ``EXPIRE ... LT``).

``InProcessCache`` (``cachetools.TLRUCache``, per-entry deadlines): at most ``maxsize``
entries (counted, not sized in bytes); the least recently used live entry is evicted to make
room, after expired ones. Guarded by a lock, so the SDK may call it from many threads.
``timer`` (seconds, monotonic) lets tests move time without sleeping.

``RedisCache`` (redis-py): ``SET <prefix><key> <value> EX <seconds>``. Redis's ``EX`` takes
whole seconds, so the TTL is rounded **up** to an integer, at least 1: an entry may live up to
a second longer than asked, never shorter. It never raises into the caller because Redis is
down, slow or refusing: ``get`` returns ``None`` (a miss), ``set`` and ``clear`` do nothing,
``size`` returns 0; each failure is counted in ``errors`` and logged as a throttled warning.
Connect and socket timeouts default to 50 ms each and redis-py's retries are off, so an
unreachable or stalled Redis costs a call at most about their sum; after a failure the cache
is bypassed for ``retry_after_s`` (counted in ``skipped``), so an outage costs one timeout per
interval, not one per call. ``size()`` counts the keys under the prefix with ``SCAN`` (not
``DBSIZE``, which would count every other application's keys in a shared database): it walks
the whole keyspace of the database in batches of 1,000, O(keys in the db) on the server and
one round trip per batch, so poll it for metrics every few seconds at most, not per call.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NamedTuple, Protocol, TypeVar, runtime_checkable

from cachetools import TLRUCache

if TYPE_CHECKING:
    from redis import Redis

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "fragrance-ops:cache:"
_SCAN_COUNT = 1000
_T = TypeVar("_T")


@runtime_checkable
class ResponseCache(Protocol):
    """What the LLM SDK needs from a response cache; see the module docstring for semantics.

    ``size()`` is a method, not ``__len__``: for Redis it is a network scan, and a
    ``__len__`` would make an empty cache falsy in ``if cache:``.
    """

    def get(self, key: str) -> bytes | None:
        """The value stored under ``key``, or ``None`` if absent or expired."""
        ...

    def set(self, key: str, value: bytes, ttl_s: float) -> None:
        """Store ``value`` for ``ttl_s`` seconds (``<= 0``: store nothing, drop the key)."""
        ...

    def size(self) -> int:
        """Live entries (for the cache-size metric)."""
        ...

    def clear(self) -> None:
        """Remove every entry of this cache."""
        ...


def _should_store(value: bytes, ttl_s: float) -> bool:
    """Validate a ``set`` call: True to store, False to drop the key (``ttl_s <= 0``)."""
    if not isinstance(value, bytes):
        raise TypeError(f"cache values are bytes (serialise first), got {type(value).__name__}")
    if not math.isfinite(ttl_s):
        raise ValueError(f"ttl_s must be finite, got {ttl_s!r}")
    return ttl_s > 0


class _Entry(NamedTuple):
    value: bytes
    expires: float  # on the cache's timer


def _time_to_use(_key: str, entry: _Entry, _now: float) -> float:
    return entry.expires


class InProcessCache:
    """A bounded, thread-safe TTL cache in this process (``cachetools.TLRUCache``)."""

    def __init__(self, maxsize: int = 1024, *, timer: Callable[[], float] = time.monotonic) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, got {maxsize}")
        self._lock = threading.Lock()
        self._cache: TLRUCache[str, _Entry, float] = TLRUCache(maxsize, _time_to_use, timer)

    @property
    def maxsize(self) -> int:
        return int(self._cache.maxsize)

    def get(self, key: str) -> bytes | None:
        with self._lock:
            entry = self._cache.get(key)  # a hit makes the entry the most recently used
        return None if entry is None else entry.value

    def set(self, key: str, value: bytes, ttl_s: float) -> None:
        store = _should_store(value, ttl_s)
        with self._lock:
            if store:
                expires = self._cache.timer() + ttl_s
                self._cache[key] = _Entry(value, expires)
            else:
                self._cache.pop(key, None)

    def size(self) -> int:
        with self._lock:
            self._cache.expire()
            return len(self._cache)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def shorten_existing(self, max_ttl_s: float) -> int:
        """Make every entry expire within ``max_ttl_s`` from now; return how many moved.

        Entries already due sooner keep their deadline; recency order is kept. O(entries):
        meant for the rare TTL change, not per call. ``max_ttl_s <= 0`` empties the cache.
        """
        if not math.isfinite(max_ttl_s):
            raise ValueError(f"max_ttl_s must be finite, got {max_ttl_s!r}")
        with self._lock:
            deadline = self._cache.timer() + max_ttl_s
            # TLRUCache has no public way to change a deadline: take every live entry out,
            # least recently used first, and put it back in the same order.
            entries: list[tuple[str, _Entry]] = []
            while True:
                try:
                    entries.append(self._cache.popitem())
                except KeyError:  # no live entry left (expired ones are dropped)
                    break
            moved = 0
            for key, entry in entries:
                if entry.expires > deadline:
                    entry = entry._replace(expires=deadline)
                    moved += 1
                self._cache[key] = entry  # not stored if already due (deadline <= now)
            return moved

    def __repr__(self) -> str:
        return f"InProcessCache(maxsize={self.maxsize})"


def _glob_escape(text: str) -> str:
    """Escape Redis glob metacharacters so a prefix matches only itself."""
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)


class RedisCache:
    """The response cache in Redis, shared by every replica; never raises when Redis is down.

    ``client`` is a URL (``redis://[[user]:password@]host:port/db``, ``rediss://``,
    ``unix://``) or an existing ``redis.Redis``. From a URL, the client gets the timeouts
    below and no retries (query-string options in the URL win); a client you pass keeps its
    own timeouts and retry policy, so make them short, and it must not decode responses.
    ``close()`` closes only a client this object created.

    Attributes ``errors`` (Redis operations that failed) and ``skipped`` (operations not
    attempted during the back-off after a failure) are counters for metrics.
    """

    def __init__(
        self,
        client: str | Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        connect_timeout_s: float = 0.05,
        socket_timeout_s: float = 0.05,
        retry_after_s: float = 1.0,
        warn_interval_s: float = 10.0,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        if isinstance(client, str):
            self._client = redis.Redis.from_url(
                client,
                socket_connect_timeout=connect_timeout_s,
                socket_timeout=socket_timeout_s,
                retry=Retry(NoBackoff(), 0),
            )
            self._owns_client = True
        else:
            self._client = client
            self._owns_client = False
        kwargs = self._client.connection_pool.connection_kwargs
        if kwargs.get("decode_responses"):
            raise ValueError("RedisCache needs a client with decode_responses=False (bytes)")
        password = kwargs.get("password")
        self._password = password if isinstance(password, str) and password else None
        if "path" in kwargs:
            self._where = f"unix:{kwargs['path']}"
        else:
            self._where = f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
        self._where += f"/{kwargs.get('db', 0)}"
        self._failures: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self.prefix = prefix
        self._pattern = _glob_escape(prefix) + "*"
        self._retry_after_s = retry_after_s
        self._warn_interval_s = warn_interval_s
        self._timer = timer
        self._lock = threading.Lock()  # counters and back-off state
        self._down_until = -math.inf
        self._last_warning = -math.inf
        self.errors = 0
        self.skipped = 0

    # -- the interface ---------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        value = self._call("get", lambda: self._client.get(self.prefix + key), None)
        return value if isinstance(value, bytes) else None

    def set(self, key: str, value: bytes, ttl_s: float) -> None:
        name = self.prefix + key
        if _should_store(value, ttl_s):
            seconds = max(1, math.ceil(ttl_s))
            self._call("set", lambda: self._client.set(name, value, ex=seconds), None)
        else:
            self._call("delete", lambda: self._client.delete(name), None)

    def size(self) -> int:
        return self._call("size", lambda: sum(1 for _ in self._keys()), 0)

    def clear(self) -> None:
        def unlink_all() -> None:
            batch: list[bytes] = []
            for name in self._keys():
                batch.append(name)
                if len(batch) >= _SCAN_COUNT:
                    self._client.unlink(*batch)
                    batch.clear()
            if batch:
                self._client.unlink(*batch)

        self._call("clear", unlink_all, None)

    # -- the rest ----------------------------------------------------------------------

    def close(self) -> None:
        """Close the client if this object created it (from a URL)."""
        if self._owns_client:
            self._client.close()

    def _keys(self) -> Iterator[bytes]:
        yield from self._client.scan_iter(match=self._pattern, count=_SCAN_COUNT)

    def _call(self, operation: str, command: Callable[[], _T], default: _T) -> _T:
        with self._lock:
            if self._timer() < self._down_until:
                self.skipped += 1
                return default
        try:
            return command()
        except self._failures as exc:
            self._failed(operation, exc)
            return default

    def _failed(self, operation: str, exc: BaseException) -> None:
        with self._lock:
            self.errors += 1
            now = self._timer()
            self._down_until = now + self._retry_after_s
            if now - self._last_warning < self._warn_interval_s:
                return
            self._last_warning = now
            errors = self.errors
        reason = f"{type(exc).__name__}: {exc}"
        if self._password is not None:
            reason = reason.replace(self._password, "***")
        log.warning(
            "redis cache %s unavailable (%s failed: %s); serving without it, "
            "retrying after %.1fs (%d errors so far)",
            self._where,
            operation,
            reason,
            self._retry_after_s,
            errors,
        )

    def __repr__(self) -> str:
        return f"RedisCache({self._where!r}, prefix={self.prefix!r})"
