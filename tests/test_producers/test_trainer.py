"""The trainer SDK without a broker (in-memory transport) and with an unreachable one."""

from __future__ import annotations

import logging
import math
import threading
import time

import orjson
import pytest

from config.kafka import JAVA_COMPATIBLE_PARTITIONER
from config.settings import KafkaSettings, SdkSettings, Settings
from producers import CommandRejected, InMemoryTransport, KafkaTransport, TrainerClient
from schemas import (
    Command,
    InvalidEvent,
    RewardStats,
    RunFinished,
    SetEntropyCoef,
    StepMetric,
    Topic,
    decode,
    decode_run_event,
    encode,
)


@pytest.fixture
def transport() -> InMemoryTransport:
    return InMemoryTransport()


@pytest.fixture
def client(transport: InMemoryTransport) -> TrainerClient:
    return TrainerClient("run-1", settings=Settings(), transport=transport)


def entropy_command(command_id: str, value: float = 0.005, run_id: str = "run-1") -> bytes:
    return encode(
        SetEntropyCoef(
            command_id=command_id, run_id=run_id, issued_at=1.0, entropy_coef=value, step=10
        )
    )


def acks(transport: InMemoryTransport) -> list[dict[str, object]]:
    return [orjson.loads(record.value) for record in transport.records(Topic.ACKS)]


def test_announce_metrics_and_checkpoints_are_published_keyed_by_run(
    client: TrainerClient, transport: InMemoryTransport
) -> None:
    client.announce({"reward.window_size": 500})
    client.log_step(7, loss=0.5, reward=1.5, entropy=0.2, learning_rate=3e-4)
    client.checkpoint_saved(500, "file:///ckpt/500.pt")
    runs, metrics, checkpoints = (
        transport.records(topic) for topic in (Topic.RUNS, Topic.METRICS, Topic.CHECKPOINTS)
    )
    assert orjson.loads(runs[0].value)["settings"] == {"reward.window_size": 500}
    assert orjson.loads(runs[0].value)["algorithm"] == "ppo"  # unless the trainer says
    metric = decode(StepMetric, metrics[0].value)
    assert (metric.step, metric.loss, metric.reward, metric.entropy) == (7, 0.5, 1.5, 0.2)
    assert orjson.loads(checkpoints[0].value)["uri"] == "file:///ckpt/500.pt"
    assert {record.key for record in runs + metrics + checkpoints} == {b"run-1"}


def test_non_finite_losses_are_reported_not_refused(
    client: TrainerClient, transport: InMemoryTransport
) -> None:
    client.log_step(1, loss=math.inf, reward=math.nan)
    wire = orjson.loads(transport.records(Topic.METRICS)[0].value)
    assert (wire["loss"], wire["reward"]) == ("Infinity", "NaN")


def test_caller_bugs_raise_at_once(client: TrainerClient) -> None:
    with pytest.raises(InvalidEvent, match="step"):
        client.log_step(-1, loss=1.0, reward=1.0)
    with pytest.raises(InvalidEvent, match="unknown metric"):
        client.log_step(1, loss=1.0, reward=1.0, lossy=2.0)
    with pytest.raises(InvalidEvent, match="algorithm"):
        client.announce(algorithm="Proximal Policy Optimization")


def test_each_command_id_is_handled_once_and_acked(
    client: TrainerClient, transport: InMemoryTransport
) -> None:
    applied: list[Command] = []

    def set_entropy(command: Command) -> dict[str, object]:
        applied.append(command)
        assert isinstance(command, SetEntropyCoef)
        return {"before": {"entropy_coef": 0.01}, "after": {"entropy_coef": command.entropy_coef}}

    client.on_command("set_entropy_coef", set_entropy)
    transport.deliver(Topic.COMMANDS, b"run-1", entropy_command("c-1"))
    transport.deliver(Topic.COMMANDS, b"run-1", entropy_command("c-1"))  # a duplicate
    transport.deliver(Topic.COMMANDS, b"run-2", entropy_command("c-2", run_id="run-2"))
    client.log_step(1, loss=1.0, reward=1.0)
    assert [command.command_id for command in applied] == ["c-1"]
    first, repeat = acks(transport)
    assert first == {
        "command_id": "c-1",
        "run_id": "run-1",
        "status": "applied",
        "detail": "set_entropy_coef applied",
        "ts": first["ts"],
        "before": {"entropy_coef": 0.01},
        "after": {"entropy_coef": 0.005},
        "command_type": "set_entropy_coef",
    }
    # The duplicate is acknowledged again (the first ack may have been lost), not applied.
    assert (repeat["command_id"], repeat["status"]) == ("c-1", "applied")
    assert repeat["detail"] == "set_entropy_coef already handled"


def test_commands_are_rejected_with_a_reason(
    client: TrainerClient, transport: InMemoryTransport
) -> None:
    def refuse(command: Command) -> None:
        raise CommandRejected("paused by operator")

    transport.deliver(Topic.COMMANDS, b"run-1", entropy_command("no-handler"))
    client.poll_commands()
    client.on_command("set_entropy_coef", refuse)
    transport.deliver(Topic.COMMANDS, b"run-1", entropy_command("refused"))
    client.poll_commands()
    client.on_command("set_entropy_coef", lambda command: 1 / 0)  # type: ignore[arg-type,return-value]
    transport.deliver(Topic.COMMANDS, b"run-1", entropy_command("broken"))
    client.poll_commands()
    assert [(ack["status"], ack["detail"]) for ack in acks(transport)] == [
        ("rejected", "no handler for 'set_entropy_coef'"),
        ("rejected", "paused by operator"),
        ("rejected", "handler raised ZeroDivisionError: division by zero"),
    ]


def test_invalid_commands_are_skipped(client: TrainerClient, transport: InMemoryTransport) -> None:
    transport.deliver(Topic.COMMANDS, b"run-1", b'{"type": "set_entropy_coef"}')
    assert client.poll_commands() == 0
    assert acks(transport) == []


def test_a_restarted_client_resumes_after_its_last_handled_command(
    transport: InMemoryTransport,
) -> None:
    first = TrainerClient("run-1", transport=transport)
    first.on_command("set_entropy_coef", lambda command: None)
    transport.deliver(Topic.COMMANDS, b"run-1", entropy_command("c-1"))
    first.poll_commands()
    first.close()
    second = TrainerClient("run-1", transport=transport)
    second.on_command("set_entropy_coef", lambda command: None)
    transport.deliver(Topic.COMMANDS, b"run-1", entropy_command("c-2"))
    assert second.poll_commands() == 1
    assert [ack["command_id"] for ack in acks(transport)] == ["c-1", "c-2"]


def test_an_unreachable_broker_never_blocks_or_raises(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1"),
        sdk=SdkSettings(queue_max_messages=100, close_timeout_s=0.5),
    )
    caplog.set_level(logging.WARNING)
    with TrainerClient("run-1", settings=settings) as client:
        started = time.perf_counter()
        for step in range(1000):
            client.log_step(step, loss=1.0, reward=1.0)
        elapsed = time.perf_counter() - started
    assert client.stats.dropped_queue_full >= 900
    assert client.stats.delivered == 0
    assert "dropping" in caplog.text
    assert elapsed < 5.0  # generous: 1,000 calls must not wait on the network


def test_finish_names_the_last_metric_logged(
    client: TrainerClient, transport: InMemoryTransport
) -> None:
    client.announce()
    client.log_step(40, loss=1.0, reward=1.0)
    client.attempt = 1  # a rollback restored step 30: the run goes on under attempt 1
    client.log_step(31, loss=1.0, reward=1.0)
    client.attempt = 2  # another, with no metric logged since
    client.finish()
    announced, finished = transport.records(Topic.RUNS)  # one topic: in the run's order
    event = decode_run_event(finished.value)
    assert isinstance(event, RunFinished)
    assert (event.run_id, event.attempt, event.step) == ("run-1", 1, 31)
    assert finished.key == b"run-1"
    assert not isinstance(decode_run_event(announced.value), RunFinished)


def test_a_run_that_logged_nothing_finishes_without_a_step(transport: InMemoryTransport) -> None:
    TrainerClient("run-0", transport=transport, attempt=3).finish()
    (finished,) = transport.records(Topic.RUNS)
    assert orjson.loads(finished.value) == {
        "type": "finished",
        "run_id": "run-0",
        "ts": orjson.loads(finished.value)["ts"],
        "attempt": 3,
    }


def test_finish_never_blocks_or_raises_on_an_unreachable_broker() -> None:
    settings = Settings(
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1"),
        sdk=SdkSettings(queue_max_messages=10, close_timeout_s=0.5),
    )
    with TrainerClient("run-1", settings=settings, receive_commands=False) as client:
        for step in range(20):  # the queue is full: the finish is dropped, and counted
            client.log_step(step, loss=1.0, reward=1.0)
        started = time.perf_counter()
        client.finish()
        assert time.perf_counter() - started < 1.0
    assert client.stats.delivered == 0
    assert client.stats.dropped_queue_full >= 11


def test_the_kafka_producer_uses_the_java_partitioner() -> None:
    transport = KafkaTransport(Settings(kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1")))
    assert JAVA_COMPATIBLE_PARTITIONER == "murmur2_random"
    assert transport.close(0) >= 0


def reward_stats(run_id: str, step: int, reward: float, count: int) -> bytes:
    return encode(
        RewardStats(
            run_id=run_id,
            step=step,
            reward=reward,
            normalized_reward=0.5,
            mean=reward / 2,
            std=1.0,
            count=count,
            ts=1.0,
        )
    )


def test_the_newest_reward_stats_of_the_run_are_kept_without_waiting(
    transport: InMemoryTransport, caplog: pytest.LogCaptureFixture
) -> None:
    transport.deliver(Topic.REWARD_STATS, b"run-1", reward_stats("run-1", 0, 5.0, 1))  # before
    client = TrainerClient("run-1", transport=transport, receive_reward_stats=True)
    assert client.reward_stats is None  # read from the end: the history is not
    transport.deliver(Topic.REWARD_STATS, b"run-1", reward_stats("run-1", 1, 1.0, 1))
    transport.deliver(Topic.REWARD_STATS, b"run-1", reward_stats("run-1", 2, 3.0, 2))
    transport.deliver(Topic.REWARD_STATS, b"run-2", reward_stats("run-2", 9, 9.0, 9))
    stats = client.reward_stats
    assert stats is not None
    assert (stats.step, stats.reward, stats.mean, stats.count) == (2, 3.0, 1.5, 2)
    assert client.reward_stats == stats  # kept until newer ones arrive
    transport.deliver(Topic.REWARD_STATS, b"run-1", b'{"run_id": "run-1"}')  # invalid
    assert client.reward_stats == stats
    assert "ignoring invalid reward stats" in caplog.text
    transport.deliver(Topic.REWARD_STATS, b"run-1", reward_stats("run-1", 3, 4.0, 3))
    newest = client.reward_stats
    assert newest is not None
    assert newest.step == 3


def test_reward_stats_are_read_only_when_asked_for(transport: InMemoryTransport) -> None:
    client = TrainerClient("run-1", transport=transport)  # the default: no second reader
    transport.deliver(Topic.REWARD_STATS, b"run-1", reward_stats("run-1", 1, 1.0, 1))
    assert client.reward_stats is None


def test_an_unreachable_broker_never_blocks_the_reward_stats_and_close_stops_the_readers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1"),
        sdk=SdkSettings(close_timeout_s=0.5),
    )
    caplog.set_level(logging.WARNING)
    run_id = "run-stats-unreachable"
    with TrainerClient(run_id, settings=settings, receive_reward_stats=True) as client:
        client.log_step(0, loss=1.0, reward=1.0)
        assert client.reward_stats is None
        readers = [t for t in threading.enumerate() if t.name.endswith(f"-{run_id}")]
        assert len(readers) == 2  # commands and reward stats
    assert not any(reader.is_alive() for reader in readers)  # close() joined both
