"""Benchmark: what a cached target costs per student epoch, and what it saves against online distillation.

Side by side in one run, same student, data, views, batch size and seeds:
  CE-only epoch (random crop+flip, no targets) | KD from cache | KD + one feature hint from cache | KD --online
and prints the ratios (goals: KD <= 1.10 x CE, feature <= 1.25 x CE, online / cached >= 3 for resnet20 -> small CNN).
With --parity-seeds N it also trains cached and --online KD students for N seeds and prints mean test accuracy.

    python benchmarks/student_epoch.py --cache data/cache/train.h5 --teacher data/teacher/teacher.pt
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from logitcache.core.config import validate
from logitcache.student.train import train_student


def run(data_root, student: dict, out: str) -> dict:
    params = validate({"data": {"root": data_root}, "students": {"b": {**student, "out": out}}})
    return train_student(params, "b")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default="data/prepared")
    ap.add_argument("--cache", default="data/cache/train.h5")
    ap.add_argument("--test-cache", default="data/cache/test.h5")
    ap.add_argument("--teacher", default="data/teacher/teacher.pt")
    ap.add_argument("--model", default="cnn_tiny")
    ap.add_argument("--teacher-layer", default="layer2")
    ap.add_argument("--student-layer", default="block2")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="alternate the runs this many times; best of each")
    ap.add_argument("--parity-seeds", type=int, default=0)
    ap.add_argument("--parity-epochs", type=int, default=3)
    args = ap.parse_args()
    base = {"model": args.model, "epochs": args.epochs, "workers": args.workers, "caches": [args.cache],
            "test_cache": args.test_cache, "teacher": args.teacher,
            "loss": {"kd": {"temperature": 4.0, "weight": 0.9}}, "ce_weight": 0.1}
    hint = {"pairs": [[args.student_layer, args.teacher_layer]]}
    modes = {
        "ce (same aug)": {**base, "loss": {}, "ce_weight": 1.0, "augment": {"crop_padding": 2, "flip": True}},
        "kd (cache)": base,
        "kd+feature (cache)": {**base, "loss": {**base["loss"], "fitnets": hint}},
        "kd (--online)": {**base, "online": True},
    }
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: [] for name in modes}
        for r in range(args.repeats):
            for i, (name, cfg) in enumerate(modes.items()):
                runs[name].append(run(args.data_root, cfg, f"{tmp}/{r}-{i}")["seconds_per_epoch"])
        seconds = {name: min(values) for name, values in runs.items()}
        for name, s in seconds.items():
            print(f"{name:<22} {s:8.2f} s/epoch   runs: {[round(v, 2) for v in runs[name]]}")
        ce = seconds["ce (same aug)"]
        print(f"kd / ce            : {seconds['kd (cache)'] / ce:.3f} (goal <= 1.10)")
        print(f"kd+feature / ce    : {seconds['kd+feature (cache)'] / ce:.3f} (goal <= 1.25)")
        print(f"online / cached kd : {seconds['kd (--online)'] / seconds['kd (cache)']:.2f}x (goal >= 3)")
        if args.parity_seeds:
            cached, online = [], []
            parity = {**base, "epochs": args.parity_epochs}
            for seed in range(args.parity_seeds):
                cached.append(run(args.data_root, {**parity, "seed": seed}, f"{tmp}/c{seed}")["test_acc"])
                online.append(run(args.data_root, {**parity, "seed": seed, "online": True}, f"{tmp}/o{seed}")["test_acc"])
            print(f"parity over {args.parity_seeds} seeds: cached {statistics.mean(cached):.4f} {cached}, "
                  f"online {statistics.mean(online):.4f} {online}, "
                  f"difference {100 * (statistics.mean(cached) - statistics.mean(online)):+.2f} points (goal within 0.3)")


if __name__ == "__main__":
    main()
