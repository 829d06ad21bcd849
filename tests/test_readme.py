"""Every Python example in the README runs, against the session's broker."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from schemas import Topic, topic_name
from tests.helpers.kafka import consume_all

README = Path(__file__).parent.parent / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_has_examples() -> None:
    assert EXAMPLES


@pytest.mark.integration
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda source: source.splitlines()[0][:40])
def test_readme_example_runs(
    example: str, kafka_bootstrap: str, topic_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("FRAGRANCE_OPS_KAFKA__TOPIC_PREFIX", topic_prefix)
    exec(compile(example, str(README), "exec"), {})
    if "log_step" in example:
        metrics = consume_all(kafka_bootstrap, topic_name(Topic.METRICS, topic_prefix), 100)
        assert {message.key() for message in metrics} == {b"ppo-run-42"}
