"""The deployment table: size, parameters, accuracy, latency and throughput per runtime of exported models.

Reads the metrics.json that `logitcache export CHECKPOINT --name NAME` wrote for each model
(the DVC stages export@teacher, export@kd and export@pruned), plus the pruning figures,
prints the tables and writes them into docs/benchmarks.md and README.md between the
`<!-- deployment table -->` markers.

    dvc repro export@teacher export@kd export@pruned
    python benchmarks/deployment.py
"""

from __future__ import annotations

import argparse
import json
import platform
import re
from pathlib import Path

from logitcache.core.runtimes import RUNTIMES

START, END = "<!-- deployment table -->", "<!-- end deployment table -->"


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    found = re.search(r"model name\s*:\s*(.+)", info.read_text()) if info.is_file() else None
    return found.group(1).strip() if found else platform.processor() or "unknown CPU"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deploy", default="data/deploy", help="folder of <name>/metrics.json from logitcache export")
    parser.add_argument("--names", nargs="+", default=["teacher", "kd", "pruned"])
    parser.add_argument("--prune", default="data/pruned/metrics.json", help="metrics.json of logitcache prune")
    parser.add_argument("--recovered", default="data/students/pruned/metrics.json",
                        help="metrics.json of the pruned model after train-student pruned")
    parser.add_argument("--write", nargs="*", default=["docs/benchmarks.md", "README.md"])
    args = parser.parse_args()

    models = {n: json.loads((Path(args.deploy) / n / "metrics.json").read_text()) for n in args.names}
    threads = {m["threads"] for m in models.values()}
    lines = [f"{cpu_name()}, {', '.join(map(str, sorted(threads)))} thread(s) for every runtime "
             f"(`torch.get_num_threads()`, ONNX Runtime `intra_op_num_threads`); batch 1: median and p90 of "
             f"{models[args.names[0]].get('latency_runs', 'the configured')} runs after warm-up; accuracy on the "
             f"{models[args.names[0]]['test_images']:,} test images.", "", *runtime_table(models), "",
             *compression_table(models, args.names[0])]
    if Path(args.prune).is_file():
        recovered = json.loads(Path(args.recovered).read_text()) if Path(args.recovered).is_file() else None
        lines += ["", *pruning_table(json.loads(Path(args.prune).read_text()), recovered)]
    table = "\n".join(lines)
    print(table)
    for path in map(Path, args.write):
        text = path.read_text()
        if START not in text:
            raise SystemExit(f"{path} has no {START} ... {END} markers")
        head, _, rest = text.partition(START)
        path.write_text(f"{head}{START}\n{table}\n{END}{rest.partition(END)[2]}")


if __name__ == "__main__":
    main()
