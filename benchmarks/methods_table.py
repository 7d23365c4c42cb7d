"""Every distillation method on the default data, at one budget of optimizer steps: docs/methods.md's results.

Each method trains the same student (params.yaml's `kd` student: model, labeled fraction,
batch, learning rate) from the same cache, for the same number of optimizer steps, with
3 seeds; the cross-entropy baseline loops over its labeled rows as often as that budget
needs. The script writes the results table between markers in docs/methods.md and a
picture (accuracy ± std per method) beside it.

    python benchmarks/methods_table.py                 # after `dvc repro dump_teacher`
    python benchmarks/methods_table.py --seeds 0 --steps 200 --work /tmp/methods --out /tmp/methods   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from docblock import command_line, write_block

from logitcache.core.config import load_params
from logitcache.student.methods import describe, methods
from logitcache.student.train import train_student

# Each method's settings for the default data: cnn_tiny's nodes against resnet8's cached layers.
SETTINGS = {
    "ce": ({}, 1.0),
    "kd": ({"kd": {"temperature": 4.0, "weight": 0.9}}, 0.1),
    "dkd": ({"dkd": {"warmup": 1.0}}, 1.0),
    "fitnets": ({"fitnets": {"pairs": [["block2", "layer2"]]}}, 1.0),
    "at": ({"at": {"pairs": [["block2", "layer2"]]}}, 1.0),
    "sp": ({"sp": {"pairs": [["block3", "layer3"]], "form": "embedding"}}, 1.0),
    "rkd": ({"rkd": {"student": "block3", "teacher": "layer3"}}, 1.0),
    "pkt": ({"pkt": {"student": "block3", "teacher": "layer3"}}, 1.0),
    "crd": ({"crd": {"student": "block3", "teacher": "layer3"}}, 1.0),
}


def run(params_path: str, name: str, seeds: list[int], steps: int | None, out: Path, train: bool = True) -> dict:
    """Train one method for every seed (unless `train` is False: read the runs already in `out`), and sum it up."""
    loss, ce_weight = SETTINGS[name]
    steps = steps or load_params(params_path).students["kd"].steps
    overrides = [f"students.kd.loss={json.dumps(loss)}", f"students.kd.ce_weight={ce_weight}",
                 f"students.kd.steps={steps}", f"students.kd.seeds={json.dumps(seeds)}",
                 f"students.kd.out={out / name}"]
    params = load_params(params_path, overrides)
    start = time.perf_counter()
    if train:
        train_student(params, "kd")
    metrics = json.loads((out / name / "metrics.json").read_text())
    runs = [json.loads((out / name / "runs" / f"seed{s}" / "history.json").read_text()) for s in seeds]
    steps = runs[0][-1]["steps"]
    seconds = statistics.mean(sum(h["seconds"] for h in hist) for hist in runs)
    return {"name": name, "steps": steps, "acc": [metrics["per_seed"][str(s)]["test_acc"] for s in seeds],
            "agreement": metrics["agreement"], "seconds_per_step": seconds / steps,
            "wall": time.perf_counter() - start, "reads": reads(loss)}


def reads(loss: dict) -> list[str]:
    """What the method, with these settings, reads from the cache."""
    out = []
    for name, settings in loss.items():
        needs = methods()[name].needs(methods()[name].Config.model_validate(settings))
        out += (["logits"] if needs.logits else []) + [f"teacher {t}" for t in needs.teacher] + \
            [f"bank {t}" for t in needs.banks]
    return out


def table(rows: list[dict]) -> str:
    info = {m["name"]: m for m in map(describe, methods().values())}
    ce = next(r for r in rows if r["name"] == "ce")
    lines = ["| method | family | reads from the cache | steps | test acc (%) | agreement (%) | time per step vs CE |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        m = info.get(r["name"], {"family": "baseline", "reads": []})
        mean = 100 * statistics.mean(r["acc"])
        std = 100 * statistics.stdev(r["acc"]) if len(r["acc"]) > 1 else 0.0
        reads = ", ".join(r["reads"]) or "nothing (labels only)"
        lines.append(f"| {r['name']} | {m['family']} | {reads} | {r['steps']:,} | {mean:.2f} ± {std:.2f} | "
                     f"{100 * r['agreement']:.2f} | {r['seconds_per_step'] / ce['seconds_per_step']:.2f}× |")
    return "\n".join(lines)


def picture(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    means = [100 * statistics.mean(r["acc"]) for r in rows]
    stds = [100 * statistics.stdev(r["acc"]) if len(r["acc"]) > 1 else 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=120)
    ax.bar(names, means, yerr=stds, capsize=4, color=["#888888" if n == "ce" else "#3b75af" for n in names])
    ax.set_ylim(min(means) - 3, max(means) + 2)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("cnn_tiny student, 10 % labels, the same optimizer steps (mean ± std over seeds)")
    ax.axhline(means[names.index("ce")], color="#888888", linestyle="--", linewidth=1)
    fig.tight_layout()
    fig.savefig(path)


def block(rows: list[dict], command: str, seeds: int, minutes: str = "") -> str:
    return (f"Made by `{command}` ({seeds} seeds{minutes}; `--render-only` rewrites this table from the runs in "
            f"`--work`):\n\n{table(rows)}\n\n![test accuracy per method](methods.png)")


def render_committed(work: str = "data/methods") -> str:
    """The block from the runs kept in `work` (the method names and seeds those runs recorded)."""
    names = [name for name in SETTINGS if (Path(work) / name / "metrics.json").is_file()]
    seeds = json.loads((Path(work) / names[0] / "metrics.json").read_text())["seeds"]
    rows = [run("params.yaml", name, seeds, None, Path(work), train=False) for name in names]
    return block(rows, "python benchmarks/methods_table.py", len(seeds))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps of every run; default: students.kd.steps")
    ap.add_argument("--methods", nargs="+", default=list(SETTINGS))
    ap.add_argument("--work", default="data/methods", help="where the runs are written")
    ap.add_argument("--out", default="docs", help="folder of methods.md and methods.png")
    ap.add_argument("--render-only", action="store_true", help="write the table from the runs already in --work")
    args = ap.parse_args()
    rows = [run(args.params, name, args.seeds, args.steps, Path(args.work), train=not args.render_only)
            for name in args.methods]
    text = table(rows)
    command = command_line("benchmarks/methods_table.py", ap, args, skip=("render_only",))
    minutes = "" if args.render_only else f", {sum(r['wall'] for r in rows) / 60:.0f} min here"
    print(text)
    out = Path(args.out)
    write_block(out / "methods.md", "methods-results", block(rows, command, len(args.seeds), minutes),
                heading="Results on the default data")
    picture(rows, out / "methods.png")


if __name__ == "__main__":
    main()
