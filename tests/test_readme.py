"""The README is the front door: short, two commands, and every Python example runs.

Its examples run as the pages of docs/ do (tests/test_docs.py, which also checks the links,
paths and commands of both).
"""

from __future__ import annotations

import os
import re

import pytest

from tests.helpers.markdown import README, ROOT, CodeBlock, code_blocks, run_example

MAX_LINES = 200
EXAMPLES = code_blocks(README, "python")


def test_the_readme_is_read_in_five_minutes() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines; at most {MAX_LINES}"


def test_two_commands_set_up_and_run_everything() -> None:
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Two commands\n", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    assert [command.strip() for command in commands] == ["./scripts/demo", "./scripts/test"]
    for command in commands:
        script = ROOT / command.strip()
        assert script.is_file(), script
        assert os.access(script, os.X_OK), f"{script} is not executable"


def test_the_readme_has_examples() -> None:
    assert EXAMPLES


@pytest.mark.integration
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda example: example.name)
def test_readme_example_runs(
    example: CodeBlock, kafka_bootstrap: str, topic_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_example(example, kafka_bootstrap, topic_prefix, monkeypatch)
