"""The README's quick start, timed: runs each line of its command block in this checkout and records the times.

Run it in a fresh clone (nothing under data/quick/ yet), with nothing else running, to measure what a
newcomer waits. Writes benchmarks/results/quickstart.json; `python benchmarks/docblock.py` renders the
README's sentence from it.

    git clone REPO /tmp/lc && cd /tmp/lc && python benchmarks/quickstart.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from docblock import write_named

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).parent / "results" / "quickstart.json"
HEADING = "## Quick start"


def commands(readme: Path) -> list[str]:
    """The lines of the first ```bash block under the README's quick-start heading (comments dropped)."""
    section = readme.read_text().partition(HEADING)[2]
    block = section.partition("```bash\n")[2].partition("```")[0]
    lines = [line.partition(" #")[0].strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    if (ROOT / "data" / "quick").exists():
        raise SystemExit("data/quick/ exists: run this in a fresh clone (or move data/quick away yourself)")
    from logitcache.core.provenance import environment

    steps = []
    for line in commands(ROOT / "README.md"):
        start = time.perf_counter()
        subprocess.run(["bash", "-c", line], cwd=ROOT, check=True)
        steps.append({"command": line, "seconds": time.perf_counter() - start})
        print(f"{steps[-1]['seconds']:7.1f} s  {line}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    result = {"commit": commit.stdout.strip(), "environment": environment().as_dict(), "steps": steps,
              "seconds": sum(s["seconds"] for s in steps), "summary": summary_of(ROOT)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(write_named("quickstart-time") if Path(args.out) == OUT else render(result))


def summary_of(root: Path) -> dict:
    """What the quick start's summarize wrote: every model's figures (data/quick/summary/metrics.json)."""
    return json.loads((root / "data" / "quick" / "summary" / "metrics.json").read_text())


def results_table(summary: dict) -> list[str]:
    lines = ["| model | test acc (%) | val acc (%) | agreement with teacher (%) | steps | train time (s) |",
             "|---|---|---|---|---|---|"]
    for name in sorted(summary, key=lambda name: name != "teacher"):  # the teacher first
        row = summary[name]
        agreement = f"{100 * row['agreement']:.2f}" if "agreement" in row else "–"
        lines.append(f"| {name} | {100 * row['test_acc']:.2f} | {100 * row['val_acc']:.2f} | {agreement} | "
                     f"{row['steps']:,.0f} | {row['train_seconds']:.0f} |")
    return lines


def render(result: dict) -> str:
    minutes, seconds = divmod(round(result["seconds"]), 60)
    env = result["environment"]
    parts = ", ".join(f"`{label(s['command'])}` {s['seconds']:.0f} s" for s in result["steps"])
    return (f"Measured from a fresh clone (commit {result['commit']}, {env['threads']} torch thread(s), "
            f"{env['cpu_capability']} kernels, torch {env['torch']}, `python benchmarks/quickstart.py`): "
            f"**{minutes} min {seconds:02d} s** in all ({parts}). What its summary showed:\n\n"
            + "\n".join(results_table(result["summary"])))


def label(command: str) -> str:
    """A command's subcommand and its argument, without the options: `train-student kd`."""
    words = command.split()[1:]
    return " ".join(words[:2] if len(words) > 1 and not words[1].startswith("-") else words[:1])


def render_committed() -> str:
    return render(json.loads(OUT.read_text()))


if __name__ == "__main__":
    main()
