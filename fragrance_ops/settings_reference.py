"""The configuration reference in docs/configuration.md, generated from the ``Settings`` model.

One table per settings group, in model order: each setting with its type, its default, its
environment variable and its description. Secrets never show a value. A test fails when the
copy in docs/configuration.md drifts from the model.

    python -m fragrance_ops.settings_reference          # print the reference
    python -m fragrance_ops.settings_reference --write  # refresh docs/configuration.md

``--write FILE`` refreshes another file. It replaces only the text between
``<!-- settings-reference:start -->`` and ``<!-- settings-reference:end -->``; it refuses a
file without exactly one pair. Paths are relative to the working directory: run it from the
repository's root.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, SecretBytes, SecretStr
from pydantic.fields import FieldInfo

from config.settings import Settings

START_MARKER = "<!-- settings-reference:start -->"
END_MARKER = "<!-- settings-reference:end -->"
REFERENCE_FILE = Path("docs/configuration.md")
REGENERATE = "python -m fragrance_ops.settings_reference --write"
UNSET_SECRET = "unset"
HIDDEN_SECRET = "set (hidden)"

# Variables read besides FRAGRANCE_OPS_<GROUP>__<NAME> (see Settings.model_post_init).
ECOSYSTEM_ENV: dict[str, tuple[str, ...]] = {
    "kafka.bootstrap_servers": ("KAFKA_BOOTSTRAP_SERVERS",),
}

_SECRET_TYPES: tuple[type, ...] = (SecretStr, SecretBytes)
_CODE_SPAN = re.compile(r"(`+).+?\1")


@dataclass(frozen=True)
class SettingDoc:
    """One row of the reference."""

    name: str  # dotted, e.g. "reward.window_size"
    type: str
    default: str  # as a TOML value; for a secret UNSET_SECRET or HIDDEN_SECRET
    env: tuple[str, ...]
    description: str
    secret: bool


@dataclass(frozen=True)
class GroupDoc:
    """One table of the reference: a group of ``Settings``."""

    name: str
    lead: str
    settings: tuple[SettingDoc, ...]


def groups(model: type[Settings] = Settings) -> list[GroupDoc]:
    """Every group of ``model`` and its settings, in model order."""
    prefix = str(model.model_config.get("env_prefix") or "")
    delimiter = str(model.model_config.get("env_nested_delimiter") or "__")
    documented = []
    for name, field in model.model_fields.items():
        group = field.annotation
        if not (isinstance(group, type) and issubclass(group, BaseModel)):
            raise TypeError(f"Settings.{name} is not a settings group (a pydantic model)")
        settings = tuple(_settings(group, (name,), prefix, delimiter))
        documented.append(GroupDoc(name=name, lead=_docstring(group), settings=settings))
    return documented


def reference_markdown(model: type[Settings] = Settings) -> str:
    """The Markdown reference: per group a heading, its docstring, and a table."""
    sections = []
    for group in groups(model):
        lines = [f"### `{group.name}`", ""]
        if group.lead:
            lines += [_prose(group.lead), ""]
        lines += [
            "| setting | default | environment variable | description |",
            "|---|---|---|---|",
        ]
        for setting in group.settings:
            cells = (
                f"`{setting.name}` ({_code(setting.type)})",
                setting.default if setting.secret else _code(setting.default),
                ", ".join(_code(env) for env in setting.env),
                _prose(setting.description),
            )
            lines.append("| " + " | ".join(cell.replace("|", r"\|") for cell in cells) + " |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def extract_block(text: str) -> str:
    """The reference between the markers of ``text``, without the blank lines around it."""
    start, end = _marker_span(text)
    return text[start:end].strip("\n")


def replace_block(text: str, reference: str) -> str:
    """``text`` with what lies between its markers replaced by ``reference``."""
    start, end = _marker_span(text)
    return text[:start] + "\n\n" + reference.strip("\n") + "\n\n" + text[end:]


def _marker_span(text: str) -> tuple[int, int]:
    starts, ends = text.count(START_MARKER), text.count(END_MARKER)
    if starts != 1 or ends != 1:
        raise ValueError(
            f"expected one {START_MARKER} and one {END_MARKER}, found {starts} and {ends}"
        )
    start = text.index(START_MARKER) + len(START_MARKER)
    end = text.index(END_MARKER)
    if end < start:
        raise ValueError(f"{END_MARKER} comes before {START_MARKER}")
    return start, end


def _settings(
    group: type[BaseModel], path: tuple[str, ...], prefix: str, delimiter: str
) -> Iterator[SettingDoc]:
    for name, field in group.model_fields.items():
        dotted = (*path, name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _settings(annotation, dotted, prefix, delimiter)  # a nested group
            continue
        key = ".".join(dotted)
        secret = _is_secret(annotation)
        yield SettingDoc(
            name=key,
            type=_type_name(annotation),
            default=_default(field, secret=secret),
            env=((prefix + delimiter.join(dotted)).upper(), *ECOSYSTEM_ENV.get(key, ())),
            description=" ".join((field.description or "").split()),
            secret=secret,
        )


def _docstring(group: type[BaseModel]) -> str:
    doc = group.__dict__.get("__doc__")  # its own, not one inherited from BaseModel
    return " ".join(doc.split()) if isinstance(doc, str) else ""


def _is_secret(annotation: Any) -> bool:
    if isinstance(annotation, type) and issubclass(annotation, _SECRET_TYPES):
        return True
    return any(_is_secret(arg) for arg in get_args(annotation))


def _default(field: FieldInfo, *, secret: bool) -> str:
    if field.is_required():
        return UNSET_SECRET if secret else "required"
    value = field.get_default(call_default_factory=True)
    if secret:
        return UNSET_SECRET if value is None else HIDDEN_SECRET
    return _value(value)


def _value(value: Any) -> str:
    """A default as one would write it in the TOML file (None has no TOML spelling)."""
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    return json.dumps(value, default=str, separators=(", ", ": "))


def _type_name(annotation: Any) -> str:
    if annotation is None or annotation is type(None):
        return "None"
    origin = get_origin(annotation)
    if origin is Literal:
        return " | ".join(_value(arg) for arg in get_args(annotation))
    if origin is Union or origin is types.UnionType:
        return " | ".join(_type_name(arg) for arg in get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(arg) for arg in get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is Any:
        return "Any"
    return str(getattr(annotation, "__name__", annotation))


def _code(text: str) -> str:
    """``text`` as a code span, with enough backticks to hold any inside it."""
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _prose(text: str) -> str:
    """Free text for Markdown: ``<`` outside code spans would open an HTML tag."""
    parts, last = [], 0
    for span in _CODE_SPAN.finditer(text):
        parts += [text[last : span.start()].replace("<", "&lt;"), span.group()]
        last = span.end()
    parts.append(text[last:].replace("<", "&lt;"))
    return "".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fragrance_ops.settings_reference",
        description="Print the configuration reference, or refresh it in a Markdown file.",
    )
    parser.add_argument(
        "--write",
        metavar="FILE",
        type=Path,
        nargs="?",
        const=REFERENCE_FILE,
        help=f"replace the text between {START_MARKER} and {END_MARKER} in FILE "
        f"(default: {REFERENCE_FILE})",
    )
    args = parser.parse_args(argv)
    reference = reference_markdown()
    if args.write is None:
        print(reference)
        return 0
    path: Path = args.write
    try:
        text = path.read_text(encoding="utf-8")
        updated = replace_block(text, reference)
    except (OSError, ValueError) as error:
        print(f"{path}: {error}", file=sys.stderr)
        return 1
    if updated == text:
        print(f"{path}: settings reference up to date")
    else:
        path.write_text(updated, encoding="utf-8")
        print(f"{path}: settings reference updated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
