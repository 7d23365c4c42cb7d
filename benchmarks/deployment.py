"""The deployment table: size, parameters, accuracy, latency and throughput per runtime of exported models.

Reads the metrics.json that `logitcache export CHECKPOINT --name NAME` wrote for each model
(the DVC stages export@teacher, export@kd and export@pruned), plus the pruning figures,
prints the tables and writes them into docs/deployment.md between the `deployment` markers
(benchmarks/docblock.py).

    dvc repro export@teacher export@kd export@pruned
    python benchmarks/deployment.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from docblock import write_named

from logitcache.core import provenance
from logitcache.core.runtimes import RUNTIMES

NAMES = ("teacher", "kd", "pruned")


def runtime_table(models: dict[str, dict]) -> list[str]:
    lines = ["| model | arch | params | runtime | file | size (KiB) | test acc (%) | batch 1 median / p90 (ms) "
             "| batch 256 (img/s) |", "|" + "---|" * 9]
    for name, m in models.items():
        for key, spec in RUNTIMES.items():
            r, label = m[key], spec.label
            speed = (f"{r['latency_ms']:.3f} / {r['latency_p90_ms']:.3f} | {r['throughput_img_s']:,.0f}"
                     if "latency_ms" in r else "– | –")
            lines.append(f"| {name} | {m['model']} | {m['params']:,} | {label} | `{r['file']}` | {r['bytes'] / 1024:.1f} "
                         f"| {100 * r['test_acc']:.2f} | {speed} |")
    return lines


def compression_table(models: dict[str, dict], reference: str) -> list[str]:
    ref = models[reference]
    lines = [f"| model | params | params vs {reference} | ONNX fp32 (KiB) | int8 (KiB) | bytes vs {reference} fp32: "
             "fp32 / int8 | int8 accuracy drop (points) |", "|" + "---|" * 7]
    for name, m in models.items():
        fp32, int8 = m["onnx_fp32"]["bytes"], m["onnx_int8"]["bytes"]
        lines.append(f"| {name} | {m['params']:,} | {ref['params'] / m['params']:.1f}× | {fp32 / 1024:.1f} | "
                     f"{int8 / 1024:.1f} | {ref['onnx_fp32']['bytes'] / fp32:.1f}× / "
                     f"{ref['onnx_fp32']['bytes'] / int8:.1f}× | {100 * m['onnx_int8']['acc_drop']:.2f} |")
    return lines


def pruning_table(prune: dict, recovered: dict | None) -> list[str]:
    after = "–" if recovered is None else f"{100 * recovered['test_acc']:.2f}"
    return ["| model | params | test acc (%) |", "|---|---|---|",
            f"| {prune['model']} teacher | {prune['params_before']:,} | {100 * prune['test_acc_before']:.2f} |",
            f"| pruned (ratio {prune['ratio']}), before recovery | {prune['params']:,} "
            f"({100 * prune['params_kept']:.1f} %) | {100 * prune['test_acc']:.2f} |",
            f"| pruned, distilled from the cache | {prune['params']:,} | {after} |"]


def render(deploy: str = "data/deploy", names: tuple[str, ...] = NAMES, prune: str = "data/pruned/metrics.json",
           recovered: str = "data/students/pruned/metrics.json") -> str:
    """The tables, from the exports' metrics.json (and the pruning's, when there is one)."""
    models = {n: json.loads((Path(deploy) / n / "metrics.json").read_text()) for n in names}
    first = models[names[0]]
    threads = {m["threads"] for m in models.values()}
    kernels = {m[provenance.KEY]["cpu_capability"] for m in models.values() if provenance.KEY in m}
    where = f"{', '.join(sorted(kernels))} kernels, " if kernels else ""
    lines = [f"{where}{', '.join(map(str, sorted(threads)))} thread(s) for every runtime "
             f"(`torch.get_num_threads()`, ONNX Runtime `intra_op_num_threads`); batch 1: median and p90 of "
             f"{first.get('latency_runs', 'the configured')} runs after warm-up; accuracy on the "
             f"{first['test_images']:,} test images.", "", *runtime_table(models), "",
             *compression_table(models, names[0])]
    if Path(prune).is_file():
        after = json.loads(Path(recovered).read_text()) if Path(recovered).is_file() else None
        lines += ["", *pruning_table(json.loads(Path(prune).read_text()), after)]
    return "\n".join(lines)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    print(write_named("deployment"))


if __name__ == "__main__":
    main()
