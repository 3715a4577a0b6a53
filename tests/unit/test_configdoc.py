"""docs/configuration.md is generated from the gateway's Settings: every LORAGATE_* variable is documented,
and the committed file is what the generator writes today."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from loragate.cli import main
from loragate.service.configdoc import COMMAND, UndocumentedError, entries, render
from loragate.service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_has_a_meaning_and_a_row() -> None:
    rows = entries()
    assert [r.variable for r in rows] == [f"LORAGATE_{name.upper()}" for name in Settings.model_fields]
    assert [r.variable for r in rows if not r.description] == []
    text = render()
    for row in rows:
        assert f"| `{row.variable}` | {row.default} |" in text


def test_the_committed_reference_is_current() -> None:
    committed = (ROOT / "docs/configuration.md").read_text()
    assert committed == render(), f"docs/configuration.md is stale: run `{COMMAND}`"


def test_the_command_writes_the_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "configuration.md"
    assert main(["config-reference", "--out", str(out)]) == 0
    assert out.read_text() == render()
    assert main(["config-reference"]) == 0
    assert capsys.readouterr().out == render()


class Sample(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SAMPLE_")

    described: int = Field(3, description="From the field.", ge=1)
    # From the comment
    # on two lines.
    commented: Literal["a", "b"] = "a"
    token: SecretStr | None = None  # an inline comment is not a description

    # A comment above a blank line is not this field's.

    bare: float = 0.5


def test_descriptions_come_from_the_field_or_the_comment_lines_directly_above() -> None:
    rows = {r.variable: r for r in entries(Sample)}
    assert rows["SAMPLE_DESCRIBED"].description == "From the field."
    assert rows["SAMPLE_DESCRIBED"].type == "integer (>= 1)" and rows["SAMPLE_DESCRIBED"].default == "`3`"
    assert rows["SAMPLE_COMMENTED"].description == "From the comment on two lines."
    assert rows["SAMPLE_COMMENTED"].type == "`a` \\| `b`"
    assert rows["SAMPLE_TOKEN"].description == "" and rows["SAMPLE_TOKEN"].default == "unset"
    assert rows["SAMPLE_BARE"].description == ""


def test_an_undocumented_setting_fails_the_generator_naming_it() -> None:
    with pytest.raises(UndocumentedError, match="SAMPLE_TOKEN, SAMPLE_BARE"):
        render(Sample)
