"""Checkpoint files of one run: atomic saves, confined and weights-only loads.

A rollback command names a checkpoint by URI. The store loads only files that resolve
(symlinks followed) inside the run's own checkpoint directory, and loads them with
``torch.load(weights_only=True)``, which refuses pickled code. Anything else raises
``CheckpointRejected`` with the reason, which the SDK puts in the command's ack.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import torch

_NAME = re.compile(r"^step-(\d{9,})\.pt$")


class CheckpointRejected(ValueError):
    """A checkpoint reference that the store refuses to load or delete."""


def confine(uri: str, directory: Path) -> Path:
    """The existing path a checkpoint URI (``file:`` or a plain path, relative to
    ``directory``) names, resolved with symlinks followed, if it lies inside ``directory``;
    otherwise ``CheckpointRejected`` with the reason."""
    root = directory.resolve(strict=True)
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        raise CheckpointRejected(f"unsupported checkpoint URI scheme {parsed.scheme!r}")
    raw = Path(unquote(parsed.path) if parsed.scheme == "file" else uri)
    candidate = raw if raw.is_absolute() else directory / raw
    try:
        resolved = candidate.resolve(strict=True)
    except (FileNotFoundError, RuntimeError) as exc:
        raise CheckpointRejected(f"checkpoint {uri!r} does not exist ({exc})") from None
    if not resolved.is_relative_to(root):
        raise CheckpointRejected(f"checkpoint {uri!r} resolves outside the run's directory {root}")
    return resolved


class CheckpointStore:
    """``<directory>/step-<step>.pt`` files for one run."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path_for(self, step: int) -> Path:
        return self.directory / f"step-{step:09d}.pt"

    def uri_for(self, step: int) -> str:
        return self.path_for(step).resolve().as_uri()

    def save(self, step: int, state: dict[str, Any]) -> str:
        """Write atomically (temp file, fsync, rename): no half-written file is ever visible."""
        target = self.path_for(step)
        descriptor, temp_name = tempfile.mkstemp(dir=self.directory, prefix=".saving-")
        try:
            with os.fdopen(descriptor, "wb") as temp:
                torch.save(state, temp)
                temp.flush()
                os.fsync(temp.fileno())
            os.replace(temp_name, target)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise
        directory_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory_fd)  # the rename itself survives a power cut
        finally:
            os.close(directory_fd)
        return self.uri_for(step)

    def resolve(self, uri: str) -> Path:
        """The file a URI names, if it is a checkpoint inside this run's directory."""
        resolved = confine(uri, self.directory)
        if not resolved.is_file() or not _NAME.match(resolved.name):
            raise CheckpointRejected(f"{uri!r} is not a checkpoint file of this store")
        return resolved

    def load(self, uri: str) -> dict[str, Any]:
        path = self.resolve(uri)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling refused, truncated file, ...
            raise CheckpointRejected(f"checkpoint {uri!r} could not be loaded: {exc}") from None
        if not isinstance(state, dict):
            raise CheckpointRejected(f"checkpoint {uri!r} does not hold a state dict")
        return state

    def delete(self, uri: str) -> bool:
        try:
            path = self.resolve(uri)
        except CheckpointRejected:
            return False
        path.unlink(missing_ok=True)
        return True

    def steps(self) -> list[int]:
        return sorted(
            int(match.group(1))
            for path in self.directory.iterdir()
            if (match := _NAME.match(path.name))
        )
