import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from pydantic import Field

from logitcache.cli import main
from logitcache.core.config import Section
from logitcache.core.params_doc import render_params_doc

REPO = Path(__file__).resolve().parents[1]


def test_committed_docs_params_md_is_what_the_code_generates():
    committed = (REPO / "docs" / "params.md").read_text()
    assert committed == render_params_doc(), "docs/params.md is stale: run `logitcache params-doc > docs/params.md`"


def test_the_command_prints_the_same_document():
    result = CliRunner().invoke(main, ["params-doc"])
    assert result.exit_code == 0, result.output
    assert result.stdout == (REPO / "docs" / "params.md").read_text()


def documented(markdown: str) -> tuple[set[str], set[str]]:
    """(section.key for every table row under a `## section[, section...]` heading, the sections)."""
    keys, sections, headings = set(), [], set()
    for line in markdown.splitlines():
        if line.startswith("## "):
            sections = line[3:].split(", ")
            headings |= set(sections)
        elif row := re.match(r"\| `([a-z_0-9]+)` \|", line):
            keys |= {f"{section}.{row.group(1)}" for section in sections}
    return keys, headings


def test_every_key_of_params_yaml_is_documented():
    keys, headings = documented((REPO / "docs" / "params.md").read_text())
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    used = set()
    for section, values in raw.items():
        entries = values.values() if section == "students" else [values]
        prefix = "students.NAME" if section == "students" else section
        for entry in entries:
            for key, value in entry.items():
                used.add(f"{prefix}.{key}")
                if f"{prefix}.{key}" in headings:  # a section of its own: its keys are documented too
                    items = value if isinstance(value, list) else [value]  # a record, or a list of records
                    used |= {f"{prefix}.{key}.{inner}" for item in items if isinstance(item, dict) for inner in item}
    assert not used - keys, used - keys
    assert {"teacher.augment.crop_padding", "students.NAME.seeds", "dump.views"} <= used  # the walk saw nested keys


def test_a_row_shows_type_bounds_default_and_description():
    lines = render_params_doc().splitlines()
    assert "| `epochs` | `int`, ≥ 1, ≤ 100000 | `15` | passes over the training rows (the training split less the validation rows) |" in lines
    assert ("| `views` | `int \\| \"all\"` | `4` | views per training sample (view 0 is the evaluation view); all = "
            "every crop/flip view; other splits use the evaluation view |") in lines
    assert any(line.startswith("| `seeds` | `list[int] \\| null`, at least 1 item | `null` | ") for line in lines)


def test_a_field_without_description_cannot_be_rendered():
    class Inner(Section):
        documented: int = Field(1, description="has one")
        bare: int = 2

    class Root(Section):
        inner: Inner = Field(Inner(), description="a section")

    with pytest.raises(ValueError, match="Inner.bare has no description"):
        render_params_doc(Root)
