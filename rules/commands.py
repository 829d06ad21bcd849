"""Deterministic command ids: the same decision, replayed, gets the same id.

The worker processes events at least once, so after a crash it may decide the same thing
again; the trainer SDK applies each ``command_id`` once. An id is therefore derived only
from what identifies the decision, never from time or randomness:
``uuid5(COMMAND_NAMESPACE, '["<run_id>","<type>",<part>,...]')`` (a JSON array, so no run id
or part can make two different decisions collide).

Which parts each command type uses (the helpers below fix the order):

- ``rollback``: attempt, first step of the anomalous streak. One rollback per streak per
  attempt, however many anomalous metrics the streak has or how often they are replayed.
- ``set_entropy_coef``: attempt, step; or, when an applied retune caused it, ``"retune"``
  and the retune's own command id (one value per retune, however its ack is replayed, and
  never mistaken by the SDK for the schedule's value at the same step).
- ``retune``: the ratings window's id.
- ``halt``: attempt, step (the anomaly step that exhausted the rollback budget).
- ``prune_checkpoints``: attempt, the step of the checkpoint whose arrival caused it.
- a command an operator asked for (``halt``, ``rollback``, ``set_entropy_coef``):
  ``"request"`` and the request's own id (one command per request, however often read).

Changing ``COMMAND_NAMESPACE`` or the encoding changes every id: never do it while runs are
live (a replay after an upgrade would then yield a second, distinct command).
"""

from __future__ import annotations

import json
import uuid
from typing import get_args

from schemas.events import CommandType

COMMAND_NAMESPACE = uuid.UUID("1ebbc34f-04d7-5be4-9537-54c7432613ef")


def command_id(run_id: str, command_type: CommandType, *parts: str | int) -> str:
    """The id of a command, from the parts that identify the decision."""
    if command_type not in get_args(CommandType):
        raise ValueError(f"unknown command type {command_type!r}")
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, str | int):
            raise TypeError(f"command id parts are str or int, got {part!r}")
    name = json.dumps([run_id, command_type, *parts], ensure_ascii=False, separators=(",", ":"))
    return str(uuid.uuid5(COMMAND_NAMESPACE, name))


def rollback_command_id(run_id: str, *, attempt: int, streak_start: int) -> str:
    return command_id(run_id, "rollback", attempt, streak_start)


def entropy_command_id(run_id: str, *, attempt: int, step: int) -> str:
    return command_id(run_id, "set_entropy_coef", attempt, step)


def retuned_entropy_command_id(run_id: str, *, retune_command_id: str) -> str:
    return command_id(run_id, "set_entropy_coef", "retune", retune_command_id)


def retune_command_id(run_id: str, *, window_id: str | int) -> str:
    return command_id(run_id, "retune", window_id)


def halt_command_id(run_id: str, *, attempt: int, step: int) -> str:
    return command_id(run_id, "halt", attempt, step)


def prune_command_id(run_id: str, *, attempt: int, checkpoint_step: int) -> str:
    # With the attempt: after a rollback the run saves the same steps again, and each
    # save's prune is a decision of its own, which the trainer must not take for a
    # duplicate of the first (it applies each id once).
    return command_id(run_id, "prune_checkpoints", attempt, checkpoint_step)


def operator_command_id(run_id: str, command_type: CommandType, *, request_id: str) -> str:
    return command_id(run_id, command_type, "request", request_id)
