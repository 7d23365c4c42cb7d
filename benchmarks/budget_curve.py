"""Converged baselines, shown: the ce and kd students at 1x, 2x and 4x the default step budget, 3 seeds each.

Each run is params.yaml's student with only `steps` changed (and the runs' folder,
data/budget/<student>_<steps>; at 1x the runs `dvc repro` made are read, or trained when
missing), so the curve shows what more budget buys. The default budget is right when
doubling it adds no more than 0.3 points to the CE baseline's validation accuracy (the
budget is a hyper-parameter: it is chosen on validation, and the test column is shown
beside it). Checkpoints are selected on the validation split; test accuracy is scored
once per run. A student's seeds train at once (`--jobs`, as in dvc.yaml). Writes the
table between markers in docs/benchmarks.md, docs/budget.png, and
data/budget/<student>.json (a DVC plot: `dvc plots show`), and keeps every run's metrics
in data/budget/ for --render-only (which leaves out, and names, the points whose runs have not
finished); finished runs found there are kept, not retrained. The last column is the test
accuracy of the teacher whose cache a point's runs read, so points made against another
cache (an earlier teacher, or another torch build) show it.

    python benchmarks/budget_curve.py                  # after `dvc repro`
    python benchmarks/budget_curve.py --multiples 0.5 1 2 4
    python benchmarks/budget_curve.py --render-only    # the table and picture again, from data/budget
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from docblock import command_line, write_block

from logitcache.core.config import load_params
from logitcache.core.io import write_json
from logitcache.student.train import train_student


def run(params_path: str, name: str, multiple: float, seeds: list[int], work: Path, train: bool, jobs: int) -> dict:
    """Train student `name` at `multiple` x its budget for every seed (or read the kept runs), and sum it up."""
    steps, out = point(params_path, name, multiple, work)
    params = load_params(params_path, [f"students.{name}.steps={steps}",
                                       f"students.{name}.seeds={json.dumps(seeds)}", f"students.{name}.out={out}"])
    start = time.perf_counter()
    if train:
        train_student(params, name, resume=True, jobs=jobs)  # seeds already trained with these settings are kept
    m = json.loads((out / "metrics.json").read_text())
    return {"student": name, "multiple": multiple, "steps": int(m["steps"]), "samples": int(m["samples"]),
            "test_acc": m["test_acc"], "test_acc_std": m["test_acc_std"], "val_acc": m["val_acc"],
            "val_acc_std": m["val_acc_std"], "seconds": m["train_seconds"], "teacher": m["teacher_test_acc"],
            "wall": time.perf_counter() - start}


def point(params_path: str, name: str, multiple: float, work: Path) -> tuple[int, Path]:
    """The step budget of `name` at `multiple` x its own, and the folder of its runs (1x: the pipeline's own)."""
    base = load_params(params_path).students[name]
    if base.steps is None:
        raise SystemExit(f"students.{name} has no steps: budget in params.yaml; the curve multiplies it")
    steps = round(multiple * base.steps)
    return steps, Path(base.out) if multiple == 1 else work / f"{name}_{steps}"


def finished(params_path: str, name: str, multiple: float, work: Path) -> bool:
    """Whether the runs of `name` at `multiple` x its budget are complete; --render-only draws only those."""
    steps, out = point(params_path, name, multiple, work)
    if not (out / "metrics.json").is_file():
        print(f"{name} at {steps:,} steps: no finished runs in {out}, left out")
        return False
    return True


def table(rows: list[dict]) -> str:
    lines = ["| student | budget | steps | samples seen | val acc (%) | test acc (%) | gain over half the budget: "
             "val / test (pts) | train time per seed (s) | cache's teacher, test acc (%) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        half = next((h for h in rows if h["student"] == r["student"] and 2 * h["multiple"] == r["multiple"]), None)
        gain = f"{100 * (r['val_acc'] - half['val_acc']):+.2f} / {100 * (r['test_acc'] - half['test_acc']):+.2f}" \
            if half else "–"
        lines.append(f"| {r['student']} | {r['multiple']:g}× | {r['steps']:,} | {r['samples']:,} | "
                     f"{100 * r['val_acc']:.2f} ± {100 * r['val_acc_std']:.2f} | "
                     f"{100 * r['test_acc']:.2f} ± {100 * r['test_acc_std']:.2f} | {gain} | {r['seconds']:.0f} | "
                     f"{100 * r['teacher']:.2f} |")
    return "\n".join(lines)


def picture(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6), dpi=120)
    for name in dict.fromkeys(r["student"] for r in rows):
        mine = [r for r in rows if r["student"] == name]
        ax.errorbar([r["steps"] for r in mine], [100 * r["test_acc"] for r in mine],
                    yerr=[100 * r["test_acc_std"] for r in mine], marker="o", capsize=4, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("optimizer steps (batch 128)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy against budget (mean ± std over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def kept_multiples(params_path: str, names: list[str], work: Path) -> list[float]:
    """The budgets (as multiples of each student's own) whose finished runs are in `work`, and 1x."""
    found = {1.0}
    for name in names:
        base = load_params(params_path).students[name].steps
        found |= {int(folder.name.rpartition("_")[2]) / base for folder in work.glob(f"{name}_*")
                  if (folder / "metrics.json").is_file()}
    return sorted(found)


def block(rows: list[dict], command: str, seeds: int, jobs: int, work: str, minutes: str = "") -> str:
    return (f"Made by `{command}` ({seeds} seeds, {jobs} at once{minutes}; `--render-only` redraws it from "
            f"`{work}`):\n\n{table(rows)}\n\n![accuracy against budget](budget.png)")


def render_committed(params_path: str = "params.yaml", names: tuple[str, ...] = ("ce", "kd"),
                     work: str = "data/budget") -> str:
    """The block from the runs kept in `work` (and the pipeline's own at 1x), as `--render-only` writes it."""
    multiples = kept_multiples(params_path, list(names), Path(work))
    seeds = load_params(params_path).students[names[0]].seeds
    rows = [run(params_path, name, k, seeds, Path(work), train=False, jobs=1) for name in names for k in multiples]
    command = "python benchmarks/budget_curve.py --multiples " + " ".join(f"{k:g}" for k in multiples)
    return block(rows, command, len(seeds), 3, work)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--students", nargs="+", default=["ce", "kd"])
    ap.add_argument("--multiples", type=float, nargs="+", default=[1, 2, 4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", default="data/budget", help="where the runs are written and kept")
    ap.add_argument("--docs", default="docs", help="folder of benchmarks.md and budget.png")
    ap.add_argument("--render-only", action="store_true", help="write table and picture from the runs in --work")
    ap.add_argument("--jobs", type=int, default=3, help="seeds trained at once (logitcache train-student --jobs)")
    args = ap.parse_args()
    work = Path(args.work)
    rows = [run(args.params, name, k, args.seeds, work, train=not args.render_only, jobs=args.jobs)
            for name in args.students for k in args.multiples
            if not args.render_only or finished(args.params, name, k, work)]
    for name in args.students:  # the DVC plot: one file per student, x = steps
        write_json(work / f"{name}.json", [{k: r[k] for k in ("steps", "test_acc", "test_acc_std", "val_acc")}
                                           for r in rows if r["student"] == name])
    text = table(rows)
    print(text)
    command = command_line("benchmarks/budget_curve.py", ap, args, skip=("render_only", "jobs"))
    minutes = "" if args.render_only else f", {sum(r['wall'] for r in rows) / 60:.0f} min here"
    docs = Path(args.docs)
    write_block(docs / "results.md", "budget-curve", block(rows, command, len(args.seeds), args.jobs, args.work, minutes),
                heading="Converged baselines: accuracy against budget")
    picture(rows, docs / "budget.png")


if __name__ == "__main__":
    main()
