"""KD students trained from top-k caches against KD students trained from the full logits, on 100 classes.

No download: the data set is synthetic, 32x32 RGB images in 100 classes (`synthetic_cifar100`), written in
CIFAR-100's on-disk format (cifar-100-python/train, test, meta) and prepared with logitcache's own
`prepare_data(dataset="cifar100")`. Each class is a fixed smooth random prototype (seeded), the sum of the
prototype of its superclass (20 of 5 classes each, as CIFAR-100's coarse labels) and one of its own, so that
classes of a superclass look alike and a teacher's non-top-1 classes carry information. A sample is its class's
prototype randomly shifted, scaled in contrast and brightness, blended with a random other class's prototype
and covered with pixel noise.

Then, with logitcache's own stages: a teacher (`train_teacher`), a full-logit cache and top-k caches
(`dump_teacher`, `dump.topk: k`, the same views), and per configuration a student trained for the same number
of optimizer steps with every seed, selected on the validation rows and scored once on the test split:
- ce: cross-entropy alone (no cache), for reference;
- kd full: KD at T = 4 (weight 0.9, ce_weight 0.1) from the full logits;
- kd top-k: the same from each top-k cache (read at T = 4, one of `dump.topk_temperatures`).
Writes benchmarks/results/topk_students.json, one record per student architecture (a run of another `--student`
is kept beside it); `python benchmarks/docblock.py` renders their tables into docs/benchmarks.md.

    python benchmarks/topk_students.py           # cnn_small students (about a quarter of an hour on 2 CPU cores)
    python benchmarks/topk_students.py --student cnn_tiny
    python benchmarks/topk_students.py --quick   # tiny settings, to check the script end to end
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from docblock import command_line, write_named

OUT = Path(__file__).parent / "results" / "topk_students.json"
CLASSES, SUPERCLASSES, SIDE = 100, 20, 32
TARGETS = {None: "labels only", "full": "full logits"}
MARK = ".topk_students"  # in the work folder: the script may empty it


# ---------------------------------------------------------------- the data set

def smooth_fields(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """n smooth random RGB images (n, 3, SIDE, SIDE): Gaussian noise on a cells x cells grid, upsampled bicubically,
    each scaled to zero mean and unit standard deviation."""
    grid = torch.from_numpy(rng.standard_normal((n, 3, cells, cells)))
    fields = F.interpolate(grid, size=(SIDE, SIDE), mode="bicubic", align_corners=False).numpy()
    fields -= fields.mean(axis=(1, 2, 3), keepdims=True)
    return fields / fields.std(axis=(1, 2, 3), keepdims=True)


def prototypes(seed: int) -> np.ndarray:
    """(CLASSES, 3, SIDE, SIDE): each class its superclass's field (class // 5) plus a finer field of its own."""
    rng = np.random.default_rng(seed)
    coarse, own = smooth_fields(rng, SUPERCLASSES, 4), smooth_fields(rng, CLASSES, 6)
    protos = coarse[np.arange(CLASSES) // (CLASSES // SUPERCLASSES)] + own
    return protos / protos.std(axis=(1, 2, 3), keepdims=True)


def samples(protos: np.ndarray, per_class: int, rng: np.random.Generator, shift: int, blend: float,
            noise: float) -> tuple[np.ndarray, np.ndarray]:
    """per_class uint8 images (N, 3, SIDE, SIDE) of every class, in a random order, and their labels."""
    labels = rng.permutation(np.repeat(np.arange(len(protos)), per_class))
    n = len(labels)
    images = protos[labels].copy()
    dy, dx = rng.integers(-shift, shift + 1, (2, n))
    for i in range(n):  # a random translation (wrapping round, so nothing is lost)
        images[i] = np.roll(images[i], (dy[i], dx[i]), axis=(1, 2))
    other = (labels + rng.integers(1, len(protos), n)) % len(protos)  # never the sample's own class
    weight = rng.uniform(0, blend, (n, 1, 1, 1))
    images = (1 - weight) * images + weight * protos[other]
    images = images * rng.uniform(0.6, 1.4, (n, 1, 1, 1)) + rng.normal(0, 0.3, (n, 3, 1, 1))
    images += noise * rng.standard_normal(images.shape)
    return np.clip(np.round(128 + 48 * images), 0, 255).astype(np.uint8), labels


def synthetic_cifar100(root: Path, train_per_class: int, test_per_class: int, seed: int = 0, shift: int = 4,
                       blend: float = 0.5, noise: float = 0.8) -> None:
    """Write <root>/cifar-100-python/{train,test,meta} as torchvision's CIFAR100 reads them: pickled dicts with
    `data` (N, 3072) uint8 rows (the R, G and B planes), `fine_labels` and `coarse_labels`; `meta` holds the
    class names. These pickles are files this script writes itself, so unpickling them (torchvision does) is safe."""
    protos = prototypes(seed)
    rng = np.random.default_rng(seed + 1)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, per_class in (("train", train_per_class), ("test", test_per_class)):
        images, labels = samples(protos, per_class, rng, shift, blend, noise)
        record = {"data": images.reshape(len(images), -1), "fine_labels": labels.tolist(),
                  "coarse_labels": (labels // (CLASSES // SUPERCLASSES)).tolist()}
        (folder / name).write_bytes(pickle.dumps(record))
    (folder / "meta").write_bytes(pickle.dumps({
        "fine_label_names": [f"class{c:02d}" for c in range(CLASSES)],
        "coarse_label_names": [f"superclass{s:02d}" for s in range(SUPERCLASSES)]}))


def trust_written_files() -> None:
    """torchvision checks CIFAR files against the md5 sums of the published ones, which files written here cannot
    have; it then reads them for real. Skip only the md5 check (as tests/test_data.py does), in this process."""
    import torchvision.datasets.cifar

    torchvision.datasets.cifar.check_integrity = lambda path, md5=None: Path(path).is_file()


# ---------------------------------------------------------------- the runs

def configurations(ks: list[int]) -> list[tuple[str, str | None]]:
    """(name, cache) of every student: ce without a cache, kd from the full logits, kd from each top-k cache."""
    return [("ce", None), ("kd_full", "full"), *[(f"kd_top{k}", f"top{k}") for k in ks]]


def params_for(args: argparse.Namespace, work: Path) -> dict:
    """params.yaml's sections for every stage of this benchmark (each student's section comes from `student_section`)."""
    data = {"dataset": "cifar100", "source": str(work / "raw"), "root": str(work / "prepared"),
            "validation": args.validation}
    teacher = {"model": args.teacher, "epochs": args.teacher_epochs, "batch_size": 128, "lr": 0.1,
               "workers": 0, "out": str(work / "teacher")}
    return {"data": data, "teacher": teacher}


def dump_section(args: argparse.Namespace, work: Path, cache: str) -> dict:
    section = {"teacher": str(work / "teacher" / "teacher.pt"), "views": args.views, "layers": [],
               "workers": 0, "out": str(work / "cache" / cache)}
    if cache != "full":  # the test split is read only for agreement with the teacher: every student reads full's
        section.update(topk=int(cache.removeprefix("top")), splits=["train"])
    return section


def student_section(args: argparse.Namespace, work: Path, name: str, cache: str | None) -> dict:
    section = {"model": args.student, "steps": args.steps, "evaluations": args.evaluations, "lr": args.lr,
               "batch_size": 128, "seeds": args.seeds, "workers": 0, "latency": False,
               "test_cache": str(work / "cache" / "full" / "test.h5"), "out": str(work / "students" / name)}
    if cache is None:
        section.update(loss={}, augment={"crop_padding": 2, "flip": True})
    else:
        section.update(loss={"kd": {"temperature": args.temperature, "weight": 0.9}}, ce_weight=0.1,
                       caches=[str(work / "cache" / cache / "train.h5")])
    return section


def run(args: argparse.Namespace) -> dict:
    from logitcache.core.config import DataConfig, validate
    from logitcache.core.data import prepare_data
    from logitcache.core.provenance import environment
    from logitcache.student.train import train_student
    from logitcache.teacher.dump import dump_teacher
    from logitcache.teacher.train import train_teacher

    work = Path(args.work)
    if work.exists() and any(work.iterdir()) and not (work / MARK).exists():
        raise SystemExit(f"{work} holds files this script did not write; give --work an empty or new folder")
    shutil.rmtree(work, ignore_errors=True)  # every run starts from nothing: its figures are those of this command
    work.mkdir(parents=True)
    (work / MARK).write_text("made by benchmarks/topk_students.py, which empties this folder on every run\n")
    trust_written_files()
    timings, start = {}, time.perf_counter()
    synthetic_cifar100(work / "raw", args.train_per_class, args.test_per_class, args.data_seed, args.shift,
                       args.blend, args.noise)
    base = params_for(args, work)
    prepare_data(DataConfig(**base["data"]))
    timings["data"] = time.perf_counter() - start

    start = time.perf_counter()
    teacher = train_teacher(validate(base))
    timings["teacher"] = time.perf_counter() - start
    caches = ["full", *[f"top{k}" for k in args.topk]]
    start = time.perf_counter()
    for cache in caches:
        dump_teacher(validate({**base, "dump": dump_section(args, work, cache)}))
    timings["dump"] = time.perf_counter() - start

    students = {}
    for name, cache in configurations(args.topk):
        start = time.perf_counter()
        params = validate({**base, "students": {name: student_section(args, work, name, cache)}})
        metrics = train_student(params, name, jobs=args.jobs)
        timings[name] = time.perf_counter() - start
        students[name] = {
            "cache": cache, "loss": params.students[name].loss, "test_acc": metrics["test_acc"],
            "test_acc_std": metrics["test_acc_std"], "val_acc": metrics["val_acc"], "val_acc_std": metrics["val_acc_std"],
            "per_seed": {seed: {"test_acc": m["test_acc"], "val_acc": m["val_acc"], "selected_step": m["selected_step"]}
                         for seed, m in metrics["per_seed"].items()},
            "test_top5": metrics["test_top5"], "agreement": metrics.get("agreement"),
            "kl_to_teacher": metrics.get("kl_to_teacher"), "steps": int(metrics["steps"]),
            "samples": int(metrics["samples"]), "train_seconds": metrics["train_seconds"],
            "environment": metrics["environment"]}
        print(f"{name}: test {100 * metrics['test_acc']:.2f} ± {100 * metrics['test_acc_std']:.2f} %")
    return {"teacher": {"model": args.teacher, "epochs": args.teacher_epochs, "test_acc": teacher["test_acc"],
                        "val_acc": teacher.get("val_acc")},
            "students": students, "seconds": timings, "environment": environment().as_dict()}


# ---------------------------------------------------------------- the record and its table

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny settings, to check the script (its record stays in --work)")
    ap.add_argument("--train-per-class", type=int, default=140, help="training images per class (validation included)")
    ap.add_argument("--test-per-class", type=int, default=40)
    ap.add_argument("--validation", type=int, default=2000, help="training rows held out for selection")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--shift", type=int, default=4, help="largest shift of a sample from its prototype (pixels)")
    ap.add_argument("--blend", type=float, default=0.5, help="largest weight of the other class's prototype")
    ap.add_argument("--noise", type=float, default=0.8, help="pixel noise, in prototype standard deviations")
    ap.add_argument("--teacher", default="resnet8")
    ap.add_argument("--teacher-epochs", type=int, default=10)
    ap.add_argument("--views", type=int, default=4, help="cached views per training image (pad-and-crop, flip)")
    ap.add_argument("--topk", type=int, nargs="+", default=[10, 5])
    ap.add_argument("--student", default="cnn_small")
    ap.add_argument("--steps", type=int, default=1000, help="optimizer steps (batch 128) of every student")
    ap.add_argument("--evaluations", type=int, default=5, help="validation scores per run; the best is kept")
    ap.add_argument("--lr", type=float, default=0.1, help="peak learning rate of every student")
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=3, help="seeds trained at once (train-student --jobs)")
    ap.add_argument("--work", default="data/topk_students", help="folder of the data, teacher, caches and students")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    command = command_line("benchmarks/topk_students.py", ap, args, skip=("out", "work", "quick"))
    if args.quick:
        command += " --quick"
        args.train_per_class, args.test_per_class, args.validation = 6, 2, 100
        args.teacher_epochs, args.steps, args.evaluations, args.views = 1, 10, 2, 2
    begin = time.perf_counter()
    record = {"command": command,
              "data": {"classes": CLASSES, "superclasses": SUPERCLASSES, "train_per_class": args.train_per_class,
                       "test_per_class": args.test_per_class, "validation": args.validation, "seed": args.data_seed,
                       "shift": args.shift, "blend": args.blend, "noise": args.noise},
              "setup": {"views": args.views, "topk": args.topk, "student": args.student, "steps": args.steps,
                        "evaluations": args.evaluations, "lr": args.lr, "temperature": args.temperature,
                        "seeds": args.seeds, "jobs": args.jobs},
              **run(args)}
    record["minutes"] = (time.perf_counter() - begin) / 60
    if args.quick:  # the record stays in the work folder
        (Path(args.work) / "topk_students.json").write_text(json.dumps(record, indent=1) + "\n")
        print(render(record))
        return
    out = Path(args.out)
    runs = [r for r in (json.loads(out.read_text())["runs"] if out.exists() else [])
            if r["setup"]["student"] != args.student]  # a run of another student architecture is kept
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": [*runs, record]}, indent=1) + "\n")
    print(write_named("topk-students") if out == OUT else render(record))


def render(record: dict) -> str:
    """One row per student: test accuracy mean ± std over the seeds, each seed's, validation accuracy."""
    s, d, t = record["setup"], record["data"], record["teacher"]
    env = record["environment"]
    lines = [
        f"Made by `{record['command']}` ({record['minutes']:.0f} min here; torch {env['torch']}, "
        f"{env['cpu_capability']} kernels; teacher and dumps on {env['threads']} threads, each student on "
        f"{student_threads(record)}, {s['jobs']} seeds at once). "
        f"Synthetic 100-class 32x32 data (shifts up to {d['shift']} px, blend weight up to {d['blend']:g}, "
        f"noise {d['noise']:g}), {d['train_per_class']} training images a class "
        f"({d['validation']:,} held out for selection) and {d['test_per_class']} test images a class; "
        f"teacher {t['model']} ({t['epochs']} epochs), test accuracy {100 * t['test_acc']:.2f} %; "
        f"{s['views']} cached views an image. Every student is a {s['student']} trained for {s['steps']:,} "
        f"steps (batch 128, lr {s['lr']:g}), its best of {s['evaluations']} validation scores kept, "
        f"seeds {', '.join(map(str, s['seeds']))}; KD at T = {s['temperature']:g} with weight 0.9 and "
        "ce_weight 0.1, CE with pad-and-crop and flip augmentation:",
        "",
        "| student | targets | test acc (%), mean ± std | per seed (%) | val acc (%) | agreement with the teacher (%) |",
        "|---|---|---|---|---|---|"]
    for name, r in record["students"].items():
        targets = TARGETS.get(r["cache"]) or f"top-{r['cache'].removeprefix('top')} + leftover mass"
        seeds = " / ".join(f"{100 * v['test_acc']:.2f}" for v in r["per_seed"].values())
        agreement = "–" if r["agreement"] is None else f"{100 * r['agreement']:.2f}"
        lines.append(f"| {name} | {targets} | {100 * r['test_acc']:.2f} ± {100 * r['test_acc_std']:.2f} | {seeds} | "
                     f"{100 * r['val_acc']:.2f} ± {100 * r['val_acc_std']:.2f} | {agreement} |")
    return "\n".join(lines)


def student_threads(record: dict) -> str:
    threads = {r["environment"]["threads"] for r in record["students"].values()
               if isinstance(r["environment"], dict)}
    return " or ".join(map(str, sorted(threads))) + " thread" + "s" * (threads != {1}) if threads else "its threads"


def render_committed() -> str:
    """One paragraph and table per student architecture, in the order they were run."""
    return "\n\n".join(render(record) for record in json.loads(OUT.read_text())["runs"])


if __name__ == "__main__":
    main()
