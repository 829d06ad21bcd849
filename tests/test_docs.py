"""The pages of docs/ and the README hold together: every Python example runs, every
relative link reaches a file (and its heading), every repository path and test they name
exists, and every ``fragrance-ops`` command they show parses. The configuration reference
is checked against the settings in tests/test_fragrance_ops/test_settings_reference.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fragrance_ops import cli as cli_module
from fragrance_ops.kafka import CLIENT_LOGGER
from tests.helpers.markdown import (
    DOCS,
    README,
    ROOT,
    CodeBlock,
    anchors,
    cli_invocations,
    code_blocks,
    documents,
    links,
    repository_paths,
    run_example,
)

DOCUMENTS = documents()
PAGES = [page for page in DOCUMENTS if page != README]
EXAMPLES = [block for page in PAGES for block in code_blocks(page, "python")]


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_every_page_is_reachable_from_the_readme() -> None:
    linked = {(README.parent / link.target.split("#")[0]).resolve() for link in links(README)}
    assert PAGES
    assert [_name(page) for page in PAGES if page.resolve() not in linked] == []


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_every_relative_link_resolves(document: Path) -> None:
    broken = []
    for link in links(document):
        if "://" in link.target or link.target.startswith("mailto:"):
            continue
        file, _, anchor = link.target.partition("#")
        target = (document.parent / file).resolve() if file else document
        where = f"{_name(document)}:{link.line}: {link.target}"
        if not target.exists():
            broken.append(f"{where}: no such file")
        elif anchor and (target.suffix != ".md" or anchor not in anchors(target)):
            broken.append(f"{where}: no such heading")
    assert broken == []


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_every_repository_path_named_exists(document: Path) -> None:
    missing = []
    for line, path, test in repository_paths(document):
        file = ROOT / path
        if not file.exists():
            missing.append(f"{_name(document)}:{line}: {path}")
        elif test and f"def {test}(" not in file.read_text(encoding="utf-8"):
            missing.append(f"{_name(document)}:{line}: {path}::{test}")
    assert missing == []


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_every_command_shown_parses(document: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI's callback switches client logging and tracebacks; put them back afterwards.
    monkeypatch.setattr(CLIENT_LOGGER, "disabled", CLIENT_LOGGER.disabled)
    monkeypatch.setattr(cli_module, "_show_tracebacks", cli_module._show_tracebacks)
    runner = CliRunner()
    failed = []
    for line, arguments in cli_invocations(document):
        result = runner.invoke(cli_module.cli, [*arguments, "--help"])
        if result.exit_code != 0:
            failed.append(f"{_name(document)}:{line}: fragrance-ops {' '.join(arguments)}")
    assert failed == []


def test_the_pages_have_examples() -> None:
    assert EXAMPLES
    assert DOCS.is_dir()


@pytest.mark.integration
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda example: example.name)
def test_docs_example_runs(
    example: CodeBlock, kafka_bootstrap: str, topic_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_example(example, kafka_bootstrap, topic_prefix, monkeypatch)
