"""The README is the front door: short, two commands, and every Python example runs.

Its examples run as the pages of docs/ do (tests/test_docs.py, which also checks the links,
paths, commands and code blocks of both).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.markdown import README, ROOT, CodeBlock, code_blocks, run_example
from tests.test_fragrance_ops.test_cli import MILESTONES

MAX_LINES = 200
TEXT = README.read_text(encoding="utf-8")
LINES = TEXT.splitlines()
EXAMPLES = code_blocks(README, "python")


def section(title: str) -> tuple[int, int]:
    """The lines (1-based, first and past the last) of the README's section ``## title``."""
    start = LINES.index(f"## {title}") + 1
    ends = [number for number, line in enumerate(LINES, 1) if number > start and line[:3] == "## "]
    return start, (ends[0] if ends else len(LINES) + 1)


def blocks_in(title: str) -> list[CodeBlock]:
    start, end = section(title)
    return [block for block in code_blocks(README) if start < block.line < end]


def test_the_readme_is_read_in_five_minutes() -> None:
    assert len(LINES) <= MAX_LINES, f"README.md has {len(LINES)} lines; at most {MAX_LINES}"


def test_two_commands_set_up_and_run_everything() -> None:
    commands = [block for block in blocks_in("Two commands") if block.language != "text"]
    assert [(block.language, block.source) for block in commands] == [
        ("bash", "./scripts/demo\n"),
        ("bash", "./scripts/test\n"),
    ]
    # and no other shell step anywhere in the README
    assert [block for block in code_blocks(README, "bash") if block not in commands] == []
    for command in commands:
        script = ROOT / command.source.strip()
        assert script.is_file(), script
        assert os.access(script, os.X_OK), f"{script} is not executable"


def test_the_demo_output_shown_holds_every_milestone_the_demo_is_tested_for() -> None:
    (output,) = (block for block in blocks_in("Two commands") if block.language == "text")
    shown = output.source
    assert [milestone for milestone in MILESTONES if milestone not in shown] == []


def test_the_sdk_in_a_screenful_shows_the_trainer_the_llm_and_the_rating_clients() -> None:
    sources = "".join(block.source for block in blocks_in("The SDK in a screenful"))
    for client in ("TrainerClient(", "LlmClient(", "RatingClient("):
        assert client in sources, client


def test_the_readme_has_examples() -> None:
    assert EXAMPLES


@pytest.mark.integration
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda example: example.name)
def test_readme_example_runs(
    example: CodeBlock,
    kafka_bootstrap: str,
    topic_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    run_example(example, kafka_bootstrap, topic_prefix, monkeypatch, tmp_path)
