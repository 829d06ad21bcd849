"""docs/configuration.md's reference: generated from Settings, complete, never stale."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field, SecretStr

from config.settings import Settings
from fragrance_ops.settings_reference import (
    END_MARKER,
    REFERENCE_FILE,
    REGENERATE,
    START_MARKER,
    extract_block,
    groups,
    main,
    reference_markdown,
    replace_block,
)

ROOT = Path(__file__).parents[2]
CONFIGURATION = ROOT / REFERENCE_FILE


def _leaves(model: type[BaseModel], path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every setting of ``model`` as its dotted path, descending into nested models."""
    found = []
    for name, field in model.model_fields.items():
        annotation: Any = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found += _leaves(annotation, (*path, name))
        else:
            found.append((*path, name))
    return found


def _rows(markdown: str) -> dict[str, list[str]]:
    """Table rows of the reference by setting name: [setting, default, env, description]."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip("|").split(" | ")]
            rows[cells[0].split("`")[1]] = cells
    return rows


def test_the_configuration_reference_is_generated_from_the_settings() -> None:
    block = extract_block(CONFIGURATION.read_text(encoding="utf-8"))
    assert block == reference_markdown(), (
        f"{REFERENCE_FILE}'s settings reference is stale; run: {REGENERATE}"
    )
    assert f"`{REGENERATE}`" in CONFIGURATION.read_text(encoding="utf-8")


def test_every_setting_of_every_group_appears_with_its_environment_variable() -> None:
    rows = _rows(reference_markdown())
    expected = _leaves(Settings)
    assert len(rows) == len(expected)
    for path in expected:
        row = rows[".".join(path)]
        assert f"`FRAGRANCE_OPS_{'__'.join(path).upper()}`" in row[2]
    assert "`KAFKA_BOOTSTRAP_SERVERS`" in rows["kafka.bootstrap_servers"][2]
    headings = [line for line in reference_markdown().splitlines() if line.startswith("### ")]
    assert headings == [f"### `{group}`" for group in Settings.model_fields]


def test_group_docstrings_lead_their_tables() -> None:
    markdown = reference_markdown()
    for group in groups():
        assert group.lead, f"settings group {group.name} has no docstring"
        assert group.lead.replace("<", "&lt;") in markdown


class _Inner(BaseModel):
    password: SecretStr = SecretStr("hunter2-inner")
    path: Path = Path("/var/lib/ops")


class _Vault(BaseModel):
    """Secrets, some with defaults. Env: FRAGRANCE_OPS_VAULT__<NAME>."""

    token: SecretStr = Field(default=SecretStr("hunter2-token"), description="a | b")
    key: SecretStr | None = Field(default=SecretStr("hunter2-key"))
    unset: SecretStr | None = None
    nested: _Inner = Field(default_factory=_Inner)


class _WithVault(Settings):
    vault: _Vault = _Vault()


def test_secrets_never_show_their_default() -> None:
    markdown = reference_markdown(_WithVault)
    assert "hunter2" not in markdown
    rows = _rows(markdown)
    assert rows["vault.token"][1] == "set (hidden)"
    assert rows["vault.key"][1] == "set (hidden)"
    assert rows["vault.unset"][1] == "unset"
    assert rows["vault.nested.password"][1] == "set (hidden)"
    assert rows["vault.nested.password"][2] == "`FRAGRANCE_OPS_VAULT__NESTED__PASSWORD`"
    assert rows["vault.nested.path"][1] == '`"/var/lib/ops"`'
    assert rows["vault.token"][3] == r"a \| b"  # a pipe would split the cell
    markdown = reference_markdown()  # and the real groups' secrets
    real = _rows(markdown)
    for path in _leaves(Settings):
        model: Any = Settings
        for name in path[:-1]:
            model = model.model_fields[name].annotation
        field = model.model_fields[path[-1]]
        if "Secret" in str(field.annotation):
            assert real[".".join(path)][1] in {"unset", "set (hidden)"}
            default = field.get_default(call_default_factory=True)
            if default is not None and str(default.get_secret_value()):
                assert str(default.get_secret_value()) not in markdown


def test_write_replaces_only_the_marked_block(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(f"# x\n\nintro\n\n{START_MARKER}\nold\n{END_MARKER}\n\n## next\n")
    assert main(["--write", str(page)]) == 0
    text = page.read_text()
    assert text.startswith(f"# x\n\nintro\n\n{START_MARKER}\n\n### `kafka`")
    assert text.endswith(f"\n\n{END_MARKER}\n\n## next\n")
    assert extract_block(text) == reference_markdown()
    assert replace_block(text, reference_markdown()) == text


def test_write_refuses_a_file_without_markers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tmp_path / "page.md"
    page.write_text("# no markers\n")
    assert main(["--write", str(page)]) == 1
    assert page.read_text() == "# no markers\n"
    assert START_MARKER in capsys.readouterr().err


def test_write_without_a_file_refreshes_docs_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    page = tmp_path / REFERENCE_FILE
    page.parent.mkdir()
    page.write_text(f"# Configuration\n\n{START_MARKER}\nold\n{END_MARKER}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["--write"]) == 0
    assert extract_block(page.read_text()) == reference_markdown()
