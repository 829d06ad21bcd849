"""Fixtures for the SDK tests: a real redis-server for the Redis response cache."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.redis import RedisServer, redis_server_executable


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a memory-only redis-server started for this session, stopped at its end.

    Skips only when redis-server is not installed; a server that fails to start is an error.
    """
    if redis_server_executable() is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    with RedisServer() as server:
        yield server.url
