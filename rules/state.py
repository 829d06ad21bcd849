"""How the rules' states are stored: JSON values under a version marker.

Each rule's ``to_state`` returns a JSON value (the worker writes it, with orjson, to its
table's changelog) that carries ``"version"``, and its ``from_state`` reads exactly the
versions it names: a state of any other version is refused, never misread. A version
changes only with the stored shape; a reader keeps accepting every shape its version was
written in (``tests/test_rules/test_stored_states.py`` holds stored states to prove it).

A position ``(attempt, step)`` is stored as ``[attempt, step]``, or null for none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rules import Position


def check_version(state: Mapping[str, Any], version: int, what: str) -> None:
    """Refuse a stored ``what`` state unless it is of ``version``."""
    if state.get("version") != version:
        raise ValueError(f"unknown {what} state version {state.get('version')!r}")


def position_to_state(position: Position | None) -> list[int] | None:
    return None if position is None else [position[0], position[1]]


def position_from_state(stored: Sequence[Any] | None) -> Position | None:
    return None if stored is None else (int(stored[0]), int(stored[1]))
