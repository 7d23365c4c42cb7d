"""Benchmark: dump-teacher throughput against bare teacher inference, and the compression choices.

Runs side by side in one process, on the same teacher, data, views and batch size:
  1. bare inference: the same loader and teacher forward pass, nothing kept;
  2. dump-teacher: logits plus one feature layer written to HDF5 (default compression);
and prints the ratio (goal: >= 0.95). Then it writes the same cached arrays with each
compression filter and prints bytes per sample and write throughput.

    python benchmarks/dump_throughput.py --samples 6000 --views 4 --layer layer2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from logitcache.core.config import DataConfig, validate
from logitcache.core.data import load_split, prepare_data
from logitcache.core.features import load_teacher
from logitcache.core.training import select_device
from logitcache.core.views import Normalizer, ViewRenderer, ViewSpec, view_params
from logitcache.teacher.dump import ViewDataset, dump_teacher


def bare_inference(params, teacher, n: int) -> float:
    """Samples/s of the teacher alone over the same rendered views and batches as the dump."""
    cfg = params.dump
    split = load_split(params.data, "train")
    spec = ViewSpec.from_config(cfg.augment)
    view_table = view_params(spec, cfg.seed, np.arange(len(split)), cfg.views)
    device = select_device(cfg.device)
    model = teacher.model.to(device).eval()
    prepare = Normalizer(split.mean, split.std)
    per_batch = max(1, cfg.batch_size // view_table.shape[1])
    loader = DataLoader(Subset(ViewDataset(split, view_table, ViewRenderer(spec)), range(n)), batch_size=per_batch,
                        num_workers=cfg.workers, pin_memory=device.type == "cuda")
    amp = device.type == "cuda" and cfg.amp
    start = time.perf_counter()
    for images, _, _ in loader:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            model(prepare(images.flatten(0, 1).to(device, non_blocking=True))).float().cpu()
    return n / (time.perf_counter() - start)


def dump_rate(params, n: int) -> tuple[float, Path]:
    start = time.perf_counter()
    [path] = dump_teacher(params)
    return n / (time.perf_counter() - start), path


def compression_table(path: Path, n: int) -> list[tuple[str, float, float]]:
    """(filter, bytes/sample, MB/s) for writing the cached arrays again with each filter."""
    with h5py.File(path, "r") as f:
        arrays = {name: f[name][()] for name in ("logits", *(f"features/{k}" for k in f["features"]))}
        chunks = {name: f[name].chunks for name in arrays}
    raw = sum(a.nbytes for a in arrays.values())
    rows = []
    for compression in ("none", "lzf", "gzip"):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "c.h5"
            start = time.perf_counter()
            with h5py.File(out, "w") as g:
                for name, a in arrays.items():
                    g.create_dataset(name, data=a, chunks=chunks[name], fletcher32=True,
                                     compression=None if compression == "none" else compression)
            seconds = time.perf_counter() - start
            rows.append((compression, out.stat().st_size / n, raw / seconds / 1e6))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="data/teacher/teacher.pt")
    ap.add_argument("--samples", type=int, default=6000)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--layer", default="layer2")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="alternate bare/dump this many times; best of each")
    args = ap.parse_args()
    teacher = load_teacher(args.teacher)
    bare, dumped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = {"root": f"{tmp}/data", "train_limit": args.samples, "test_limit": 100}
        prepare_data(DataConfig(**data))  # a split of exactly --samples rows
        for r in range(args.repeats):
            params = validate({
                "data": data, "teacher": {"model": teacher.info["model"]},
                "dump": {"teacher": args.teacher, "views": args.views, "layers": [args.layer], "splits": ["train"],
                         "batch_size": args.batch_size, "workers": args.workers, "out": f"{tmp}/run{r}"},
            })
            bare.append(bare_inference(params, teacher, args.samples))
            rate, path = dump_rate(params, args.samples)
            dumped.append(rate)
        b, d = max(bare), max(dumped)
        print(f"teacher {teacher.info['model']}, {args.samples} samples x {args.views} views, layer {args.layer}, "
              f"batch {args.batch_size} images, device {select_device('auto').type}, torch threads {torch.get_num_threads()}")
        print(f"bare inference : {b:8.1f} samples/s ({b * args.views:.0f} img/s)   runs: {[round(x) for x in bare]}")
        print(f"dump-teacher   : {d:8.1f} samples/s ({d * args.views:.0f} img/s)   runs: {[round(x) for x in dumped]}")
        print(f"ratio dump/bare: {d / b:.3f} (goal >= 0.95)")
        print("compression   bytes/sample   write MB/s (logits + features, fletcher32)")
        for name, per_sample, mbs in compression_table(path, args.samples):
            print(f"{name:<12}  {per_sample:12.0f}   {mbs:10.1f}")


if __name__ == "__main__":
    main()
