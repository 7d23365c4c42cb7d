"""A generated block of a Markdown file, between two markers, replaced in place when a benchmark is rerun."""

from __future__ import annotations

import argparse
from pathlib import Path


def command_line(script: str, parser: argparse.ArgumentParser, args: argparse.Namespace, skip=()) -> str:
    """The command that reruns this benchmark: the script and every option given a non-default value."""
    given = [f"--{key.replace('_', '-')} {' '.join(map(str, value)) if isinstance(value, list) else value}"
             for key, value in vars(args).items() if value != parser.get_default(key) and key not in skip]
    return " ".join([f"python {script}", *given])


def write_block(doc: Path, name: str, heading: str, text: str) -> None:
    """Put `text` between `<!-- name:begin -->` and `<!-- name:end -->` in `doc`, appending the block (under
    `heading`) when the markers are not there yet."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text}\n{end}"
    current = doc.read_text() if doc.exists() else ""
    if begin in current and end in current:
        current = current[:current.index(begin)] + block + current[current.index(end) + len(end):]
    else:
        current = current.rstrip() + f"\n\n## {heading}\n\n{block}\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(current)
