"""ImageNet-style data at 224 pixels, side by side in one run, and a projection for ImageNet-1k from the rates.

On a generated JPEG tree (benchmarks/jpeg_tree.py), with a ResNet-50 teacher (torchvision architecture, random
weights: only its cost matters) imported with resize 256 / crop 224 and random_resized_crop views:

  memory      peak RSS of prepare-data, dump-teacher and train-student at two tree sizes, 10x apart
  input       the student's input pipeline (index -> decode -> box at 224) against a bare PIL decode +
              torchvision resized_crop loop over the same files and boxes (goal >= 0.9)
  dump        dump-teacher, with no DataLoader worker and with one (its default), against bare ResNet-50
              inference over the same views, decoded beforehand (goal >= 0.95)
  student     cached against online KD epochs, ResNet-50 -> MobileNetV2 at 224, and the ratio the two models'
              bare training costs predict
  projection  ImageNet-1k on paper, from the rates measured here and the GPU rates given as arguments

Every speed figure at 1 and 2 threads. Writes benchmarks/results/imagenet_scale.json and renders its tables into
docs/benchmarks.md (`python benchmarks/docblock.py` renders them again from the JSON).

    python benchmarks/imagenet_scale.py                  # about 15 minutes on 2 cores
    python benchmarks/imagenet_scale.py --quick          # a look, in about 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from docblock import command_line, write_named  # noqa: E402
from jpeg_tree import write_tree  # noqa: E402

OUT = Path(__file__).parent / "results" / "imagenet_scale.json"
IMAGENET = {"train": 1_281_167, "val": 50_000, "classes": 1000, "bytes": 140e9}  # ImageNet-1k's published sizes
FOLDERS = "data.folders={train: train, test: val}"


def cli(*args: str, env: dict | None = None) -> int:
    """Run one logitcache command in a fresh process; its peak RSS in bytes (the largest of it and its workers)."""
    wrapper = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(done.returncode)")
    done = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "logitcache.cli", *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode:
        raise SystemExit(f"logitcache {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return int(done.stdout.split()[-1]) * 1024


class Workspace:
    """A tree, its prepared index, the imported teacher and a cache, in one temporary folder."""

    def __init__(self, root: Path, classes: int, train: int, val: int, teacher: str, views: int):
        self.root, self.tree, self.teacher_arch = root, root / "tree", teacher
        write_tree(self.tree, classes, {"train": train, "val": val})
        self.data = ["-S", "data.dataset=imagefolder", "-S", f"data.source={self.tree}", "-S",
                     f"data.root={root / 'prepared'}", "-S", FOLDERS, "-S", "data.validation=10"]
        self.classes, self.views = classes, views

    def prepare(self) -> int:
        return cli("prepare-data", *self.data)

    def import_teacher(self) -> int:
        import torch
        import torchvision

        torch.manual_seed(0)
        arch = getattr(torchvision.models, self.teacher_arch)(num_classes=self.classes)
        torch.save(arch.state_dict(), self.root / "teacher.pth")
        return cli("import-teacher", str(self.root / "teacher.pth"), "--arch", f"torchvision:{self.teacher_arch}",
                   "--resize", "256", "--crop", "224", "--out", str(self.root / "teacher"), *self.data)

    def dump(self) -> int:
        return cli("dump-teacher", "--teacher", str(self.root / "teacher" / "teacher.pt"), "--views", str(self.views),
                   "--out", str(self.root / "cache"), "-S", "dump.augment.kind=random_resized_crop", "-S",
                   "dump.workers=0", "-S", "dump.layers=[]", "-S", "dump.batch_size=32", *self.data)

    def student(self, steps: int = 4) -> int:
        params = self.root / "student.yaml"
        params.write_text(json.dumps({"students": {"s": {
            "model": "mobilenet_v2", "loss": {"kd": {"temperature": 4}}, "steps": steps, "evaluations": 1,
            "batch_size": 16, "image_size": 160, "workers": 0, "latency": False,
            "caches": [str(self.root / "cache" / "train.h5")], "test_cache": str(self.root / "cache" / "test.h5"),
            "out": str(self.root / "student")}}}))
        return cli("train-student", "s", "--params", str(params), *self.data)


def memory(work: Path, classes: int, per_class: int) -> dict:
    """Peak RSS of each command at two tree sizes 10x apart (ResNet-18 teacher: the weights' share is constant;
    batches of 32 views and 16 images, which set the activations' share, fill up on either tree)."""
    rows = {}
    for n in (per_class, 10 * per_class):
        space = Workspace(work / f"memory{n}", classes, n, 1, "resnet18", views=2)
        figures = {"prepare-data": space.prepare()}
        space.import_teacher()
        figures["dump-teacher"] = space.dump()
        figures["train-student"] = space.student()
        index = sum((space.root / "prepared" / "imagefolder" / f"{s}_index.npz").stat().st_size for s in ("train", "test"))
        tree = sum(p.stat().st_size for p in space.tree.rglob("*.jpg"))
        rows[str(classes * n)] = {**figures, "index_bytes": index, "indexed_images": classes * (n + 1),
                                  "tree_bytes": tree, "decoded_bytes": _decoded_bytes(space.tree)}
    return rows


def _decoded_bytes(tree: Path) -> int:
    """What decoding every training image into one uint8 array would take."""
    from PIL import Image

    total = 0
    for path in (tree / "train").rglob("*.jpg"):
        with Image.open(path) as image:
            total += image.size[0] * image.size[1] * 3
    return total


def _median_rate(fn, count: int, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return count / statistics.median(times)


def input_pipeline(space: Workspace, batches: int, rounds: int) -> dict:
    """Images/s of the student's batches (decode, check, box at 224) and of a bare loop over the same pairs."""
    import torch
    from PIL import Image
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    from logitcache.core.config import validate
    from logitcache.student.plan import plan_run
    from logitcache.student.sources import make_batches

    params = validate({"data": _data(space), "students": {"s": {
        "model": "mobilenet_v2", "loss": {"kd": {}}, "steps": 1, "batch_size": 32, "image_size": 224,
        "caches": [str(space.root / "cache" / "train.h5")], "out": str(space.root / "unused")}}})
    plan = plan_run(params, params.students["s"], "s")
    dataset, sampler = make_batches(params.students["s"], plan)
    sampler.set_epoch(1)
    chosen = [pairs for pairs, _ in zip(sampler, range(batches))]
    boxes, split = plan.cache.views, plan.train

    def ours() -> None:
        for pairs in chosen:
            dataset[pairs]

    def bare() -> None:
        for pairs in chosen:
            out = []
            for row, view in pairs:
                pixels = np.asarray(Image.open(split.source / split.index.paths[row].decode()).convert("RGB"))
                image = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
                _, top, left, h, w, flip = (int(v) for v in boxes[row, view])
                x = TF.resized_crop(image, top, left, h, w, [224, 224], interpolation=InterpolationMode.BILINEAR,
                                    antialias=True)
                out.append(torch.flip(x, [-1]) if flip else x)
            torch.stack(out)

    count = batches * 32
    figures = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        rates = {"bare": [], "ours": []}
        for _ in range(rounds):  # alternating, so a slower moment of the machine falls on both
            rates["bare"].append(_median_rate(bare, count, 1))
            rates["ours"].append(_median_rate(ours, count, 1))
        bare_rate, our_rate = statistics.median(rates["bare"]), statistics.median(rates["ours"])
        figures[str(threads)] = {"bare_img_s": bare_rate, "ours_img_s": our_rate, "ratio": our_rate / bare_rate}
    return figures


def _data(space: Workspace) -> dict:
    return {"dataset": "imagefolder", "source": str(space.tree), "root": str(space.root / "prepared"),
            "folders": {"train": "train", "test": "val"}, "validation": 10}


def dump_speed(space: Workspace, samples: int) -> dict:
    """Views/s of dump-teacher (ResNet-50, train split, its first `samples` images, one view each), with no
    DataLoader worker (decoding between batches) and with one (its default: decoding while the teacher runs),
    against the bare forward pass over the same views, rendered beforehand, in the same batches."""
    import torch

    from logitcache.core.features import load_teacher

    teacher = load_teacher(space.root / "teacher" / "teacher.pt")
    cli("prepare-data", "-S", "data.dataset=imagefolder", "-S", f"data.source={space.tree}", "-S",
        f"data.root={space.root / 'prepared'}", "-S", FOLDERS, "-S", "data.validation=10", "-S",
        f"data.train_limit={samples}")
    figures = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        bare_rate, rates = None, {}
        for workers in (0, 1):
            bare, dump = _dump_pair(space, teacher, samples, workers, space.root / f"dump{threads}-{workers}")
            bare_rate = bare_rate or bare
            rates[workers] = dump
        figures[str(threads)] = {"bare_views_s": bare_rate, "dump_views_s": rates[0], "ratio": rates[0] / bare_rate,
                                 "dump_worker_views_s": rates[1], "worker_ratio": rates[1] / bare_rate}
    cli("prepare-data", *space.data)  # the full index again, for what follows
    return figures


def _dump_pair(space: Workspace, teacher, samples: int, workers: int, out: Path) -> tuple[float, float]:
    """(bare views/s, dump views/s) of one configuration."""
    import torch

    from logitcache.core.config import validate
    from logitcache.teacher.dump import dump_split, prepare_split

    params = validate({"data": {**_data(space), "train_limit": samples}, "dump": {
        "teacher": str(space.root / "teacher" / "teacher.pt"), "out": str(out), "views": 1, "workers": workers,
        "layers": [], "batch_size": 32, "splits": ["train"], "augment": {"kind": "random_resized_crop"}}})
    job = prepare_split(params, teacher, "train", torch.device("cpu"))
    views = torch.stack([job.dataset[i][0][0] for i in range(len(job.dataset))])

    def bare() -> None:
        with torch.inference_mode():
            for lo in range(0, len(views), 32):
                job.extractor(job.prepare(views[lo:lo + 32]))

    bare_rate = _median_rate(bare, len(views), 1)
    out.mkdir(parents=True)
    start = time.perf_counter()
    dump_split(params, teacher, "train")
    return bare_rate, len(views) / (time.perf_counter() - start)


def student_speed(space: Workspace, steps: int) -> dict:
    """Seconds per step of cached and online KD (ResNet-50 -> MobileNetV2 at 224, batch 16), and the ratio the
    two models' bare costs predict: (student step + teacher forward) / student step."""
    import torch

    from logitcache.core.config import validate
    from logitcache.student.train import train_student

    figures = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        seconds = {}
        for online in (False, True):
            settings = {"model": "mobilenet_v2", "loss": {"kd": {"temperature": 4}}, "steps": steps,
                        "evaluations": 1, "batch_size": 16, "workers": 0, "latency": False, "online": online,
                        "teacher": str(space.root / "teacher" / "teacher.pt"),
                        "caches": [str(space.root / "cache" / "train.h5")],
                        "out": str(space.root / f"student-{threads}-{online}")}
            metrics = train_student(validate({"data": _data(space), "students": {"s": settings}}), "s")
            seconds["online" if online else "cached"] = metrics["train_seconds"] / steps
        figures[str(threads)] = {**{f"{k}_s_per_step": v for k, v in seconds.items()},
                                 "speedup": seconds["online"] / seconds["cached"], **_bare_costs(space)}
    return figures


def _bare_costs(space: Workspace, batch: int = 16, rounds: int = 3) -> dict:
    import torch
    import torchvision

    student = torchvision.models.mobilenet_v2(num_classes=space.classes)
    teacher = getattr(torchvision.models, space.teacher_arch)(num_classes=space.classes).eval()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 224, 224)

    def step() -> None:
        optimizer.zero_grad()
        student(x).logsumexp(1).mean().backward()
        optimizer.step()

    def forward() -> None:
        with torch.inference_mode():
            teacher(x)

    step(), forward()
    s = batch / _median_rate(step, batch, rounds)
    t = batch / _median_rate(forward, batch, rounds)
    return {"bare_student_step_s": s, "bare_teacher_forward_s": t, "predicted_speedup": (s + t) / s}


def projection(figures: dict, gpu_student_img_s: float, gpu_teacher_img_s: float) -> dict:
    """ImageNet-1k from the measured rates (per CPU core: the 1-thread figures) and the given GPU rates."""
    sizes = figures["memory"]
    big = sizes[max(sizes, key=int)]
    n = IMAGENET["train"]
    index_per_image = big["index_bytes"] / big["indexed_images"]
    decode_per_core = figures["input"]["1"]["ours_img_s"]
    view_bytes = 2 * IMAGENET["classes"] + 10  # float16 logits of 1000 classes and a box, uncompressed
    return {
        "index_disk_bytes": index_per_image * (n + IMAGENET["val"]),
        "index_ram_bytes": index_per_image * n,
        "decode_cores_per_gpu": gpu_student_img_s / decode_per_core,
        "dump_hours_per_view": n / gpu_teacher_img_s / 3600,
        "dump_decode_cores": gpu_teacher_img_s / decode_per_core,
        "cache_bytes": {str(v): n * v * view_bytes for v in (10, 100)},
        "gpu_student_img_s": gpu_student_img_s, "gpu_teacher_img_s": gpu_teacher_img_s,
        "cpu_teacher_views_s_2_threads": figures["dump"]["2"]["dump_views_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=50)
    ap.add_argument("--per-class", type=int, default=40, help="training images per class of the speed tree")
    ap.add_argument("--memory-classes", type=int, default=10)
    ap.add_argument("--memory-per-class", type=int, default=5, help="the smaller memory tree; the other is 10x")
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dump-samples", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--gpu-student-img-s", type=float, default=2500.0,
                    help="MobileNetV2 training images/s on the user's GPU (an assumption, not measured here)")
    ap.add_argument("--gpu-teacher-img-s", type=float, default=3000.0,
                    help="ResNet-50 inference images/s on the user's GPU (an assumption, not measured here)")
    ap.add_argument("--quick", action="store_true", help="smaller trees and fewer rounds")
    args = ap.parse_args()
    if args.quick:
        args.classes, args.per_class, args.rounds, args.dump_samples, args.steps = 10, 8, 1, 16, 2
        args.memory_per_class = 2
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        figures = {"setup": {"classes": args.classes, "per_class": args.per_class, "views": args.views}}
        figures["memory"] = memory(work, args.memory_classes, args.memory_per_class)
        print(json.dumps(figures["memory"], indent=1), flush=True)
        space = Workspace(work / "speed", args.classes, args.per_class, 2, "resnet50", args.views)
        space.prepare(), space.import_teacher(), space.dump()
        figures["input"] = input_pipeline(space, batches=4, rounds=args.rounds)
        print(json.dumps(figures["input"], indent=1), flush=True)
        figures["dump"] = dump_speed(space, args.dump_samples)
        print(json.dumps(figures["dump"], indent=1), flush=True)
        figures["student"] = student_speed(space, args.steps)
        print(json.dumps(figures["student"], indent=1), flush=True)
    figures["projection"] = projection(figures, args.gpu_student_img_s, args.gpu_teacher_img_s)
    from logitcache.core.provenance import environment

    figures["environment"] = environment().as_dict()
    figures["command"] = command_line("benchmarks/imagenet_scale.py", ap, args, skip=("quick",)) + \
        (" --quick" if args.quick else "")
    OUT.write_text(json.dumps(figures, indent=1) + "\n")
    for name in ("imagenet-memory", "imagenet-speed", "imagenet-projection"):
        write_named(name)
    print(render_speed(figures))


def _mb(value: float) -> str:
    return f"{value / 2**20:,.0f} MiB"


def render_memory(figures: dict) -> str:
    rows = ["| training images | prepare-data | dump-teacher | train-student | index on disk | JPEG bytes | "
            "decoded as one array |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for n, f in sorted(figures["memory"].items(), key=lambda kv: int(kv[0])):
        rows.append(f"| {int(n):,} | {_mb(f['prepare-data'])} | {_mb(f['dump-teacher'])} | {_mb(f['train-student'])} "
                    f"| {f['index_bytes'] / 1024:,.0f} KiB | {_mb(f['tree_bytes'])} | {_mb(f['decoded_bytes'])} |")
    return "\n".join([f"Peak RSS, `{figures['command']}`:", "", *rows])


def render_speed(figures: dict) -> str:
    rows = ["| threads | input pipeline: ours / bare (img/s) | dump-teacher / bare ResNet-50 (views/s) | "
            "with one loader worker | online / cached KD s per step (measured) | predicted from bare costs |",
            "|---:|---|---|---|---|---:|"]
    for t in ("1", "2"):
        i, d, s = figures["input"][t], figures["dump"][t], figures["student"][t]
        rows.append(f"| {t} | {i['ours_img_s']:.0f} / {i['bare_img_s']:.0f} = **{i['ratio']:.2f}** "
                    f"| {d['dump_views_s']:.2f} / {d['bare_views_s']:.2f} = **{d['ratio']:.2f}** "
                    f"| {d['dump_worker_views_s']:.2f} / {d['bare_views_s']:.2f} = **{d['worker_ratio']:.2f}** "
                    f"| {s['online_s_per_step']:.2f} / {s['cached_s_per_step']:.2f} = **{s['speedup']:.2f}x** "
                    f"| {s['predicted_speedup']:.2f}x |")
    return "\n".join([f"`{figures['command']}`:", "", *rows])


def render_projection(figures: dict) -> str:
    p = figures["projection"]
    gib = 2**30
    return "\n".join([
        f"From the rates above (1 CPU thread = 1 core) and the GPU rates given ({p['gpu_student_img_s']:,.0f} "
        f"MobileNetV2 training img/s, {p['gpu_teacher_img_s']:,.0f} ResNet-50 inference img/s: assumptions, not "
        "measured here):", "",
        "| ImageNet-1k (1.28 M training images) | figure |", "|---|---:|",
        f"| disk for the index (train + val) | {p['index_disk_bytes'] / gib:.2f} GiB |",
        f"| RAM per process for the training index | {p['index_ram_bytes'] / gib:.2f} GiB |",
        f"| CPU cores to decode for one GPU training the student | {p['decode_cores_per_gpu']:.0f} |",
        f"| dump-teacher on one such GPU, per view of every image | {p['dump_hours_per_view']:.2f} h "
        f"(decoding for it: {p['dump_decode_cores']:.0f} cores) |",
        f"| dump-teacher on this CPU (2 threads), per view of every image | "
        f"{1_281_167 / p['cpu_teacher_views_s_2_threads'] / 3600:,.0f} h |",
        *(f"| cache at {v} views (float16 logits of 1000 classes + box, uncompressed) | {b / gib:,.0f} GiB |"
          for v, b in p["cache_bytes"].items()),
    ])


def render_committed(part: str):
    return lambda: {"memory": render_memory, "speed": render_speed, "projection": render_projection}[part](
        json.loads(OUT.read_text()))


if __name__ == "__main__":
    main()
