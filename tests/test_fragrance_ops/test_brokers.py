"""The broker harness itself: real brokers start, serve, survive restart, leave no process."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fragrance_ops.brokers import (
    ApacheKafkaBroker,
    BrokerSetupError,
    BrokerStartError,
    TansuBroker,
)
from tests.helpers.kafka import consume_all, create_topics, produce_records
from tests.helpers.processes import live_pids_in_group

pytestmark = pytest.mark.integration


def wait_until_group_gone(pgid: int, timeout: float) -> list[int]:
    """Live pids still in the group after waiting up to ``timeout`` for it to empty."""
    deadline = time.monotonic() + timeout
    while (pids := live_pids_in_group(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return pids


def round_trip(bootstrap: str, topic: str) -> None:
    create_topics(bootstrap, [topic])
    produce_records(bootstrap, topic, [(b"k", b"hello")])
    [message] = consume_all(bootstrap, topic, expected_count=1, timeout=20)
    assert (message.key(), message.value()) == (b"k", b"hello")


@pytest.fixture(scope="module")
def apache() -> Iterator[ApacheKafkaBroker]:
    """One Apache broker for the tests that only need it up (JVM starts cost ~3s)."""
    with ApacheKafkaBroker() as broker:
        yield broker


def test_apache_broker_serves_round_trip(apache: ApacheKafkaBroker, topic_prefix: str) -> None:
    assert apache.running
    assert apache.kafka_version.count(".") == 2
    assert apache.bootstrap_servers == f"127.0.0.1:{apache.port}"
    round_trip(apache.bootstrap_servers, f"{topic_prefix}round-trip")


def test_apache_restart_keeps_data_and_port(apache: ApacheKafkaBroker, topic_prefix: str) -> None:
    topic = f"{topic_prefix}durable"
    create_topics(apache.bootstrap_servers, [topic])
    produce_records(apache.bootstrap_servers, topic, [(b"k", b"before-restart")])
    bootstrap, old_pid = apache.bootstrap_servers, apache.pid

    apache.restart()

    assert apache.running
    assert apache.pid != old_pid
    assert apache.bootstrap_servers == bootstrap
    [message] = consume_all(bootstrap, topic, expected_count=1, timeout=20)
    assert message.value() == b"before-restart"


def test_apache_kill_leaves_no_process(tmp_path: Path) -> None:
    broker = ApacheKafkaBroker(work_dir=tmp_path / "kafka")
    broker.start()
    pgid = broker.pid
    assert pgid is not None
    assert live_pids_in_group(pgid)

    broker.kill()

    assert not broker.running
    assert broker.pid is None
    assert live_pids_in_group(pgid) == []
    broker.close()
    assert (tmp_path / "kafka" / "data" / "meta.properties").exists(), "caller's dir is kept"


def test_apache_missing_jars_says_how_to_build(tmp_path: Path) -> None:
    with pytest.raises(BrokerSetupError, match=r"mvn -q -B -f deploy/kafka/pom\.xml package"):
        ApacheKafkaBroker(lib_dir=tmp_path)


def test_apache_failed_start_shows_log_tail(tmp_path: Path) -> None:
    broker = ApacheKafkaBroker(work_dir=tmp_path, extra_properties={"node.id": "not-a-number"})
    with pytest.raises(BrokerStartError, match="not-a-number") as excinfo:
        broker.start(timeout=60)
    assert "ConfigException" in excinfo.value.log_tail
    assert not broker.running


def test_broker_exiting_during_start_shows_log_tail() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        broker = TansuBroker(port=taken.getsockname()[1])
        with pytest.raises(BrokerStartError, match="exited with code") as excinfo:
            broker.start(timeout=30)
        assert excinfo.value.log_tail
        assert broker.pid is None
        broker.close()


def test_tansu_round_trip_then_stop_leaves_no_process(topic_prefix: str) -> None:
    with TansuBroker() as tansu:
        pgid = tansu.pid
        assert pgid is not None
        work_dir = tansu.work_dir
        round_trip(tansu.bootstrap_servers, f"{topic_prefix}round-trip")

    assert live_pids_in_group(pgid) == []
    assert not work_dir.exists(), "a temp work dir is removed on close"


_ORPHAN_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from fragrance_ops.brokers import TansuBroker
    broker = TansuBroker(work_dir=Path(sys.argv[1]))  # ours: a SIGKILLed parent cannot clean up
    broker.start()
    print(broker.pid, flush=True)
    time.sleep(120)
    """
)


def test_broker_dies_with_its_parent_even_on_sigkill(tmp_path: Path) -> None:
    """atexit cannot run on SIGKILL; the in-group watchdog must still reap the broker."""
    parent = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN_SCRIPT, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        assert parent.stdout is not None
        pgid = int(parent.stdout.readline())
        assert live_pids_in_group(pgid)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()

    assert wait_until_group_gone(pgid, timeout=20) == []


def test_session_broker_fixture_serves_round_trip(kafka_bootstrap: str, topic_prefix: str) -> None:
    round_trip(kafka_bootstrap, f"{topic_prefix}session")


def test_isolation_fixtures_name_topics_and_groups(topic_prefix: str, group_id: str) -> None:
    assert re.fullmatch(r"t[0-9a-f]{8}\.", topic_prefix)
    assert re.fullmatch(r"g-test_isolation_fixtures_name_topics_and_groups-[0-9a-f]{8}", group_id)
