"""Session-wide Kafka and per-test isolation (topic prefix, group id).

One broker per test run (see tests/helpers/brokers.py for how it is chosen),
so tests isolate by naming: every test gets its own topic prefix and group id.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest

from tests.helpers.brokers import chosen_broker, session_broker


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: talks to a real Kafka broker (started by the harness)"
    )


def pytest_report_header(config: pytest.Config) -> str:
    return f"kafka test broker: {chosen_broker()}"


@pytest.fixture(scope="session", autouse=True)
def sb3_logs_in_the_test_tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Stable-Baselines3 makes a log folder per learn() in the system's temp directory
    unless ``SB3_LOGDIR`` names one; the tests' go with their other files."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SB3_LOGDIR", str(tmp_path_factory.mktemp("sb3")))
        yield


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """bootstrap.servers of the session's broker, started on first use."""
    with session_broker() as bootstrap:
        yield bootstrap


@pytest.fixture
def topic_prefix() -> str:
    """Unique per test, e.g. "t1a2b3c4d.": topics never collide across tests or runs."""
    return f"t{uuid.uuid4().hex[:8]}."


@pytest.fixture
def group_id(request: pytest.FixtureRequest) -> str:
    """Unique consumer group per test; carries the test name for broker-side debugging."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", request.node.name)[:60]
    return f"g-{name}-{uuid.uuid4().hex[:8]}"
