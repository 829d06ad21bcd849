"""The pages of docs/ and the README hold together: every Python example runs, every other
code block is checked or marked as text, every relative link reaches a file (and its
heading), every repository path and test they name exists, every ``fragrance-ops`` command
they show parses, every option they pass to a repository script is one it defines, and every
``FRAGRANCE_OPS_*`` variable they name is read. The configuration reference is checked
against the settings in tests/test_fragrance_ops/test_settings_reference.py.

Each check is a function listing what is wrong; the last tests run them on a page made wrong
on purpose, so none of them can pass by finding nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from config.kafka import CLIENT_LOGGER
from config.settings import CONFIG_FILE_ENV
from fragrance_ops import cli as cli_module
from fragrance_ops.settings_reference import groups
from tests.helpers.brokers import CHOICE_ENV
from tests.helpers.markdown import (
    DOCS,
    README,
    ROOT,
    CodeBlock,
    anchors,
    cli_invocations,
    code_blocks,
    documents,
    environment_variables,
    links,
    repository_paths,
    run_example,
    script_options,
)

DOCUMENTS = documents()
PAGES = [page for page in DOCUMENTS if page != README]
EXAMPLES = [block for page in PAGES for block in code_blocks(page, "python")]

# What is done with each language of fenced block; a block of any other language (or none)
# would go unchecked, so it fails test_every_code_block_is_run_or_checked.
BLOCK_LANGUAGES = {
    "python": "run against the session's broker",
    "bash": "repository paths, fragrance-ops commands, script options and variables checked",
    "text": "output or a picture, not code",
}
# FRAGRANCE_OPS_* variables the documents name that are not settings.
OTHER_VARIABLES = {
    CONFIG_FILE_ENV: "config/settings.py",
    CHOICE_ENV: "tests/helpers/brokers.py",
    "FRAGRANCE_OPS_FAULTS": "tests/test_faults/support.py",
    "FRAGRANCE_OPS_FAULTS_SEED": "tests/test_faults/support.py",
}


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def unchecked_blocks(document: Path) -> list[str]:
    return [
        f"{_name(block.path)}:{block.line}: ```{block.language}"
        for block in code_blocks(document)
        if block.language not in BLOCK_LANGUAGES
    ]


def broken_links(document: Path) -> list[str]:
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
    return broken


def missing_paths(document: Path) -> list[str]:
    missing = []
    for line, path, test in repository_paths(document):
        file = ROOT / path
        if not file.exists():
            missing.append(f"{_name(document)}:{line}: {path}")
        elif test and f"def {test}(" not in file.read_text(encoding="utf-8"):
            missing.append(f"{_name(document)}:{line}: {path}::{test}")
    return missing


def failing_commands(document: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Commands shown that the CLI refuses with ``--help`` appended: unknown commands and
    unknown options (``--help`` stops before argument counts and values are checked)."""
    # The CLI's callback switches client logging and tracebacks; put them back afterwards.
    monkeypatch.setattr(CLIENT_LOGGER, "disabled", CLIENT_LOGGER.disabled)
    monkeypatch.setattr(cli_module, "_show_tracebacks", cli_module._show_tracebacks)
    runner = CliRunner()
    failed = []
    for line, arguments in cli_invocations(document):
        result = runner.invoke(cli_module.cli, [*arguments, "--help"])
        if result.exit_code != 0:
            failed.append(f"{_name(document)}:{line}: fragrance-ops {' '.join(arguments)}")
    return failed


def unknown_script_options(document: Path) -> list[str]:
    """Options passed to a repository script that neither it nor a module beside it (the
    benchmarks' shared harness) defines as a string."""
    unknown = []
    for line, script, option in script_options(document):
        file = ROOT / script
        if not file.is_file():
            unknown.append(f"{_name(document)}:{line}: {script}: no such script")
            continue
        sources = [file, *(sorted(file.parent.glob("*.py")) if file.parent != ROOT else [])]
        if not any(f'"{option}"' in source.read_text(encoding="utf-8") for source in sources):
            unknown.append(f"{_name(document)}:{line}: {script} {option}")
    return unknown


def _setting_variables() -> tuple[set[str], set[str]]:
    """Every setting's variables, and every group's prefix (``FRAGRANCE_OPS_KAFKA__``)."""
    names: set[str] = set()
    prefixes: set[str] = set()
    for group in groups():
        prefixes.add(f"FRAGRANCE_OPS_{group.name.upper()}__")
        for setting in group.settings:
            names.update(setting.env)
    return names, prefixes


def unknown_variables(document: Path) -> list[str]:
    names, prefixes = _setting_variables()
    known = names | prefixes | set(OTHER_VARIABLES)
    return [
        f"{_name(document)}:{line}: {name}"
        for line, name in environment_variables(document)
        if name not in known
    ]


def test_every_page_is_reachable_from_the_readme() -> None:
    linked = {(README.parent / link.target.split("#")[0]).resolve() for link in links(README)}
    assert PAGES
    assert [_name(page) for page in PAGES if page.resolve() not in linked] == []


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_every_code_block_is_run_or_checked(document: Path) -> None:
    assert unchecked_blocks(document) == []


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_every_relative_link_resolves(document: Path) -> None:
    assert broken_links(document) == []


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_every_repository_path_named_exists(document: Path) -> None:
    assert missing_paths(document) == []


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_every_command_shown_parses(document: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert failing_commands(document, monkeypatch) == []


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_every_option_passed_to_a_script_is_defined(document: Path) -> None:
    assert unknown_script_options(document) == []


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_every_variable_named_is_read(document: Path) -> None:
    assert unknown_variables(document) == []


def test_the_variables_that_are_not_settings_are_read_where_listed() -> None:
    for name, module in OTHER_VARIABLES.items():
        assert f'"{name}"' in (ROOT / module).read_text(encoding="utf-8"), (name, module)


def test_the_pages_have_examples() -> None:
    assert EXAMPLES
    assert DOCS.is_dir()


@pytest.mark.integration
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda example: example.name)
def test_docs_example_runs(
    example: CodeBlock,
    kafka_bootstrap: str,
    topic_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    run_example(example, kafka_bootstrap, topic_prefix, monkeypatch, tmp_path)


# The checks above, on a page made wrong on purpose: each finds exactly what is wrong.

WRONG_PAGE = """\
# A page

## Its section

[fine](#its-section), [fine too](../README.md#two-commands), [no file](nowhere.md),
[no heading](#nowhere), [no heading there](../README.md#nowhere).

`tests/test_docs.py`, `tests/test_docs.py::test_the_pages_have_examples`, `tests/nowhere.py`,
`tests/test_docs.py::test_nowhere`.

`fragrance-ops status [--json]`, `fragrance-ops run halt|stop RUN_ID --reason WHY`.

`FRAGRANCE_OPS_REWARD__WINDOW_SIZE`, `FRAGRANCE_OPS_KAFKA__<NAME>`, `FRAGRANCE_OPS_CONFIG`,
`FRAGRANCE_OPS_REWARD__WINDOWSIZE`.

```bash
fragrance-ops settings
fragrance-ops settings --verbose
python benchmarks/outcome.py --steps 100   # --seeds 1, --sedes 2
python benchmarks/nowhere.py --steps 100
```

```text
output
```

```
untagged
```

```sh
echo unchecked
```
"""


@pytest.fixture
def wrong_page(tmp_path: Path) -> Path:
    page = tmp_path / "docs" / "page.md"  # beside a README, as the pages are
    page.parent.mkdir()
    page.write_text(WRONG_PAGE, encoding="utf-8")
    (tmp_path / "README.md").write_text(README.read_text(encoding="utf-8"), encoding="utf-8")
    return page


def test_the_checks_find_each_unchecked_block(wrong_page: Path) -> None:
    assert unchecked_blocks(wrong_page) == ["page.md:27: ```", "page.md:31: ```sh"]


def test_the_checks_find_each_broken_link(wrong_page: Path) -> None:
    assert broken_links(wrong_page) == [
        "page.md:5: nowhere.md: no such file",
        "page.md:6: #nowhere: no such heading",
        "page.md:6: ../README.md#nowhere: no such heading",
    ]


def test_the_checks_find_each_missing_path_and_test(wrong_page: Path) -> None:
    assert missing_paths(wrong_page) == [
        "page.md:8: tests/nowhere.py",
        "page.md:9: tests/test_docs.py::test_nowhere",
        "page.md:20: benchmarks/nowhere.py",
    ]


def test_the_checks_find_each_command_that_does_not_parse(
    wrong_page: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert failing_commands(wrong_page, monkeypatch) == [
        "page.md:18: fragrance-ops settings --verbose",
        "page.md:11: fragrance-ops run stop RUN_ID --reason WHY",
    ]


def test_the_checks_find_each_unknown_script_option(wrong_page: Path) -> None:
    assert unknown_script_options(wrong_page) == [
        "page.md:19: benchmarks/outcome.py --sedes",
        "page.md:20: benchmarks/nowhere.py: no such script",
    ]


def test_the_checks_find_each_unknown_variable(wrong_page: Path) -> None:
    assert unknown_variables(wrong_page) == ["page.md:14: FRAGRANCE_OPS_REWARD__WINDOWSIZE"]


def test_a_fence_the_parser_would_not_read_is_an_error(tmp_path: Path) -> None:
    for opening, closing in (("  ```python", "  ```"), ("~~~python", "~~~")):
        page = tmp_path / "page.md"
        page.write_text(f"# Page\n\n- an item:\n\n{opening}\n  print('never run')\n{closing}\n")
        with pytest.raises(AssertionError, match=r"page\.md:5: a fence this parser does not read"):
            code_blocks(page)
