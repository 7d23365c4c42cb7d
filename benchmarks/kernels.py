"""What pinning the CPU kernels costs: training steps/s of the default teacher and student under each kernel setting.

Each setting runs in a subprocess of its own (the kernels are chosen when torch starts), one after the other,
in alternating rounds; each reports images/s of SGD steps (batch 128, random images of the default data's
shape, same seed) for the teacher's model and the student's, and a hash of the weights after those steps, so
the table shows both the cost of a setting and whether it trains other bits. Writes
benchmarks/results/kernels.json; `python benchmarks/docblock.py` renders its table into
docs/reproducibility.md.

    python benchmarks/kernels.py                       # a few minutes
    python benchmarks/kernels.py --rounds 1 --steps 10 # a quick look
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from docblock import write_named

SETTINGS = {  # name -> the environment variables that choose the kernels (logitcache.core.provenance.PINS)
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE"},
}
MODELS = {"teacher": "resnet8", "student": "cnn_tiny"}
OUT = Path(__file__).parent / "results" / "kernels.json"


def measure(model_name: str, steps: int, batch: int = 128) -> dict:
    """SGD steps of `model_name` on fixed random images: images/s after two warm-up steps, weights' hash."""
    import torch

    from logitcache.core.models import build_model

    torch.manual_seed(0)
    model = build_model(model_name, 1, 10).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    images = torch.randn(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    weights = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
    return {"img_per_s": steps * batch / seconds, "weights_sha256": hashlib.sha256(weights).hexdigest()}


def child(steps: dict[str, int]) -> None:
    """In the subprocess: every model's figures and the environment, as one JSON line."""
    from logitcache.core.provenance import environment

    figures = {role: measure(MODELS[role], n) for role, n in steps.items()}
    print(json.dumps({"environment": environment().as_dict(), **figures}))


def run(setting: str, steps: dict[str, int], threads: int | None) -> dict:
    env = {**{k: v for k, v in os.environ.items() if k not in SETTINGS["avx2"]}, **SETTINGS[setting]}
    env |= {"OMP_NUM_THREADS": str(threads)} if threads else {}
    load = os.getloadavg()[0]
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(steps)], env=env, check=True,
                          capture_output=True, text=True)
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "load": [load, os.getloadavg()[0]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40, help="timed teacher steps; the student runs 5 times as many")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each run (0: torch's default); one, "
                    "as each seed of a student trains under --jobs 3, is steadier on a busy machine")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))
    steps = {"teacher": args.steps, "student": 5 * args.steps}
    rounds = []
    for r in range(args.rounds):  # each round starts one setting further on, so each takes every place in turn
        order = list(SETTINGS)[r % len(SETTINGS):] + list(SETTINGS)[:r % len(SETTINGS)]
        rounds.append({name: run(name, steps, args.threads) for name in order})
        print(f"round {r + 1}: " + ", ".join(f"{n} {f['teacher']['img_per_s']:.0f}/{f['student']['img_per_s']:.0f} "
                                              "img/s" for n, f in rounds[-1].items()), flush=True)
    result = {"command": " ".join(["python benchmarks/kernels.py", *sys.argv[1:]]), "cpu": cpu_name(),
              "steps": steps, "batch": 128, "settings": SETTINGS, "rounds": rounds}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(write_named("kernels") if Path(args.out) == OUT else render(result))


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.is_file() else []:
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return "unknown CPU"


def render(result: dict) -> str:
    """The table of a kernels.json: per setting, best images/s of each model and its ratio to the native kernels."""
    best = {name: {role: max(r[name][role]["img_per_s"] for r in result["rounds"]) for role in MODELS}
            for name in result["settings"]}
    first = result["rounds"][0]
    loads = [load for r in result["rounds"] for run in r.values() for load in run["load"]]
    lines = [f"Made by `{result['command']}` on {result['cpu']}, {first['native']['environment']['threads']} "
             f"torch thread(s) per run, torch {first['native']['environment']['torch']}; best of {len(result['rounds'])} "
             f"alternating rounds, each setting in its own process, batch {result['batch']}; the machine's load "
             f"average was {min(loads):.1f}–{max(loads):.1f} during the runs (the other jobs on its cores slow "
             "every setting, so read the ratios):", "",
             "| setting | environment | `get_cpu_capability()` | teacher (resnet8) img/s | vs native | "
             "student (cnn_tiny) img/s | vs native | teacher's weights after the steps |",
             "|---|---|---|---|---|---|---|---|"]
    for name, env in result["settings"].items():
        pins = " ".join(f"`{k}={v}`" for k, v in env.items()) or "none"
        ratio = {role: best[name][role] / best["native"][role] for role in MODELS}
        same = first[name]["teacher"]["weights_sha256"] == first["native"]["teacher"]["weights_sha256"]
        lines.append(f"| {name} | {pins} | {first[name]['environment']['cpu_capability']} | "
                     f"{best[name]['teacher']:,.0f} | {ratio['teacher']:.2f}× | {best[name]['student']:,.0f} | "
                     f"{ratio['student']:.2f}× | {'the same bits as native' if same else 'other bits than native'} |")
    return "\n".join(lines)


def render_committed() -> str:
    return render(json.loads(OUT.read_text()))


if __name__ == "__main__":
    main()
