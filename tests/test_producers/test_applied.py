"""The durable applied-commands log: a restarted trainer never applies a command twice."""

from __future__ import annotations

from pathlib import Path

import orjson

from config.settings import Settings
from producers import InMemoryTransport, TrainerClient
from producers.applied import AppliedCommands
from schemas import Command, SetEntropyCoef, Topic, encode


def entropy_command(command_id: str) -> bytes:
    return encode(
        SetEntropyCoef(
            command_id=command_id, run_id="run-1", issued_at=1.0, entropy_coef=0.005, step=3
        )
    )


def test_ids_and_statuses_survive_a_reload_and_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "applied.log"
    log = AppliedCommands(path)
    log.add("a", "applied")
    log.add("b", "rejected")
    with path.open("a", encoding="utf-8") as file:
        file.write("c appl")  # the process died in the middle of this write
    reloaded = AppliedCommands(path)
    assert (reloaded.status("a"), reloaded.status("b"), reloaded.status("c")) == (
        "applied",
        "rejected",
        None,
    )


def test_the_log_keeps_the_newest_ids_and_compacts(tmp_path: Path) -> None:
    path = tmp_path / "applied.log"
    log = AppliedCommands(path, max_ids=3)
    for index in range(10):
        log.add(f"id-{index}", "applied")
    assert len(log) == 3
    assert "id-6" not in log
    assert "id-9" in log
    assert len(path.read_text().splitlines()) <= 6
    assert AppliedCommands(path, max_ids=3).status("id-7") == "applied"


def test_a_trainer_restarted_before_its_offset_commit_does_not_apply_again(
    tmp_path: Path,
) -> None:
    transport = InMemoryTransport()
    path = tmp_path / "applied.log"
    applied: list[Command] = []

    def start() -> TrainerClient:
        client = TrainerClient("run-1", settings=Settings(), transport=transport, applied_log=path)
        client.on_command("set_entropy_coef", lambda command: applied.append(command))
        return client

    transport.deliver(Topic.COMMANDS, b"run-1", entropy_command("c-1"))
    first = start()
    first.poll_commands()
    # Simulate the crash window: the handler ran, the id was logged, the commit was lost.
    transport._committed.clear()
    second = start()
    second.poll_commands()
    assert [command.command_id for command in applied] == ["c-1"]
    acks = [orjson.loads(record.value) for record in transport.records(Topic.ACKS)]
    assert [(ack["command_id"], ack["status"]) for ack in acks] == [
        ("c-1", "applied"),
        ("c-1", "applied"),
    ]
    assert acks[1]["detail"] == "set_entropy_coef already handled"
