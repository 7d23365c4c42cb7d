"""Every table of figures in README.md and docs/*.md: a block between two markers, rendered from committed outputs.

A block is `<!-- name:begin -->` ... `<!-- name:end -->` in one or more Markdown files. `BLOCKS` names, for each
block, the files that hold it and the function that renders it from the outputs committed with the repository
(the pipeline's metrics.json files under data/, a benchmark's JSON under benchmarks/results/), never from a
live run. A benchmark that measures something writes its JSON and then rewrites its blocks; this script
rewrites them all, and `tests/test_docs.py` fails when a committed block differs from what it renders.

    python benchmarks/docblock.py            # rewrite every block from the committed outputs
    python benchmarks/docblock.py --check    # list the blocks that differ; exit code 1 if any
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def command_line(script: str, parser: argparse.ArgumentParser, args: argparse.Namespace, skip=()) -> str:
    """The command that reruns this benchmark: the script and every option given a non-default value."""
    given = [f"--{key.replace('_', '-')} {' '.join(map(str, value)) if isinstance(value, list) else value}"
             for key, value in vars(args).items() if value != parser.get_default(key) and key not in skip]
    return " ".join([f"python {script}", *given])


@dataclass(frozen=True)
class Block:
    name: str
    docs: tuple[str, ...]  # the Markdown files (relative to the repository root) that hold the block
    render: Callable[[], str]  # the block's text, from committed outputs, run in the repository root


def blocks() -> list[Block]:
    """Every generated block, with its files and its renderer."""
    sys.path.insert(0, str(Path(__file__).parent))
    import budget_curve
    import deployment
    import kernels
    import methods_table
    import pipeline_tables
    import quickstart
    import imagenet_scale
    import topk
    import topk_students

    return [
        Block("headline", ("README.md",), pipeline_tables.headline),
        Block("pipeline-cost", ("README.md",), pipeline_tables.cost),
        Block("summary", ("docs/results.md",), pipeline_tables.summary),
        Block("quickstart-time", ("README.md",), quickstart.render_committed),
        Block("deployment", ("docs/deployment.md",), deployment.render),
        Block("budget-curve", ("docs/results.md",), budget_curve.render_committed),
        Block("methods-results", ("docs/methods.md",), methods_table.render_committed),
        Block("kernels", ("docs/reproducibility.md",), kernels.render_committed),
        Block("topk", ("docs/benchmarks.md",), topk.render_committed),
        Block("imagenet-memory", ("docs/benchmarks.md",), imagenet_scale.render_committed("memory")),
        Block("imagenet-speed", ("docs/benchmarks.md",), imagenet_scale.render_committed("speed")),
        Block("imagenet-projection", ("docs/benchmarks.md",), imagenet_scale.render_committed("projection")),
        Block("topk-students", ("docs/benchmarks.md",), topk_students.render_committed),
    ]


def rendered(block: Block, root: Path = ROOT) -> str:
    with contextlib.chdir(root):
        return block.render()


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def committed(doc: Path, name: str) -> str | None:
    """The text between the block's markers in `doc`, or None when the markers are not there."""
    begin, end = markers(name)
    text = doc.read_text() if doc.exists() else ""
    if begin not in text or end not in text:
        return None
    return text.partition(begin)[2].partition(end)[0].strip("\n")


def write_block(doc: Path, name: str, text: str, heading: str | None = None) -> None:
    """Put `text` between the block's markers in `doc`; without the markers, append the block (under `heading`)
    or, with no heading, refuse."""
    begin, end = markers(name)
    block = f"{begin}\n{text}\n{end}"
    current = doc.read_text() if doc.exists() else ""
    if begin in current and end in current:
        current = current[:current.index(begin)] + block + current[current.index(end) + len(end):]
    elif heading is not None:
        current = current.rstrip() + f"\n\n## {heading}\n\n{block}\n"
    else:
        raise SystemExit(f"{doc} has no {begin} ... {end} markers")
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(current)


def write_named(name: str, root: Path = ROOT) -> str:
    """Render block `name` from the committed outputs and write it into every file that holds it."""
    block = next(b for b in blocks() if b.name == name)
    text = rendered(block, root)
    for doc in block.docs:
        write_block(root / doc, block.name, text)
    return text


def stale(root: Path = ROOT) -> list[str]:
    """`file: block` for every block whose committed text differs from what it renders (or that is missing)."""
    found = []
    for block in blocks():
        text = rendered(block, root)
        found += [f"{doc}: {block.name}" for doc in block.docs if committed(root / doc, block.name) != text]
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="write nothing; list the blocks that differ")
    args = ap.parse_args()
    if args.check:
        found = stale()
        print("\n".join(found) or "every block is as its outputs render it")
        raise SystemExit(1 if found else 0)
    for block in blocks():
        write_named(block.name)
        print(f"wrote {block.name} into {', '.join(block.docs)}")


if __name__ == "__main__":
    main()
