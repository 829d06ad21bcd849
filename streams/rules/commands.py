"""Deterministic command ids: the same decision, replayed, gets the same id.

The worker processes events at least once, so after a crash it may decide the same thing
again; the trainer SDK applies each ``command_id`` once. An id is therefore derived only
from what identifies the decision, never from time or randomness:
``uuid5(COMMAND_NAMESPACE, '["<run_id>","<type>",<part>,...]')`` (a JSON array, so no run id
or part can make two different decisions collide).

Which parts each command type uses (the helpers below fix the order):

- ``rollback``: attempt, first step of the anomalous streak. One rollback per streak per
  attempt, however many anomalous metrics the streak has or how often they are replayed.
- ``set_entropy_coef``: attempt, step; plus ``"retune"`` when a retune caused it, so a
  retuned value sent at the step where the schedule already sent one is not dropped by the
  SDK as a duplicate.
- ``retune``: the ratings window's id.
- ``halt``: attempt, step (the anomaly step that exhausted the rollback budget).
- ``prune_checkpoints``: the step of the checkpoint whose arrival caused it.

Changing ``COMMAND_NAMESPACE`` or the encoding changes every id: never do it while runs are
live (a replay after an upgrade would then yield a second, distinct command).
"""

from __future__ import annotations

import json
import uuid

COMMAND_NAMESPACE = uuid.UUID("1ebbc34f-04d7-5be4-9537-54c7432613ef")
COMMAND_TYPES = frozenset({"set_entropy_coef", "rollback", "retune", "halt", "prune_checkpoints"})


def command_id(run_id: str, command_type: str, *parts: str | int) -> str:
    """The id of a command, from the parts that identify the decision."""
    if command_type not in COMMAND_TYPES:
        raise ValueError(f"unknown command type {command_type!r}")
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, str | int):
            raise TypeError(f"command id parts are str or int, got {part!r}")
    name = json.dumps([run_id, command_type, *parts], ensure_ascii=False, separators=(",", ":"))
    return str(uuid.uuid5(COMMAND_NAMESPACE, name))


def rollback_command_id(run_id: str, *, attempt: int, streak_start: int) -> str:
    return command_id(run_id, "rollback", attempt, streak_start)


def entropy_command_id(run_id: str, *, attempt: int, step: int, retune: bool = False) -> str:
    if retune:
        return command_id(run_id, "set_entropy_coef", attempt, step, "retune")
    return command_id(run_id, "set_entropy_coef", attempt, step)


def retune_command_id(run_id: str, *, window_id: str | int) -> str:
    return command_id(run_id, "retune", window_id)


def halt_command_id(run_id: str, *, attempt: int, step: int) -> str:
    return command_id(run_id, "halt", attempt, step)


def prune_command_id(run_id: str, *, checkpoint_step: int) -> str:
    return command_id(run_id, "prune_checkpoints", checkpoint_step)
