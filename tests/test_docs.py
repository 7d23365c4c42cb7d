"""The documentation stays true: generated tables equal what their outputs render, and every command line in
README.md and docs/*.md parses and validates (without running)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import click
import pytest

from logitcache.cli import check_command_line
from logitcache.core.config import load_params
from logitcache.core.errors import LogitcacheError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import docblock  # noqa: E402

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OPERATORS = {"&&", "||", "|", ";", ">", ">>", "2>", "&"}


def test_every_generated_block_equals_what_its_committed_outputs_render():
    assert docblock.stale() == [], "rerun `python benchmarks/docblock.py` and commit the documents"


def test_a_block_whose_output_changed_is_reported_stale(tmp_path):
    """The check can fail: the same repository with one figure of one output changed."""
    for part in ("README.md", "params.yaml", "data/summary"):
        source, target = ROOT / part, tmp_path / part
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    headline = next(b for b in docblock.blocks() if b.name == "headline")
    assert docblock.committed(tmp_path / "README.md", "headline") == docblock.rendered(headline, tmp_path)
    metrics = json.loads((tmp_path / "data/summary/metrics.json").read_text())
    metrics["kd"]["test_acc"] += 0.0001
    (tmp_path / "data/summary/metrics.json").write_text(json.dumps(metrics))
    assert docblock.committed(tmp_path / "README.md", "headline") != docblock.rendered(headline, tmp_path)


def test_write_block_replaces_only_the_text_between_its_markers(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("before\n<!-- t:begin -->\nold\n<!-- t:end -->\nafter\n")
    docblock.write_block(doc, "t", "new\nlines")
    assert doc.read_text() == "before\n<!-- t:begin -->\nnew\nlines\n<!-- t:end -->\nafter\n"
    with pytest.raises(SystemExit, match="no <!-- u:begin -->"):
        docblock.write_block(doc, "u", "x")


def shell_lines(text: str) -> list[str]:
    """Every command line of a Markdown text: the lines of its code blocks (continuations joined) and its
    inline code spans that run a command with arguments (`logitcache inspect` alone names a command)."""
    blocks = re.findall(r"^\s*```[^\n]*\n(.*?)^\s*```", text, flags=re.S | re.M)
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    spans = re.findall(r"`((?:logitcache|dvc exp run|torchrun) [^`\n]+)`", text)
    return [line for line in lines if line] + [span for span in spans if len(span.split()) > 2]


def commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line: comments dropped, split at && ; | and redirections."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:  # not shell (an unbalanced quote in prose)
        return []
    out = [[]]
    for word in words:
        if word in OPERATORS:
            out.append([])
        else:
            out[-1].append(word)
    return [words for words in out if words]


def documented(program: str) -> list[tuple[str, list[str]]]:
    """(file, argv after the program) of every documented command line that runs `program`."""
    found = []
    for doc in DOCS:
        for line in shell_lines(doc.read_text()):
            for words in commands(line):
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # OMP_NUM_THREADS=1 logitcache ...
                    words = words[1:]
                if words[:1] == ["torchrun"] and "logitcache" in words:  # torchrun ... -m logitcache ...
                    words = words[words.index("logitcache"):]
                if words[:len(program.split())] == program.split() and len(words) > len(program.split()):
                    found.append((doc.name, words[len(program.split()):]))
    return found


def test_every_documented_logitcache_command_parses_and_validates(monkeypatch):
    monkeypatch.chdir(ROOT)
    lines = documented("logitcache")
    assert len(lines) > 30 and any(argv[:1] == ["train-student"] for _, argv in lines)
    failures = []
    for doc, argv in lines:
        try:
            check_command_line(argv)
        except click.exceptions.Exit:  # --help
            pass
        except (click.UsageError, LogitcacheError) as e:
            failures.append(f"{doc}: logitcache {shlex.join(argv)}: {e}")
    assert failures == []


def set_params(argv: list[str]) -> list[list[str]]:
    """The -S overrides of one `dvc exp run`: one list per experiment (a queued `key=a,b` sweep makes several)."""
    given = [argv[i + 1] for i, word in enumerate(argv[:-1]) if word in ("-S", "--set-param")]
    runs = [[]]
    for item in given:
        key, _, value = item.partition("=")
        choices = value.split(",") if "--queue" in argv and not re.search(r"[\[\]{}]", value) else [value]
        runs = [[*run, f"{key}={choice}"] for run in runs for choice in choices]
    return runs


def test_every_documented_dvc_experiment_validates(monkeypatch):
    monkeypatch.chdir(ROOT)
    lines = documented("dvc exp run")
    assert any("-S" in argv for _, argv in lines)
    failures = []
    for doc, argv in lines:
        for overrides in set_params(argv):
            try:
                load_params("params.yaml", overrides)
            except LogitcacheError as e:
                failures.append(f"{doc}: dvc exp run {shlex.join(argv)}: {e}")
    assert failures == []


def test_a_stale_key_or_option_in_a_documented_command_is_caught(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    doc = "```bash\nlogitcache train-student kd -S students.kd.temperature=8   # stale\n```\n" \
          "Or `dvc exp run --queue -S 'students.kd.temperature=2,8'` and `logitcache train-teacher --epoch 3`.\n"
    lines = [words for line in shell_lines(doc) for words in commands(line)]
    assert lines == [["logitcache", "train-student", "kd", "-S", "students.kd.temperature=8"],
                     ["dvc", "exp", "run", "--queue", "-S", "students.kd.temperature=2,8"],
                     ["logitcache", "train-teacher", "--epoch", "3"]]
    with pytest.raises(LogitcacheError, match="unknown key 'students.kd.temperature'"):
        check_command_line(lines[0][1:])
    assert set_params(lines[1][3:]) == [["students.kd.temperature=2"], ["students.kd.temperature=8"]]
    with pytest.raises(LogitcacheError, match="unknown key"):
        load_params("params.yaml", set_params(lines[1][3:])[0])
    with pytest.raises(click.UsageError, match="--epoch"):
        check_command_line(lines[2][1:])


FIGURE = re.compile(r"\s*\**[-+]?\d[\d,]*(\.\d+)?( ± \d+(\.\d+)?)?\**\s*(%|×|s|ms|min)?\s*")


def test_no_table_of_figures_lies_outside_a_generated_block():
    """A table of figures (85.26 ± 0.58, 1,290, 0.88×) must come from a renderer."""
    hand = []
    for doc in DOCS:
        text = re.sub(r"<!-- (\S+):begin -->.*?<!-- \1:end -->", "", doc.read_text(), flags=re.S)
        text = re.sub(r"<!-- methods:start -->.*?<!-- methods:end -->", "", text, flags=re.S)
        hand += [f"{doc.name}: {line}" for line in text.splitlines() if line.startswith("|") and is_figures(line)]
    assert hand == []


def is_figures(row: str) -> bool:
    """A row of measured figures: a cell with a decimal figure, or two cells of whole numbers."""
    figures = [cell for cell in row.strip("|").split("|") if FIGURE.fullmatch(cell)]
    return any("." in cell for cell in figures) or len(figures) >= 2
