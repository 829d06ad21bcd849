"""Checkpoint files: atomic, confined to the run's directory, loaded weights-only."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from producers.checkpoints import CheckpointRejected, CheckpointStore


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "run-1")


def test_save_and_load_round_trip(store: CheckpointStore) -> None:
    weights = torch.randn(3, 4)
    uri = store.save(500, {"model": {"w": weights}, "step": 500})
    assert uri.startswith("file://")
    loaded = store.load(uri)
    assert torch.equal(loaded["model"]["w"], weights)
    assert store.steps() == [500]
    assert store.load("step-000000500.pt")["step"] == 500  # relative to the directory


def test_saves_leave_no_partial_files(store: CheckpointStore) -> None:
    class Unsaveable:
        def __reduce__(self) -> tuple[object, ...]:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        store.save(1000, {"bad": Unsaveable()})
    assert list(store.directory.iterdir()) == []


@pytest.mark.parametrize(
    "reference",
    ["../other-run/step-000000500.pt", "/etc/passwd", "file:///etc/passwd", "s3://bucket/x.pt"],
)
def test_references_outside_the_run_directory_are_rejected(
    store: CheckpointStore, reference: str
) -> None:
    other = store.directory.parent / "other-run"
    other.mkdir()
    torch.save({"step": 500}, other / "step-000000500.pt")
    with pytest.raises(CheckpointRejected) as rejected:
        store.load(reference)
    assert any(
        words in str(rejected.value)
        for words in ("outside the run's directory", "does not exist", "scheme")
    )


def test_a_symlink_out_of_the_directory_is_rejected(store: CheckpointStore, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.pt"
    torch.save({"step": 1}, outside)
    os.symlink(outside, store.directory / "step-000000001.pt")
    with pytest.raises(CheckpointRejected, match="outside the run's directory"):
        store.load("step-000000001.pt")


def test_pickled_code_is_refused(store: CheckpointStore) -> None:
    class Exploit:
        def __reduce__(self) -> tuple[object, ...]:
            return (os.system, ("echo pwned",))

    with (store.directory / "step-000000002.pt").open("wb") as file:
        pickle.dump({"model": Exploit()}, file)
    with pytest.raises(CheckpointRejected, match="could not be loaded"):
        store.load("step-000000002.pt")


def test_delete_is_confined_too(store: CheckpointStore, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    assert not store.delete(str(victim))
    assert victim.exists()
    uri = store.save(7, {"step": 7})
    assert store.delete(uri)
    assert store.steps() == []
