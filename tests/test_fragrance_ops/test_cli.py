"""The command line: the demo (the README's main job), topic creation, settings."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from config.settings import KafkaSettings
from fragrance_ops.admin import create_contract_topics
from fragrance_ops.brokers import free_port
from fragrance_ops.brokers.base import LOCALHOST
from schemas import (
    TOPIC_SPECS,
    Halt,
    LlmControl,
    OperatorReply,
    RunAnnounced,
    RunFinished,
    SetEntropyCoef,
    StepMetric,
    encode,
    topic_name,
)
from tests.helpers.kafka import produce_records


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fragrance_ops", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("FRAGRANCE_OPS_") and name != "KAFKA_BOOTSTRAP_SERVERS"
    }
    return env | extra


def no_worker() -> dict[str, str]:
    """The setting that points ``status`` at a worker nobody runs (not the default port,
    where another worker on this machine may answer)."""
    urls = orjson.dumps([f"http://{LOCALHOST}:{free_port()}"]).decode()
    return {"FRAGRANCE_OPS_METRICS__STATUS_URLS": urls}


def leftovers(scratch: Path) -> list[Path]:
    """What the demo left in its temp directory; torch's compile cache, which torch keeps
    per user across runs, is not the demo's."""
    return [path for path in scratch.iterdir() if path.name != "torchinductor_root"]


MILESTONES = (
    "checkpoint saved at step 500",
    "checkpoint saved at step 1000",
    "downshift activated: qwen-fragrance creative -> balanced, cache TTL 300s",
    "retuning triggered after 100 ratings: {'entropy_coef': 0.02, 'learning_rate': 0.0005}",
    "rollback to the checkpoint of step 1000",
    "qwen-fragrance recovered: creative, cache TTL 3600s",
)


@pytest.mark.integration
def test_the_demo_on_the_embedded_broker_prints_every_milestone_and_draws_the_timeline(
    tmp_path: Path,
) -> None:
    png = tmp_path / "timeline.png"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    result = run_cli("demo", "--png", str(png), env=clean_env(TMPDIR=str(scratch)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "embedded broker (Tansu)" in result.stderr
    for line in MILESTONES:
        assert line in result.stdout, line
    assert "summary: " in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert leftovers(scratch) == []  # the broker's and the worker's files are gone


@pytest.mark.integration
def test_the_demo_against_a_given_broker(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    env = clean_env(FRAGRANCE_OPS_KAFKA__TOPIC_PREFIX=topic_prefix)
    png = tmp_path / "timeline.png"
    result = run_cli(
        "demo", "--steps", "1200", "--broker", kafka_bootstrap, "--png", str(png), env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "embedded broker" not in result.stderr
    assert "checkpoint saved at step 1000" in result.stdout
    assert png.exists()


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


@pytest.mark.integration
def test_ctrl_c_stops_the_demo_and_leaves_no_process_behind(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    demo = subprocess.Popen(
        [sys.executable, "-m", "fragrance_ops", "demo", "--png", str(tmp_path / "t.png")],
        env=clean_env(TMPDIR=str(scratch)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert demo.stdout is not None
    for line in demo.stdout:  # wait until the broker, the worker and the parties run
        if line.startswith("training "):
            break
    spawned = descendants(demo.pid)
    assert len(spawned) >= 2  # the broker and the worker, under their watchdogs
    demo.send_signal(signal.SIGINT)
    demo.communicate(timeout=90)
    deadline = time.monotonic() + 15
    while any(Path(f"/proc/{pid}").exists() for pid in spawned) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in spawned if Path(f"/proc/{pid}").exists()]
    assert leftovers(scratch) == []  # nor any file


@pytest.mark.integration
def test_topics_create_is_idempotent_and_compacts_where_marked(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    env = clean_env(
        KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
        FRAGRANCE_OPS_KAFKA__TOPIC_PREFIX=topic_prefix,
        FRAGRANCE_OPS_KAFKA__PARTITIONS="3",
    )
    first = run_cli("topics", "create", env=env)
    second = run_cli("topics", "create", env=env)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.count(": created") == len(TOPIC_SPECS)
    assert second.stdout.count(": exists") == len(TOPIC_SPECS)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    metadata = admin.list_topics(timeout=10)
    for spec in TOPIC_SPECS.values():
        name = topic_name(spec.topic, topic_prefix)
        assert len(metadata.topics[name].partitions) == 3
        resource = ConfigResource(ConfigResource.Type.TOPIC, name)
        config = admin.describe_configs([resource])[resource].result()
        assert (config["cleanup.policy"].value == "compact") == spec.compacted, name


def test_settings_command_masks_secrets() -> None:
    env = clean_env(
        FRAGRANCE_OPS_KAFKA__SASL_PASSWORD="hunter2", FRAGRANCE_OPS_REWARD__WINDOW_SIZE="77"
    )
    result = run_cli("settings", env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout
    printed = orjson.loads(result.stdout)
    assert printed["reward"]["window_size"] == 77
    assert printed["kafka"]["sasl_password"] == "**********"


@pytest.mark.parametrize("command", [["settings"], ["worker"], ["status"], ["topics", "create"]])
def test_an_invalid_setting_is_one_message_naming_the_variable(command: list[str]) -> None:
    env = clean_env(
        FRAGRANCE_OPS_REWARD__WINDOW_SIZE="-5", FRAGRANCE_OPS_SECURITY__REQUIRE_SIGNED_COMMANDS="1"
    )
    result = run_cli(*command, env=env, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "fragrance-ops: invalid settings:",
        "  FRAGRANCE_OPS_REWARD__WINDOW_SIZE (reward.window_size): Input should be greater "
        "than or equal to 1",
        "  security: security require_signed_commands needs command_signing_key",
        "Fix or unset them in the environment; docs/configuration.md gives each one's "
        "meaning and range.",
    ]
    debugged = run_cli("--debug", *command, env=env, timeout=60)
    assert debugged.returncode != 0
    assert "Traceback" in debugged.stderr


@pytest.mark.parametrize(
    "command", [["status"], ["status", "--json"], ["worker"], ["topics", "create"]]
)
def test_an_unreachable_broker_is_one_message_saying_what_to_check(command: list[str]) -> None:
    address = f"{LOCALHOST}:{free_port()}"  # nothing listens there
    # status asks a worker first; none answering, it reads the topics.
    env = clean_env(FRAGRANCE_OPS_KAFKA__BOOTSTRAP_SERVERS=address, **no_worker())
    result = run_cli(*command, env=env, timeout=60)
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()  # no librdkafka retries, no traceback
    assert line.startswith(f"fragrance-ops: cannot reach Kafka at {address}: "), line
    assert "FRAGRANCE_OPS_KAFKA__BOOTSTRAP_SERVERS" in line


def test_debug_shows_the_traceback_of_an_unreachable_broker() -> None:
    # One command is enough: main() turns the error into the message, or re-raises it with
    # --debug, for every command alike (each one's wait for the broker costs 10 s).
    address = f"{LOCALHOST}:{free_port()}"
    env = clean_env(FRAGRANCE_OPS_KAFKA__BOOTSTRAP_SERVERS=address, **no_worker())
    debugged = run_cli("--debug", "topics", "create", env=env, timeout=60)
    assert debugged.returncode != 0
    assert "Traceback" in debugged.stderr
    assert "KafkaUnreachable" in debugged.stderr


@pytest.mark.integration
def test_status_reports_breakers_and_runs_from_the_topics(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    create_contract_topics(
        KafkaSettings(bootstrap_servers=kafka_bootstrap, topic_prefix=topic_prefix)
    )
    until = 4_102_444_800.0  # 2100: still held when the command runs
    controls = [
        LlmControl(
            model="qwen",
            state="open",
            mode="balanced",
            cache_ttl_s=300.0,
            until=until,
            reason="3 consecutive failures in creative: downshift to balanced",
            ts=1.0,
            epoch=1,
        ),
    ]
    metrics = [
        StepMetric(run_id="run-s", step=step, loss=0.5, reward=1.0, ts=1.0, entropy_coef=0.009)
        for step in range(5)
    ]
    now = time.time()
    # run-h: active and halted; run-r: halted, then resumed by an operator.
    metrics += [StepMetric(run_id=run, step=9, loss=0.5, reward=1.0, ts=now) for run in "hr"]
    # run-f: silent as long as run-s, but it said it finished; run-a: finished, then resumed.
    metrics += [StepMetric(run_id=run, step=3, loss=0.5, reward=1.0, ts=1.0) for run in "fa"]
    runs = [
        RunFinished(type="finished", run_id="f", ts=2.0, step=3),
        RunFinished(type="finished", run_id="a", ts=2.0, step=3),
        RunAnnounced(run_id="a", ts=3.0, settings={}),
    ]
    commands = [
        SetEntropyCoef(command_id="c", run_id="run-s", issued_at=1.0, entropy_coef=0.009, step=4),
        *(Halt(command_id=f"h{run}", run_id=run, issued_at=2.0, reason="x") for run in "hr"),
    ]
    replies = [
        OperatorReply(
            request_id="q",
            run_id="r",
            action="resume",
            accepted=True,
            detail="resumed",
            requested_by="alice",
            reason="fixed",
            ts=3.0,
        )
    ]
    for events in (controls, metrics, commands, replies, runs):
        produce_records(
            kafka_bootstrap,
            topic_name(events[0].TOPIC, topic_prefix),
            [(event.key().encode(), encode(event)) for event in events],
        )
    env = clean_env(
        KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
        FRAGRANCE_OPS_KAFKA__TOPIC_PREFIX=topic_prefix,
        **no_worker(),
    )
    result = run_cli("status", "--json", env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    status = orjson.loads(result.stdout)
    assert status["source"] == "topics"
    qwen = status["models"]["qwen"]
    assert (qwen["state"], qwen["mode"], qwen["cache_ttl_s"]) == ("open", "balanced", 300.0)
    assert qwen["recovers_in_s"] > 0
    run = status["runs"]["run-s"]
    assert (run["step"], run["entropy_coef"]) == (4, 0.009)
    assert run["last_command"]["type"] == "set_entropy_coef"
    flags = {
        run_id: (run["halted"], run["finished"], run["stale"])
        for run_id, run in status["runs"].items()
    }
    assert flags == {
        "run-s": (False, False, True),
        "h": (True, False, False),
        "r": (False, False, False),
        "f": (False, True, False),
        "a": (False, False, True),
    }
    text = run_cli("status", env=env, timeout=60).stdout
    assert "qwen: open, mode balanced, cache TTL 300s" in text
    assert "run-s: step 4 (attempt 0), entropy_coef 0.009, last command set_entropy_coef" in text
    assert "h: step 9 (attempt 0), entropy_coef ?, last command halt [halted]" in text
    assert "[stale: silent for " in text
    assert "f: step 3 (attempt 0), entropy_coef ?, last command none [finished]" in text
