"""How far top-k targets are from the full teacher distribution at T = 1, 2, 4, 8: one fill right at T = 1 against
the fill of each stored temperature (`dump.topk_temperatures`).

The logits are those of a randomly initialised linear head as wide as ResNet-18's (512 inputs, PyTorch's default
initialisation, fixed seed) on random post-ReLU features, scaled so that the mean top-1 probability at T = 1 is
`--top1` (a teacher's typical confidence). For each (classes, k) it prints and stores the mean over rows of the
total variation, of KL(full || top-k) and of the error of the mass outside the top k, in float64, with the
missing classes filled
- before: all with the one logit that gives them their leftover mass at T = 1 (the earlier cache layout);
- after: with the logit that gives them their leftover mass at T (`logitcache.cache.topk.logits_from_topk`).
Writes benchmarks/results/topk.json; `python benchmarks/docblock.py` renders its tables into docs/benchmarks.md.

    python benchmarks/topk.py            # under a minute
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from docblock import command_line, write_named

OUT = Path(__file__).parent / "results" / "topk.json"
SETUPS = [(10, 1), (10, 3), (10, 5), (100, 5), (100, 10), (100, 50), (1000, 5), (1000, 10), (1000, 50)]
TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
WIDTH = 512  # ResNet-18's penultimate width


def head_logits(classes: int, rows: int, top1: float, seed: int) -> tuple[torch.Tensor, float]:
    """Float64 logits of a random linear head on random post-ReLU features, scaled to mean top-1 probability
    `top1` at T = 1; and the scale."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(WIDTH, classes).double()
    with torch.no_grad():  # PyTorch's default initialisation, drawn from this seed
        bound = 1 / math.sqrt(WIDTH)
        head.weight.uniform_(-bound, bound, generator=gen)
        head.bias.uniform_(-bound, bound, generator=gen)
        raw = head(torch.randn(rows, WIDTH, generator=gen, dtype=torch.float64).relu())
    lo, hi = 0.0, 1e4
    for _ in range(100):  # the mean top-1 probability grows with the scale
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (raw * mid).softmax(-1).amax(-1).mean() < top1 else (lo, mid)
    return raw * lo, lo


def fills(logits: torch.Tensor, k: int, t: float) -> dict[str, torch.Tensor]:
    """The two reconstructions of `logits` at temperature t, in float64, through the cache's own transform."""
    from logitcache.cache.topk import logits_from_topk, topk_summary

    top = topk_summary(logits, k, (1.0, t))
    return {"before": logits_from_topk(top.values, top.indices, top.rest[..., 0], logits.shape[-1], 1.0),
            "after": top.logits(t)}


def distances(full: torch.Tensor, rebuilt: torch.Tensor, k: int, t: float) -> dict[str, float]:
    """Means over the rows of the softmaxes at t: total variation, KL(full || rebuilt), and the absolute error of
    the mass outside the top k."""
    log_p, log_q = (full / t).log_softmax(-1), (rebuilt / t).log_softmax(-1)
    top = full.topk(k, dim=-1).indices
    left = [1 - x.exp().gather(-1, top).sum(-1) for x in (log_p, log_q)]
    return {"tv": 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1).mean().item(),
            "kl": (log_p.exp() * (log_p - log_q)).sum(-1).mean().item(),
            "rest": (left[0] - left[1]).abs().mean().item()}


def measure(classes: int, k: int, rows: int, top1: float, seed: int) -> dict:
    logits, scale = head_logits(classes, rows, top1, seed)
    out = {"classes": classes, "k": k, "scale": scale, "top1_prob": logits.softmax(-1).amax(-1).mean().item(),
           "temperatures": {}}
    for t in TEMPERATURES:
        out["temperatures"][f"{t:g}"] = {f"{metric}_{name}": value for name, rebuilt in fills(logits, k, t).items()
                                         for metric, value in distances(logits, rebuilt, k, t).items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000, help="logit rows (random feature vectors) per class count")
    ap.add_argument("--top1", type=float, default=0.7, help="mean top-1 probability at T = 1 the logits are scaled to")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    results = [measure(c, k, args.rows, args.top1, args.seed) for c, k in SETUPS]
    record = {"command": command_line("benchmarks/topk.py", ap, args, skip=("out",)),
              "logits": f"a random linear head {WIDTH} -> classes (PyTorch's default initialisation, seed "
                        f"{args.seed}) on {args.rows} random post-ReLU feature vectors, scaled to a mean top-1 "
                        f"probability of {args.top1:g} at T = 1",
              "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(write_named("topk") if Path(args.out) == OUT else render(record))


def render(record: dict) -> str:
    """Three tables, total variation, KL(full || top-k) and the leftover mass's error, per (classes, k) and
    temperature: before -> after."""
    lines = [f"Made by `{record['command']}`. Logits: {record['logits']}. Each cell is the mean over the rows, "
             "in float64, with the missing classes given one logit right at T = 1 (before) → the logit right at "
             "the cell's T (after, `dump.topk_temperatures`):"]
    for metric, title in (("tv", "total variation"), ("kl", "KL(full ‖ top-k)"),
                          ("rest", "\\|error\\| of the mass outside the top k")):
        lines += ["", f"| {title} | k | top-1 prob. (T = 1) | "
                  + " | ".join(f"T = {t}" for t in record["results"][0]["temperatures"]) + " |",
                  "|---|---|---|" + "---|" * len(record["results"][0]["temperatures"])]
        for r in record["results"]:
            cells = " | ".join(f"{f[f'{metric}_before']:.3g} → {f[f'{metric}_after']:.3g}"
                               for f in r["temperatures"].values())
            lines.append(f"| {r['classes']:,} classes | {r['k']} | {r['top1_prob']:.2f} | {cells} |")
    return "\n".join(lines)


def render_committed() -> str:
    return render(json.loads(OUT.read_text()))


if __name__ == "__main__":
    main()
