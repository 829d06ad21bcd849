"""The response cache: one behaviour suite over both implementations, then each one's own.

The in-process cache runs on a fake clock; the Redis cache against a real redis-server
(``redis_url``), with real time and TTLs of 1 s where expiry is the point.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from producers.response_cache import InProcessCache, RedisCache, ResponseCache
from tests.helpers.redis import RedisServer, closed_port, redis_server_executable

SECRET = "hunter2-s3cret"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Subject:
    cache: ResponseCache
    advance: Callable[[float], None]  # lets `seconds` pass for the cache


def unique_prefix() -> str:
    return f"test:{uuid.uuid4().hex[:8]}:"


def real_server_cache(url: str, **options: Any) -> RedisCache:
    """A RedisCache on a real server, with timeouts longer than the 50 ms defaults.

    A loaded CI machine must not turn a test into a flaky miss.
    """
    return RedisCache(url, connect_timeout_s=2.0, socket_timeout_s=2.0, **options)


@pytest.fixture(params=["in-process", "redis"])
def subject(request: pytest.FixtureRequest) -> Iterator[Subject]:
    if request.param == "in-process":
        clock = FakeClock()
        yield Subject(InProcessCache(maxsize=100, timer=clock), clock.advance)
    else:
        url = request.getfixturevalue("redis_url")
        cache = real_server_cache(url, prefix=unique_prefix())
        yield Subject(cache, time.sleep)
        cache.clear()
        cache.close()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, socket_timeout=2.0)
    yield client
    client.close()


# -- the behaviour of every ResponseCache ------------------------------------------------


def test_both_implement_the_interface(subject: Subject) -> None:
    assert isinstance(subject.cache, ResponseCache)


def test_a_stored_value_is_returned_and_a_new_value_replaces_it(subject: Subject) -> None:
    cache = subject.cache
    assert cache.get("prompt-1") is None
    cache.set("prompt-1", b'{"text": "bergamot"}', ttl_s=60)
    cache.set("prompt-2", b"\x00\xff binary", ttl_s=60)
    assert cache.get("prompt-1") == b'{"text": "bergamot"}'
    assert cache.get("prompt-2") == b"\x00\xff binary"
    cache.set("prompt-1", b"vetiver", ttl_s=60)
    assert cache.get("prompt-1") == b"vetiver"
    assert cache.size() == 2


def test_each_entry_expires_at_its_own_ttl_so_a_shorter_ttl_applies_to_new_entries_only(
    subject: Subject,
) -> None:
    cache = subject.cache
    cache.set("cached-while-healthy", b"a", ttl_s=3600)
    cache.set("cached-after-downshift", b"b", ttl_s=1)
    assert cache.get("cached-after-downshift") == b"b"
    assert cache.size() == 2
    subject.advance(1.1)
    assert cache.get("cached-after-downshift") is None
    assert cache.get("cached-while-healthy") == b"a"
    assert cache.size() == 1


def test_a_ttl_of_zero_or_less_stores_nothing_and_drops_the_key(subject: Subject) -> None:
    cache = subject.cache
    cache.set("k", b"v", ttl_s=60)
    cache.set("k", b"newer", ttl_s=0)
    assert cache.get("k") is None
    cache.set("k", b"v", ttl_s=-5)
    assert cache.get("k") is None
    assert cache.size() == 0


def test_clear_removes_every_entry(subject: Subject) -> None:
    cache = subject.cache
    for i in range(5):
        cache.set(f"k{i}", b"v", ttl_s=60)
    assert cache.size() == 5
    cache.clear()
    assert cache.size() == 0
    assert cache.get("k0") is None


@pytest.mark.parametrize("ttl_s", [math.nan, math.inf, -math.inf])
def test_a_non_finite_ttl_is_a_caller_bug(subject: Subject, ttl_s: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        subject.cache.set("k", b"v", ttl_s)


def test_values_must_be_bytes(subject: Subject) -> None:
    with pytest.raises(TypeError, match="bytes"):
        subject.cache.set("k", "text", 60)  # type: ignore[arg-type]
    assert subject.cache.get("k") is None


# -- InProcessCache ---------------------------------------------------------------------


def test_in_process_cache_evicts_the_least_recently_used_entry_at_maxsize() -> None:
    cache = InProcessCache(maxsize=2, timer=FakeClock())
    cache.set("a", b"1", 60)
    cache.set("b", b"2", 60)
    assert cache.get("a") == b"1"  # now "b" is the least recently used
    cache.set("c", b"3", 60)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (b"1", None, b"3")
    assert cache.size() == cache.maxsize == 2


def test_in_process_expired_entries_make_room_before_live_ones_are_evicted() -> None:
    clock = FakeClock()
    cache = InProcessCache(maxsize=2, timer=clock)
    cache.set("live", b"1", 60)
    cache.set("short", b"2", 1)
    clock.advance(2)
    cache.set("new", b"3", 60)
    assert (cache.get("live"), cache.get("new")) == (b"1", b"3")


def test_shorten_existing_caps_deadlines_and_keeps_the_recency_order() -> None:
    clock = FakeClock()
    cache = InProcessCache(maxsize=3, timer=clock)
    cache.set("a", b"1", 3600)
    cache.set("b", b"2", 3600)
    cache.set("soon", b"3", 10)
    assert cache.get("a") == b"1"  # recency, oldest first: b, soon, a
    assert cache.shorten_existing(300) == 2  # "soon" already expires sooner
    cache.set("d", b"4", 3600)  # evicts the least recently used: still "b"
    assert (cache.get("b"), cache.get("a"), cache.get("soon")) == (None, b"1", b"3")
    clock.advance(11)
    assert cache.get("soon") is None
    assert cache.get("a") == b"1"
    clock.advance(300)
    assert (cache.get("a"), cache.get("d")) == (None, b"4")  # "d" came after, keeps 3600


def test_shorten_existing_to_zero_empties_the_cache() -> None:
    cache = InProcessCache(timer=FakeClock())
    cache.set("a", b"1", 60)
    cache.shorten_existing(0)
    assert cache.size() == 0


def test_in_process_cache_is_safe_under_many_threads() -> None:
    cache = InProcessCache(maxsize=50)
    errors: list[BaseException] = []

    def hammer(worker: int) -> None:
        try:
            for i in range(2000):
                key = f"k{(worker * 7 + i) % 120}"
                cache.set(key, key.encode(), ttl_s=0.001 if i % 5 == 0 else 60)
                value = cache.get(key)
                assert value is None or value == key.encode()
                if i % 100 == 0:
                    cache.size()
                    cache.shorten_existing(30)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert 0 < cache.size() <= 50


def test_in_process_maxsize_must_be_positive() -> None:
    with pytest.raises(ValueError, match="maxsize"):
        InProcessCache(maxsize=0)


# -- RedisCache against a real server ---------------------------------------------------


def test_redis_ttl_is_whole_seconds_rounded_up_and_at_least_one(
    redis_url: str, redis_client: redis.Redis
) -> None:
    prefix = unique_prefix()
    cache = real_server_cache(redis_url, prefix=prefix)
    cache.set("a", b"v", ttl_s=0.3)
    cache.set("b", b"v", ttl_s=1.2)
    cache.set("c", b"v", ttl_s=3600)
    assert [redis_client.ttl(prefix + key) for key in "abc"] == [1, 2, 3600]
    cache.clear()


def test_redis_keys_live_under_the_prefix_and_other_keys_are_not_counted_or_cleared(
    redis_url: str, redis_client: redis.Redis
) -> None:
    tag = uuid.uuid4().hex[:8]
    prefix = f"test:{tag}:[x]*?"  # glob characters must match only themselves
    cache = real_server_cache(redis_url, prefix=prefix)
    neighbour = f"test:{tag}:x-not-ours"
    redis_client.set(neighbour, b"keep", ex=60)
    cache.set("k", b"v", 60)
    assert redis_client.get(prefix + "k") == b"v"
    assert cache.size() == 1
    cache.clear()
    assert cache.size() == 0
    assert redis_client.get(neighbour) == b"keep"
    redis_client.delete(neighbour)


def test_clear_removes_more_keys_than_one_scan_batch(redis_url: str) -> None:
    cache = real_server_cache(redis_url, prefix=unique_prefix())
    for i in range(2500):
        cache.set(f"k{i}", b"v", 60)
    assert cache.size() == 2500
    cache.clear()
    assert cache.size() == 0


def test_an_existing_client_is_used_and_left_open(
    redis_url: str, redis_client: redis.Redis
) -> None:
    cache = RedisCache(redis_client, prefix=unique_prefix())
    cache.set("k", b"v", 60)
    assert cache.get("k") == b"v"
    cache.clear()
    cache.close()
    assert redis_client.ping()


def test_a_client_that_decodes_responses_is_refused(redis_url: str) -> None:
    with pytest.raises(ValueError, match="decode_responses"):
        RedisCache(redis.Redis.from_url(redis_url, decode_responses=True))


@pytest.mark.skipif(redis_server_executable() is None, reason="redis-server is not installed")
def test_the_cache_recovers_when_redis_comes_back() -> None:
    clock = FakeClock()
    with RedisServer() as server:
        cache = real_server_cache(server.url, timer=clock)
        cache.set("k", b"v", 60)
        server.stop()
        assert cache.get("k") is None
        assert cache.errors == 1
        server.start()
        clock.advance(1.0)  # retry_after_s
        cache.set("k", b"again", 60)  # memory-only server: the old entry is gone
        assert cache.get("k") == b"again"
        assert (cache.errors, cache.skipped) == (1, 0)
        cache.close()


# -- RedisCache when Redis is unreachable or refuses us ---------------------------------


def test_an_unreachable_redis_never_raises_and_counts_every_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    cache = RedisCache(f"redis://127.0.0.1:{closed_port()}/0", retry_after_s=0)
    assert cache.get("k") is None
    cache.set("k", b"v", 60)
    cache.set("k", b"v", 0)
    assert cache.size() == 0
    cache.clear()
    assert (cache.errors, cache.skipped) == (5, 0)
    assert "redis cache" in caplog.text
    assert "Connection refused" in caplog.text
    cache.close()


def test_after_a_failure_redis_is_bypassed_for_retry_after_s() -> None:
    clock = FakeClock()
    cache = RedisCache(f"redis://127.0.0.1:{closed_port()}/0", retry_after_s=1.0, timer=clock)
    assert cache.get("k") is None
    cache.set("k", b"v", 60)
    assert cache.get("k") is None
    assert (cache.errors, cache.skipped) == (1, 2)
    clock.advance(1.0)
    assert cache.get("k") is None
    assert (cache.errors, cache.skipped) == (2, 2)


def test_failures_are_logged_at_most_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="producers.response_cache")
    clock = FakeClock()
    cache = RedisCache(
        f"redis://127.0.0.1:{closed_port()}/0", retry_after_s=0, warn_interval_s=10, timer=clock
    )
    for _ in range(5):
        cache.get("k")
    clock.advance(10)
    cache.get("k")
    warnings = [r for r in caplog.records if r.name == "producers.response_cache"]
    assert len(warnings) == 2
    assert cache.errors == 6
    assert "(6 errors so far)" in warnings[1].getMessage()


def test_the_password_never_appears_in_logs_or_repr(
    redis_url: str, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, redis-py's included
    user = f"u{uuid.uuid4().hex[:8]}"
    redis_client.acl_setuser(
        user, enabled=True, passwords=["+right-password"], keys="*", commands=["+@all"]
    )
    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    try:
        unreachable = RedisCache(f"redis://{user}:{SECRET}@127.0.0.1:{closed_port()}/0")
        wrong = real_server_cache(f"redis://{user}:{SECRET}@127.0.0.1:{port}/0")
        right = real_server_cache(
            f"redis://{user}:right-password@127.0.0.1:{port}/0", prefix=unique_prefix()
        )
        for cache in (unreachable, wrong):
            assert cache.get("k") is None
            assert cache.errors == 1
            assert SECRET not in repr(cache)
            assert SECRET not in str(cache)
        assert "AuthenticationError: invalid username-password pair" in caplog.text
        right.set("k", b"v", 60)
        assert right.get("k") == b"v"
        assert "right-password" not in repr(right)
        right.clear()
        assert SECRET not in caplog.text
        assert "right-password" not in caplog.text
    finally:
        redis_client.acl_deluser(user)
