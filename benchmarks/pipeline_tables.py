"""The tables the README and docs/results.md show of the default pipeline, from its committed outputs.

`dvc repro` writes data/summary/metrics.json and summary.md (the summary stage) and every model's
metrics.json; these functions read them and params.yaml, and `python benchmarks/docblock.py` writes the
tables between their markers.
"""

from __future__ import annotations

import json
from pathlib import Path

from logitcache.core.config import load_params

SUMMARY = Path("data/summary")


def _rows() -> dict[str, dict]:
    return json.loads((SUMMARY / "metrics.json").read_text())


def _pct(row: dict, key: str) -> str:
    std = row.get(f"{key}_std")
    return f"{100 * row[key]:.2f}" + (f" ± {100 * std:.2f}" if std else "")


def headline() -> str:
    """Every model of the summary: what it learns from, accuracy, agreement with the teacher, size, budget."""
    params, found = load_params("params.yaml"), _rows()
    rows = {name: found[name] for name in ["teacher", *params.students] if name in found}
    ce = rows.get("ce")
    lines = ["| model | arch | learns from | labels | test acc (%) | vs ce (points) | val acc (%) | agreement with "
             "teacher (%) | params | steps |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        if name == "teacher":
            arch, learns, labels = params.teacher.model, "labels", "100 %"
        else:
            cfg = params.student(name)
            arch = cfg.model + (" (pruned)" if cfg.init else "")
            learns = " + ".join(cfg.loss) + " from the cache" if cfg.loss else "labels"
            labels = f"{100 * cfg.labeled_fraction:g} %"
        comparable = ce is not None and name not in ("ce", "teacher") and arch == params.student("ce").model
        margin = f"{100 * (row['test_acc'] - ce['test_acc']):+.2f}" if comparable else "–"
        agreement = "–" if "agreement" not in row else f"{100 * row['agreement']:.2f}"
        lines.append(f"| {name} | {arch} | {learns} | {labels} | {_pct(row, 'test_acc')} | {margin} | "
                     f"{_pct(row, 'val_acc')} | {agreement} | {row['params']:,.0f} | {row['steps']:,.0f} |")
    seeds = sorted({len(params.student(n).seeds) for n in rows if n != "teacher" and params.student(n).seeds})
    return (f"From `data/summary/metrics.json` (`dvc repro`, 2 CPU cores): mean ± std over "
            f"{'/'.join(map(str, seeds))} seeds where a ± is shown; every model reports the checkpoint chosen on "
            "validation; \"vs ce\" compares students of the same arch at the same budget.\n\n" + "\n".join(lines))


def cost() -> str:
    """`dvc repro`'s training time, as its committed outputs record it."""
    params, rows = load_params("params.yaml"), _rows()
    minutes = {name: row["train_seconds"] / 60 for name, row in rows.items()}
    started = [name for name in minutes if name != "teacher" and params.student(name).init]  # from a checkpoint
    students = [m for name, m in minutes.items() if name != "teacher" and name not in started]
    recovered = "".join(f", the {name} model's recovery {minutes[name]:.0f} min" for name in started)
    return (f"`dvc repro` takes about **{sum(minutes.values()):.0f} min** of training on 2 CPU cores, as its "
            f"committed outputs record it: the teacher {minutes['teacher']:.0f} min, {len(students)} students "
            f"{min(students):.0f}–{max(students):.0f} min each (their seeds at once){recovered}; preparing the data, "
            "the dump, the exports and the summary add a few minutes.")


def summary() -> str:
    """The summary stage's own table, as it wrote it."""
    return (f"`data/summary/summary.md`, written by `logitcache summarize` (the summary stage):\n\n"
            f"{(SUMMARY / 'summary.md').read_text().strip()}")
