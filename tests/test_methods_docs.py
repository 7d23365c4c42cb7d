"""The committed method table is the registry's."""

from pathlib import Path

from logitcache.student.methods import describe, markdown_table, methods

DOC = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


def test_docs_methods_table_matches_the_registry():
    text = DOC.read_text()
    committed = text.split("<!-- methods:start -->\n", 1)[1].split("<!-- methods:end -->", 1)[0]
    built_in = [describe(cls) for cls in methods().values() if cls.__module__.startswith("logitcache.")]
    assert committed == markdown_table(built_in), "regenerate with `logitcache methods --markdown`"


def test_all_eight_methods_are_registered():
    assert {"kd", "dkd", "fitnets", "at", "sp", "rkd", "pkt", "crd"} <= set(methods())


def test_cli_lists_all_eight_and_prints_the_table():
    from click.testing import CliRunner

    from logitcache.cli import main

    listed = CliRunner().invoke(main, ["methods"])
    assert listed.exit_code == 0
    names = {line.split()[0] for line in listed.output.splitlines() if line and not line.startswith(" ")}
    assert {"kd", "dkd", "fitnets", "at", "sp", "rkd", "pkt", "crd"} <= names
    table = CliRunner().invoke(main, ["methods", "--markdown"])
    assert table.exit_code == 0 and "| `crd` | contrastive |" in table.output
