"""Benchmark: `train-student` against a bare training loop over tensors already in memory (the physical limit).

Side by side in one process, alternating, several rounds (each round starts one run
further on in the order, so no run always follows the same one), one epoch over the
training rows each:
  bare KD loop    | train-student kd (cache in memory) | train-student kd (cache read from disk)
  bare CE loop    | train-student ce (random crop + flip)
Both sides do the same work: `cnn_tiny`, channels-last, batch 128, SGD with Nesterov
momentum, a per-sample crop + flip view of every image (the bare loops take a whole
batch's views in one gather from a strided view of every image padded once, as it is and mirrored), KD at T = 4 plus
masked CE on 10 % labeled rows, or CE on every row. The bare loops keep nothing but the
model: no loader, no progress bar, no loss curves.

For `train-student` the time is the epoch's `seconds` in history.json: the loader (its
worker started for the epoch, every batch built: views rendered, targets taken), the
forward and backward passes, the optimiser and scheduler steps and the per-epoch loss
bookkeeping. Planning, model building, the test evaluation and the checkpoint are not in it.

    python benchmarks/student_loop.py                 # about 4-5 minutes on 2 CPU cores
    python benchmarks/student_loop.py --quick         # about 2 minutes: 2 rounds, no run from disk
    python benchmarks/student_loop.py --workers 0 1   # train-student at each loader worker count, side by side
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import as_strided

from logitcache.cache.reader import Cache
from logitcache.core.config import validate
from logitcache.core.data import holdout, load_split
from logitcache.core.models import build_model
from logitcache.core.training import make_optimizer, place
from logitcache.student.losses import masked_ce
from logitcache.student.methods.kd import kd_loss
from logitcache.student.plan import labeled_mask
from logitcache.student.train import train_student

BATCH, MODEL, PADDING, TEMPERATURE, ALPHA = 128, "cnn_tiny", 2, 4.0, 0.9


def student_settings(args, kind: str, out: str, **extra) -> dict:
    """The `students.<name>` section of the timed train-student run."""
    common = {"model": MODEL, "epochs": 1, "batch_size": BATCH, "lr": 0.05, "test_cache": None, "out": out, **extra}
    if kind == "ce":
        return {**common, "loss": {}, "augment": {"crop_padding": PADDING, "flip": True}, "labeled_fraction": 1.0}
    return {**common, "loss": {"kd": {"temperature": TEMPERATURE, "weight": ALPHA}}, "ce_weight": 1 - ALPHA,
            "caches": [args.cache], "labeled_fraction": 0.1}


def train_student_rate(args, kind: str, out: str, **extra) -> float:
    """Images/s of one train-student epoch, as its history records it."""
    params = validate({"data": {"root": args.data_root}, "students": {"b": student_settings(args, kind, out, **extra)}})
    train_student(params, "b")
    return json.loads((Path(out) / "history.json").read_text())[0]["img_per_s"]


class BareLoop:
    """The same student, batch, views and loss as train-student, as a plain loop over in-memory tensors."""

    def __init__(self, args, kind: str):
        params = validate({"data": {"root": args.data_root}, "students": {"b": student_settings(args, kind, "unused")}})
        self.cfg, self.kind = params.students["b"], kind
        train = load_split(params.data, "train")
        images = F.pad(train.images, [PADDING] * 4).numpy()
        both = np.ascontiguousarray(np.stack([images, images[..., ::-1]], axis=1))  # (N, 2, C, H+2p, W+2p)
        n, c, h, w = train.images.shape
        s = both.strides  # (N, flip, top, left, C, H, W): every crop of every image, as it is and mirrored, no copy
        self.windows = as_strided(both, (n, 2, 2 * PADDING + 1, 2 * PADDING + 1, c, h, w),
                                  (s[0], s[1], s[3], s[4], s[2], s[3], s[4]), writeable=False)
        self.labels = train.labels
        self.labeled = torch.from_numpy(labeled_mask(self.cfg, len(train), holdout(params.data, len(train))[0]))
        self.mean = torch.tensor(train.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(train.std).view(1, -1, 1, 1)
        if kind == "kd":
            with Cache(args.cache) as cache:
                self.views = torch.from_numpy(cache.view_params())  # (N, V, 4): seed, top, left, flip
                self.logits = cache.logits()  # (N, V, C) float32
        self.epoch = 0

    def epoch_rate(self) -> float:
        """Images/s of one epoch over every row, with a fresh model (as each train-student run has)."""
        torch.manual_seed(self.epoch)
        model = place(build_model(MODEL, self.windows.shape[4], int(self.labels.max()) + 1), torch.device("cpu"))
        model.train()
        optimizer, _ = make_optimizer(model.parameters(), self.cfg, 1)
        n = len(self.labels)
        start = time.perf_counter()
        order = torch.randperm(n)
        if self.kind == "kd":
            chosen = torch.randint(self.views.shape[1], (n,))
            params = self.views[order, chosen[order]]
        else:
            params = torch.stack([torch.randint(2 * PADDING + 1, (n,)), torch.randint(2 * PADDING + 1, (n,)),
                                  torch.randint(2, (n,))], dim=1)
            params = torch.cat([torch.full((n, 1), -1), params], dim=1)
        for lo in range(0, n, BATCH):
            rows, p = order[lo:lo + BATCH], params[lo:lo + BATCH]
            left = torch.where(p[:, 3] == 1, 2 * PADDING - p[:, 2], p[:, 2])  # mirrored crop: mirrored image's window
            x = torch.from_numpy(self.windows[rows.numpy(), p[:, 3].numpy(), p[:, 1].numpy(), left.numpy()])
            x = ((x.float() / 255 - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
            logits = model(x)
            if self.kind == "kd":
                teacher = self.logits[rows, chosen[rows]]
                loss = ALPHA * kd_loss(logits, [teacher], TEMPERATURE) + \
                    (1 - ALPHA) * masked_ce(logits, self.labels[rows], self.labeled[rows])
            else:
                loss = F.cross_entropy(logits, self.labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        self.epoch += 1
        return n / (time.perf_counter() - start)


def summary(name: str, rates: list[float]) -> str:
    return f"{name:<44} best {max(rates):7.0f}  median {statistics.median(rates):7.0f} img/s   " \
           f"rounds: {[round(r) for r in rates]}"


def ratio(name: str, ours: list[float], bare: list[float]) -> str:
    """Best to best, median to median, and the median of each round's own ratio (the two runs of a round are
    at most a few runs apart, so a change of the machine's speed between rounds cancels out of it)."""
    paired = [o / b for o, b in zip(ours, bare)]
    return f"{name:<44} {max(ours) / max(bare):.3f} best to best, " \
           f"{statistics.median(ours) / statistics.median(bare):.3f} median to median, " \
           f"{statistics.median(paired):.3f} median of the rounds' ratios {[round(x, 2) for x in paired]}"


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default="data/prepared")
    ap.add_argument("--cache", default="data/cache/train.h5")
    ap.add_argument("--workers", type=int, nargs="+", default=None,
                    help="loader workers of train-student; several: one run each (default: the params' default)")
    ap.add_argument("--rounds", type=int, default=3, help="alternate every run this many times")
    ap.add_argument("--quick", action="store_true", help="2 rounds and no run from disk")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, the CPU's cores)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    worker_counts = args.workers or [validate({"students": {"b": {}}}).students["b"].workers]
    rounds = 2 if args.quick else args.rounds
    bare = {"kd": BareLoop(args, "kd"), "ce": BareLoop(args, "ce")}
    runs = {"bare kd": lambda out: bare["kd"].epoch_rate()}
    for w in worker_counts:
        runs[f"train-student kd, in memory, workers {w}"] = \
            lambda out, w=w: train_student_rate(args, "kd", out, workers=w)
    if not args.quick:
        for w in worker_counts:
            runs[f"train-student kd, from disk, workers {w}"] = \
                lambda out, w=w: train_student_rate(args, "kd", out, workers=w, feature_budget_mb=0)
    runs["bare ce"] = lambda out: bare["ce"].epoch_rate()
    for w in worker_counts:
        runs[f"train-student ce, workers {w}"] = lambda out, w=w: train_student_rate(args, "ce", out, workers=w)
    rates = {name: [] for name in runs}
    print(f"{rounds} rounds, {torch.get_num_threads()} torch threads, {load()}", flush=True)
    names = list(runs)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for i, name in enumerate(names[r % len(names):] + names[:r % len(names)]):  # each round starts one
                rates[name].append(runs[name](f"{tmp}/{r}-{i}"))                          # run further on
                print(f"  round {r + 1}: {name:<44} {rates[name][-1]:7.0f} img/s   ({load()})", flush=True)
    print(f"done, {load()}")
    for name, values in rates.items():
        print(summary(name, values))
    for name, values in rates.items():
        if name.startswith("train-student"):
            print(ratio(name.replace("train-student ", "") + " / bare", values, rates[f"bare {name.split()[1][:2]}"]))


if __name__ == "__main__":
    main()
