"""The project's Markdown (README.md and docs/*.md): code blocks, links, headings, commands.

Only what these documents use is parsed: fenced blocks opened by a line starting with three
backticks, ATX headings (``#`` to ``######``) outside fences, inline links and images, and
code spans. A fence this parser would not see (indented, or of tildes) is an error, so no
block goes unchecked unnoticed. Anchors are GitHub's: the heading's text without markup,
lower case, without punctuation other than ``-`` and ``_``, spaces as ``-``, and ``-1``,
``-2``, ... for repeats.
"""

from __future__ import annotations

import re
import shlex
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import CodeType

import pytest

from schemas import Topic, topic_name
from tests.helpers.kafka import consume_all

ROOT = Path(__file__).parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def documents() -> list[Path]:
    """README.md, then every page of docs/, by name."""
    return [README, *sorted(DOCS.glob("*.md"))]


@dataclass(frozen=True)
class CodeBlock:
    """A fenced code block: its document, the line of its opening fence, language, text."""

    path: Path
    line: int  # 1-based, of the opening fence; the source starts on the next line
    language: str
    source: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    def compiled(self) -> CodeType:
        """The source compiled so that tracebacks name the document and its line numbers."""
        return compile("\n" * self.line + self.source, str(self.path), "exec")


@dataclass(frozen=True)
class Link:
    """An inline link or image of a document: its target and the line it is on."""

    path: Path
    line: int
    target: str


_FENCE = re.compile(r"^```(\S*)")
_UNREAD_FENCE = re.compile(r"^(?:[ \t]+```|[ \t]*~~~)")
_HEADING = re.compile(r"^(#{1,6}) +(.+?) *#* *$")
_CODE_SPAN = re.compile(r"(`+)((?:(?!\n[ \t]*\n).)+?)\1", re.DOTALL)  # within a paragraph
_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(([^)\s]+)(?: \"[^\"]*\")?\)")
_REPO_PATH = re.compile(
    r"^(?:\./)?((?:tests|producers|rules|streams|schemas|config|fragrance_ops|deploy|benchmarks|"
    r"scripts|docs)/[\w./-]*)(?:::(\w+))?$"
)


def code_blocks(path: Path, language: str | None = None) -> list[CodeBlock]:
    """The fenced blocks of ``path``, in order; only those of ``language`` if given."""
    blocks: list[CodeBlock] = []
    opened: tuple[int, str] | None = None
    body: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fence = _FENCE.match(line)
        if opened is None:
            if _UNREAD_FENCE.match(line):
                raise AssertionError(
                    f"{path}:{number}: a fence this parser does not read (indented or ~~~); "
                    "start code blocks with ``` at the start of the line"
                )
            if fence:
                opened, body = (number, fence.group(1)), []
        elif fence and not fence.group(1):
            blocks.append(CodeBlock(path, opened[0], opened[1], "".join(body)))
            opened = None
        else:
            body.append(line + "\n")
    if opened is not None:
        raise AssertionError(f"{path}:{opened[0]}: code block never closed")
    return [block for block in blocks if language is None or block.language == language]


def prose(path: Path) -> str:
    """The text of ``path`` with every fenced block's lines (fences included) left blank, so
    offsets still give line numbers and a block still ends a paragraph."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        fence = bool(_FENCE.match(line))
        lines.append("" if fenced or fence else line)
        if fence:
            fenced = not fenced
    return "\n".join(lines) + "\n"


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def code_spans(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every code span outside fenced blocks; a span may run over
    lines (its text then has single spaces for the line breaks)."""
    text = prose(path)
    for span in _CODE_SPAN.finditer(text):
        yield _line(text, span.start()), " ".join(span.group(2).split())


def links(path: Path) -> list[Link]:
    """Every inline link and image outside fenced blocks and code spans."""
    text = _CODE_SPAN.sub(lambda span: re.sub(r"[^\n]", " ", span.group()), prose(path))
    return [Link(path, _line(text, link.start()), link.group(1)) for link in _LINK.finditer(text)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = _CODE_SPAN.sub(lambda span: span.group(2), heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link: its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of every heading of ``path``."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose(path).splitlines():
        heading = _HEADING.match(line)
        if heading:
            base = slug(heading.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def repository_paths(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, path, test name or None) of every repository path the document names: in code
    spans, or as a word of a shell block (``tests/x.py::test_y`` names a test)."""
    candidates = list(code_spans(path))
    for block in code_blocks(path, "bash"):
        for offset, line in enumerate(block.source.splitlines(), start=1):
            candidates += [(block.line + offset, word) for word in line.split()]
    found = []
    for number, text in candidates:
        match = _REPO_PATH.match(text)
        if match and not any(mark in text for mark in "<>*{}"):
            found.append((number, match.group(1), match.group(2)))
    return found


def cli_invocations(path: Path) -> list[tuple[int, list[str]]]:
    """(line, arguments) of every ``fragrance-ops`` command the document shows: each shell
    line that runs it, and each code span that starts with it. A span's ``a|b`` stands for
    each of its alternatives and ``[--flag]`` for the flag; ``...`` or ``<...>`` ends what
    can be checked."""
    found: list[tuple[int, list[str]]] = []
    for block in code_blocks(path, "bash"):
        for offset, line in enumerate(block.source.splitlines(), start=1):
            if line.split()[:1] == ["fragrance-ops"]:
                found.append((block.line + offset, shlex.split(line, comments=True)[1:]))
    for number, span in code_spans(path):
        words = span.split()
        if words[:1] != ["fragrance-ops"] or len(words) == 1:
            continue
        arguments: list[list[str]] = [[]]
        for word in words[1:]:
            if word == "..." or word.startswith("<"):
                break
            word = word.removeprefix("[").removesuffix("]")
            choices = word.split("|") if not word.startswith("-") else [word]
            arguments = [[*done, choice] for done in arguments for choice in choices]
        found += [(number, args) for args in arguments]
    return found


def script_options(path: Path) -> list[tuple[int, str, str]]:
    """(line, script, option) of every ``--option`` a shell line or a code span passes to a
    repository script, ``benchmarks/outcome.py --steps 1000`` for instance; options in a
    shell line's comment count too (they tell the reader what else to pass)."""
    candidates = list(code_spans(path))
    for block in code_blocks(path, "bash"):
        for offset, line in enumerate(block.source.splitlines(), start=1):
            candidates.append((block.line + offset, line.replace("#", " ")))
    found = []
    for number, text in candidates:
        words = text.split()
        scripts = [word for word in words if re.fullmatch(r"(?:\./)?[\w/-]+\.py", word)]
        if not scripts:
            continue
        for word in words:
            if word.startswith("--"):
                option = word.partition("=")[0].rstrip(":,")
                found.append((number, scripts[0].removeprefix("./"), option))
    return found


_ENVIRONMENT_VARIABLE = re.compile(r"\bFRAGRANCE_OPS_[A-Z0-9_]+")


def environment_variables(path: Path) -> list[tuple[int, str]]:
    """(line, name) of every ``FRAGRANCE_OPS_...`` variable the document names, in prose or
    in code; a name ending in ``__`` is a group's prefix (``FRAGRANCE_OPS_KAFKA__<NAME>``)."""
    text = path.read_text(encoding="utf-8")
    return [
        (_line(text, match.start()), match.group())
        for match in _ENVIRONMENT_VARIABLE.finditer(text)
    ]


def run_example(
    example: CodeBlock,
    kafka_bootstrap: str,
    topic_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Run a document's Python example against the session's broker, on topics of its own,
    with the temporary files it makes (``tempfile.mkdtemp()``) under ``tmp_path``.
    A trainer example that logs steps must have published them, keyed by its run."""
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("FRAGRANCE_OPS_KAFKA__TOPIC_PREFIX", topic_prefix)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    exec(example.compiled(), {})
    if "log_step" in example.source:
        run_id = re.search(r'TrainerClient\("([^"]+)"', example.source)
        assert run_id, f"{example.name}: a log_step example names its run"
        metrics = consume_all(kafka_bootstrap, topic_name(Topic.METRICS, topic_prefix), 100)
        assert {message.key() for message in metrics} == {run_id.group(1).encode()}
