"""A durable record of the command ids a trainer has handled, and how.

The command reader commits its offset after a command is handled, so a trainer that dies
between applying a command and that commit sees the command again after a restart. Ids
listed here are acknowledged again (with the status they got) but not applied again. An
id is appended (and fsynced) after its handler returns and before the offset commit and
the ack, so:

- died before the append: the effect lived only in the dead process's memory (a restored
  model, a new entropy value), so applying the command again after restart is right;
- died after the append: the command is skipped and acknowledged again, in case the first
  ack never left the process.

The file keeps the newest ``max_ids`` ids (rewritten atomically when it grows past twice
that), one ``<command id> <status>`` per line.
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Literal, cast

DEFAULT_MAX_IDS = 10_000


Status = Literal["applied", "rejected"]


class AppliedCommands:
    """Command ids already handled and their status, in memory and optionally in a file."""

    def __init__(self, path: Path | str | None = None, *, max_ids: int = DEFAULT_MAX_IDS) -> None:
        self.path = Path(path) if path is not None else None
        self.max_ids = max_ids
        self._ids: OrderedDict[str, Status] = OrderedDict()
        self._lines = 0
        if self.path is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                command_id, _, status = line.partition(" ")
                if status in ("applied", "rejected"):  # a torn last line is an unknown id
                    self._remember(command_id, cast(Status, status))
                    self._lines += 1

    def __contains__(self, command_id: object) -> bool:
        return command_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def items(self) -> list[tuple[str, Status]]:
        return list(self._ids.items())

    def status(self, command_id: str) -> Status | None:
        return self._ids.get(command_id)

    def _remember(self, command_id: str, status: Status) -> None:
        self._ids[command_id] = status
        self._ids.move_to_end(command_id)
        while len(self._ids) > self.max_ids:
            self._ids.popitem(last=False)

    def add(self, command_id: str, status: Status) -> None:
        self._remember(command_id, status)
        if self.path is None:
            return
        with self.path.open("a", encoding="utf-8") as log:
            log.write(f"{command_id} {status}\n")
            log.flush()
            os.fsync(log.fileno())
        self._lines += 1
        if self._lines > 2 * self.max_ids:
            self._compact(self.path)

    def _compact(self, path: Path) -> None:
        descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=".applied-")
        with os.fdopen(descriptor, "w", encoding="utf-8") as temp:
            temp.write("".join(f"{id_} {status}\n" for id_, status in self._ids.items()))
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp_name, path)
        self._lines = len(self._ids)
