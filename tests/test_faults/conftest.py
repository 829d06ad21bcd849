"""Fixtures of the fault-injection suite (issue 7): workers, a broker of its own, the figures.

Run alone with ``pytest tests/test_faults`` (``-m faults`` selects the same tests anywhere);
``FRAGRANCE_OPS_FAULTS=long`` for the long profile, ``FRAGRANCE_OPS_FAULTS_SEED=<n>`` to
repeat a run's random choices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from config.settings import Settings
from fragrance_ops.admin import create_contract_topics
from fragrance_ops.brokers import ApacheKafkaBroker
from fragrance_ops.brokers.base import BrokerSetupError
from fragrance_ops.worker_process import WorkerProcess
from tests.test_faults.support import FIGURES
from tests.test_streams.conftest import make_worker, ops_settings

__all__ = ["make_worker", "ops_settings"]  # the stream tests' fixtures, reused here

#: Every fault test's worker: a dead member's partitions move after 6 s (the broker's
#: minimum) instead of 10 s, so a SIGKILL-and-restart cycle takes about 7 s, not 11 s; the
#: stall watchdog acts after 15 s instead of 60 s, within the scenarios' waits.
FAULT_WORKER_DEFAULTS = {"WORKER__SESSION_TIMEOUT_S": "6", "WORKER__STALL_TIMEOUT_S": "15"}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES.by_scenario:
        return
    terminalreporter.section("fault injection figures")
    for line in FIGURES.lines():
        terminalreporter.write_line(line)


@pytest.fixture
def fault_worker(
    make_worker: Callable[..., WorkerProcess], ops_settings: Settings
) -> Callable[..., WorkerProcess]:
    """``make_worker`` with the suite's defaults; the contract topics exist before it starts."""
    create_contract_topics(ops_settings.kafka)

    def make(**settings: str) -> WorkerProcess:
        return make_worker(**(FAULT_WORKER_DEFAULTS | settings))

    return make


@pytest.fixture(scope="session")
def own_broker() -> Iterator[ApacheKafkaBroker]:
    """An Apache Kafka broker only this suite stops and starts (the session's is shared)."""
    try:
        broker = ApacheKafkaBroker()
    except BrokerSetupError as exc:
        pytest.skip(f"the broker-restart scenarios need the Apache Kafka jars: {exc}")
    with broker:
        yield broker
