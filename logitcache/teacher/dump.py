"""Phase one: run the teacher once over every (sample, view) and write the HDF5 cache."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from logitcache import __version__
from logitcache.cache.format import FLOAT16_MAX, FORMAT_NAME, SCHEMA_VERSION, form_dataset, read_blocks, stored_forms
from logitcache.cache.reader import Cache
from logitcache.cache.topk import topk_summary
from logitcache.core import interrupt
from logitcache.core import imagefiles
from logitcache.core.config import DumpConfig, LayerSpec, Params
from logitcache.core.data import Split, load_split
from logitcache.core.distributed import Dist
from logitcache.core.errors import LogitcacheError
from logitcache.core.features import FeatureExtractor, Teacher, activation_side, load_teacher, stored_form
from logitcache.core.forms import FORMS
from logitcache.core.io import check_output_folder, output_lock
from logitcache.core.training import place, to_input
from logitcache.core.views import (
    BoxRenderer,
    ViewRenderer,
    ViewSpec,
    check_view_count,
    box_dtype,
    box_table,
    crop_flip_codes,
    eval_view,
    render_batch,
    stored_boxes,
    view_params,
)
from logitcache.teacher import shards
from logitcache.teacher.writer import BackgroundWriter, CacheWriter, refuse_existing


class ViewDataset(Dataset):
    """Sample i -> (its V views as uint8 (V, C, H, W), label, i), rendered from the stored parameters."""

    def __init__(self, split: Split, params: np.ndarray, renderer: ViewRenderer | BoxRenderer):
        self.split, self.params, self.renderer = split, params, renderer

    def __len__(self) -> int:
        return len(self.split)

    def first_view(self, i: int) -> torch.Tensor:
        """Sample i's view 0 alone, as (1, C, H, W)."""
        return self._render(self.split.read(i), self.params[i][:1])

    def __getitem__(self, i: int):
        return self._render(self.split.read(i), self.params[i]), self.split.labels[i], i

    def _render(self, image: torch.Tensor, params: np.ndarray) -> torch.Tensor:
        if isinstance(self.renderer, BoxRenderer):  # boxes of the original, each resized to the teacher's input
            return torch.stack([self.renderer(image, p) for p in params])
        return render_batch(self.renderer, image.expand(len(params), *image.shape), params)


def dump_teacher(params: Params, dist: Dist = Dist.single()) -> list[Path]:
    """Dump every configured split; returns the cache paths.

    In a world of one the rows go straight into each cache. Under torchrun every rank
    dumps its shard of each split and rank 0 merges the shards into the same cache.
    """
    check_output_folder(params.dump.out, "dump.out")
    with output_lock(params.dump.out, "dump-teacher", hold=dist.is_main):
        teacher = shards.on_every_rank(dist, lambda heartbeat: load_teacher(params.dump.teacher))
        _check_other_splits(params.dump, teacher)
        return [dump_split(params, teacher, split, dist) for split in params.dump.splits]


def _check_other_splits(cfg: DumpConfig, teacher: Teacher) -> None:
    """The caches of the splits this dump leaves alone must be of the same teacher: a training and a test cache of
    two teachers in one folder would give students targets of one and agreement scores against the other."""
    for split in ("train", "test"):
        path = cache_path(cfg, split)
        if split in cfg.splits or not path.is_file():
            continue
        try:
            with Cache(path) as cache:
                made_by = cache.teacher_sha256
        except LogitcacheError:  # damaged or busy: not this dump's to judge; its readers refuse it
            continue
        if made_by != teacher.sha256:
            raise LogitcacheError(f"{path} was made by another teacher checkpoint than {cfg.teacher}; dumping only "
                                  f"{', '.join(cfg.splits)} would leave caches of two teachers in {cfg.out}: dump every "
                                  "split (-S dump.splits=[train,test]) or choose another dump.out")


def cache_path(cfg: DumpConfig, split: str) -> Path:
    return Path(cfg.out) / f"{split}.h5"


@dataclass
class SplitJob:
    """One split's dump, prepared and validated the same way on every rank."""

    cfg: DumpConfig
    split: Split
    dataset: ViewDataset
    view_table: np.ndarray
    views: "StoredViews"
    extractor: FeatureExtractor
    device: torch.device
    amp: bool
    arrays: dict[str, tuple[tuple[int, ...], str]]
    record: dict
    run_key: str
    path: Path

    @property
    def prepare(self) -> Callable:
        """The teacher's input step for the rendered views."""
        return self.views.prepare

    @property
    def n(self) -> int:
        return len(self.view_table)

    @property
    def per_batch(self) -> int:
        """Samples per teacher batch (all their views go through together)."""
        return max(1, self.cfg.batch_size // self.view_table.shape[1])


@dataclass
class StoredViews:
    """How a dump renders its views and what it stores of them: the renderer, the teacher's input step, and the
    cache's view dataset (`views/code` for pad-and-crop, `views/box` for boxes) with its rows."""

    renderer: ViewRenderer | BoxRenderer
    prepare: Callable
    column: str
    rows: np.ndarray

    @property
    def dtype(self) -> str:
        return str(self.rows.dtype)


def _stored_views(cfg: DumpConfig, teacher: Teacher, split: Split, spec: ViewSpec, views: int | str
                  ) -> tuple[np.ndarray, StoredViews]:
    """Every (sample, view)'s parameters and how they are rendered and stored. Pad-and-crop views move the pixels
    of the data's array; box views are boxes of each original image, rendered at the teacher's input size."""
    check_view_count(spec, views, "dump.views")
    if not spec.boxes:
        if split.is_files:
            raise LogitcacheError(f"{split.dataset} is a folder of images of different sizes; pad-and-crop views need "
                                  "equal sizes: set dump.augment.kind=random_resized_crop")
        table = view_params(spec, cfg.seed, np.arange(len(split)), views)
        return table, StoredViews(*teacher.views_for(split, spec), "views/code", crop_flip_codes(table, spec))
    if views == "all":
        raise LogitcacheError("dump.views=all needs a finite policy; random_resized_crop views are drawn: give a number")
    pre = teacher.preprocess_for(split)
    if split.is_files and pre.crop is None:
        raise LogitcacheError(f"teacher {cfg.teacher} records no input size and the images of {split.dataset} differ "
                              "in size; import it with its preprocessing (import-teacher --resize 256 --crop 224)")
    table = box_table(spec, cfg.seed, split.sizes, views, (pre.resize, pre.crop))
    return table, StoredViews(*teacher.views_for(split, spec), "views/box", stored_boxes(table, box_dtype(split.sizes)))


def prepare_split(params: Params, teacher: Teacher, split_name: str, device: torch.device) -> SplitJob:
    cfg = params.dump
    split = load_split(params.data, split_name)
    _check_teacher_fits(teacher, split, params)
    spec = ViewSpec.from_config(cfg.augment)
    view_table, stored = _stored_views(cfg, teacher, split, spec, cfg.views if split_name == "train" else 1)
    dataset = ViewDataset(split, view_table, stored.renderer)
    specs = cfg.layer_specs()
    extractor = place(FeatureExtractor(teacher.model, [layer.name for layer in specs]), device).eval()
    amp = device.type == "cuda" and cfg.amp and cfg.logits_dtype == "float16"
    layers, classes = _layer_records(extractor, specs, dataset, stored.prepare, device)
    record = _metadata(cfg, teacher, split, spec, view_table, layers, stored)
    arrays = _layout(cfg, record, classes, stored)
    run_key = hashlib.sha256(json.dumps({**record, "batch": cfg.batch_size, "device": device.type, "amp": amp,
                                         "compression": cfg.compression}, sort_keys=True).encode()).hexdigest()
    return SplitJob(cfg, split, dataset, view_table, stored, extractor, device, amp, arrays, record, run_key,
                    cache_path(cfg, split_name))


def dump_split(params: Params, teacher: Teacher, split_name: str, dist: Dist = Dist.single()) -> Path:
    if dist.active:
        return _dump_split_sharded(params, teacher, split_name, dist)
    cfg = params.dump
    job = prepare_split(params, teacher, split_name, dist.device(cfg.device))
    writer = CacheWriter(job.path, job.n, job.arrays, job.run_key, cfg.compression, cfg.overwrite)
    try:
        if writer.rows_done:
            print(f"{writer.partial}: resuming at row {writer.rows_done:,} of {job.n:,}", flush=True)
        _fill(writer, job)
        path = _verify_and_finish(writer, job)
    finally:
        writer.close()
    shards.remove(path)  # leftovers of a killed torchrun run of this cache are of no use now
    return path


def _dump_split_sharded(params: Params, teacher: Teacher, split_name: str, dist: Dist) -> Path:
    """Every rank: validate, then dump its own shard; rank 0: merge once all are complete. Collective."""
    cfg = params.dump

    def prepare(heartbeat) -> SplitJob:
        job = prepare_split(params, teacher, split_name, dist.device(cfg.device))
        # the same refusal on every rank; only rank 0 also tries the file's lock (a reader holding it open)
        refuse_existing(job.path, cfg.overwrite, check_lock=dist.is_main)
        return job

    job = shards.on_every_rank(dist, prepare)
    plan = shards.plan(job.path, job.n, job.per_batch, dist.world_size)
    shards.on_every_rank(dist, lambda heartbeat: dump_shard(job, plan[dist.rank], progress=dist.is_main, heartbeat=heartbeat))
    shards.on_every_rank(dist, lambda heartbeat: merge_shards(job, plan, heartbeat) if dist.is_main else None)
    return job.path


def dump_shard(job: SplitJob, shard: shards.Shard, progress: bool = True,
               heartbeat: shards.HeartbeatFn = shards.no_heartbeat) -> None:
    """Write one rank's shard file (resumable on its own); a complete shard of this very command is kept."""
    if not shard.size:
        return
    if shards.finished(shard, job.run_key):
        shards.note(f"rank {shard.rank}: {shard.path} is complete, kept")
        return
    writer = CacheWriter(shard.path, shard.size, job.arrays, shard.run_key(job.run_key), job.cfg.compression,
                         overwrite=True)  # a complete shard of another command is replaced
    try:
        if writer.rows_done:
            shards.note(f"rank {shard.rank}: resuming {writer.partial} at row {writer.rows_done} of {shard.size}")
        _fill(writer, job, offset=shard.start, progress=progress,
              desc=f"dump {job.split.name} [rank {shard.rank} of {shard.world}]", heartbeat=heartbeat)
        writer.finish({"shard": shard.describe(job.run_key), "record": job.record})
    finally:
        writer.close()


def merge_shards(job: SplitJob, plan: list[shards.Shard], heartbeat: shards.HeartbeatFn = shards.no_heartbeat) -> Path:
    """Rank 0: copy the complete shards into the final cache, verify and score it like any dump, drop the shards."""
    shards.check(plan, job.run_key)
    cfg = job.cfg
    writer = CacheWriter(job.path, job.n, job.arrays, shards.merge_key(job.run_key, len(plan)), cfg.compression,
                         cfg.overwrite)
    try:
        shards.copy_into(writer, plan, heartbeat)
        path = _verify_and_finish(writer, job, heartbeat)
    finally:
        writer.close()
    shards.remove(path)
    return path


def _verify_and_finish(writer: CacheWriter, job: SplitJob, heartbeat: shards.HeartbeatFn = shards.no_heartbeat) -> Path:
    record = {**job.record, "teacher_accuracy": _verify_and_score(writer, job.split, job.record, heartbeat)}
    return writer.finish(record)


def _check_teacher_fits(teacher: Teacher, split: Split, params: Params) -> None:
    """Refuse, before any work, a teacher that is not the configured one or was made for other data or inputs.

    A teacher logitcache trained must be `teacher.model`, trained on this data; an imported one (from
    import-teacher) was made elsewhere and only has to fit the data's classes and channels."""
    cfg, info, path = params.dump, teacher.info, params.dump.teacher
    if "source" not in info and info["model"] != params.teacher.model:
        raise LogitcacheError(f"teacher checkpoint {path} holds a {info['model']} but teacher.model is "
                              f"{params.teacher.model}; set teacher.model={info['model']} or retrain the teacher")
    made_on = info.get("dataset", {}).get("name")
    if "dataset" in info and made_on != split.dataset:
        raise LogitcacheError(f"teacher {path} was trained on '{made_on}' but the data set is '{split.dataset}'; "
                              "use a teacher trained on this data")
    if "source" in info and info["num_classes"] != split.num_classes:
        raise LogitcacheError(f"teacher {path} has {info['num_classes']} outputs, the data has {split.num_classes} "
                              "classes; import it with --class-map (data class -> teacher output index)")
    channels = split.channels if teacher.preprocess else info["in_channels"]  # a recorded preprocessing converts
    if info["num_classes"] != split.num_classes or channels != split.channels:
        raise LogitcacheError(f"teacher {path} has {info['num_classes']} classes/{info['in_channels']} channels, "
                              f"data has {split.num_classes}/{split.channels}; retrain the teacher on this data")
    teacher.input_for(split)  # refuses channel counts it cannot convert
    if "mean" in info and (info["mean"], info["std"]) != (list(split.mean), list(split.std)):
        raise LogitcacheError(f"teacher {path} was trained with normalisation mean {info['mean']} std {info['std']}, "
                              f"the data has mean {list(split.mean)} std {list(split.std)}; retrain the teacher on this data")
    if cfg.topk is not None and cfg.topk >= split.num_classes:
        raise LogitcacheError(f"dump.topk={cfg.topk} must be below the class count {split.num_classes}; "
                              "use topk: null to store full logits")


@torch.inference_mode()
def _layer_records(extractor: FeatureExtractor, specs: list[LayerSpec], dataset: ViewDataset, prepare,
                   device) -> tuple[list[dict], int]:
    """Each layer's metadata record (activation side, stored forms with their shapes) and the class count,
    probed with a forward pass of the first sample's first view through `stored_form`, the function that computes
    every row."""
    probe = dataset.first_view(0)
    out = extractor(prepare(probe.to(device)))
    records = []
    for spec in specs:
        record = {"name": spec.name, "activation": activation_side(extractor.net, spec.name),
                  "forms": {form: FORMS[form].settings(spec) for form in spec.forms}}
        for form, info in record["forms"].items():
            info["shape"] = list(stored_form(out[spec.name].float(), form, record).shape[1:])
        records.append(record)
    return records, out["logits"].shape[1]


def _layout(cfg: DumpConfig, record: dict, classes: int, stored: StoredViews) -> dict[str, tuple[tuple[int, ...], str]]:
    v = record["views"]["count"]
    arrays = {"index": ((), "int64"), "labels": ((), "int64"), stored.column: (stored.rows.shape[1:], stored.dtype)}
    if cfg.topk:
        arrays["topk_values"] = ((v, cfg.topk), cfg.logits_dtype)
        arrays["topk_indices"] = ((v, cfg.topk), "int32")
        arrays["topk_rest"] = ((v, len(cfg.topk_temperatures)), "float32")
    else:
        arrays["logits"] = ((v, classes), cfg.logits_dtype)
    for (layer, form), shape in stored_forms(record).items():
        arrays[form_dataset(layer, form)] = ((v, *shape), "float16")
    return arrays


def _metadata(cfg: DumpConfig, teacher: Teacher, split: Split, spec: ViewSpec, view_table, layers: list[dict],
              stored: StoredViews) -> dict:
    return {
        "format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "logitcache_version": __version__,
        "teacher": teacher.identity(),
        "dataset": split.identity(),
        "transform": {"normalize": {"mean": list(split.mean), "std": list(split.std)}, "augment": spec.to_json(),
                      "preprocess": teacher.preprocess_for(split).to_json(),
                      **({"decoder": imagefiles.decoder()} if split.is_files else {}),
                      "input": "uint8 view -> teacher preprocess (resize, center crop, grey to RGB where the teacher "
                               "needs it, float32 / 255, its mean and std); normalize is the data set's"},
        "views": {"count": int(view_table.shape[1]), "mode": "all" if cfg.views == "all" and split.name == "train"
                  else ("eval" if view_table.shape[1] == 1 else "random"),
                  "seed": cfg.seed, **_view_record(spec, view_table)},
        "dtypes": {"logits": cfg.logits_dtype, "forms": "float16", "index": "int64", "labels": "int64",
                   stored.column: stored.dtype},
        "layers": layers,
        "topk": cfg.topk,
        **({"topk_temperatures": [float(t) for t in cfg.topk_temperatures]} if cfg.topk else {}),
    }


def _view_record(spec: ViewSpec, view_table: np.ndarray) -> dict:
    if spec.boxes:
        return {"eval_view": 0, "kind": spec.kind,
                "box": "views/box rows: (top, left, height, width, flip) in the original image's pixels"}
    return {"eval_view": eval_view(view_table, spec), "code": "(top * (2 * crop_padding + 1) + left) * 2 + flip"}


def _fill(writer: CacheWriter, job: SplitJob, offset: int = 0, progress: bool = True, desc: str | None = None,
          heartbeat: shards.HeartbeatFn = shards.no_heartbeat) -> None:
    """Samples offset + [rows_done, writer.n) into the writer's rows [rows_done, writer.n), in whole batches."""
    cfg, view_table, device = job.cfg, job.view_table, job.device
    v = view_table.shape[1]
    start = writer.rows_done
    rows = torch.utils.data.Subset(job.dataset, range(offset + start, offset + writer.n))
    loader = DataLoader(rows, batch_size=job.per_batch, num_workers=cfg.workers, pin_memory=device.type == "cuda")
    background = BackgroundWriter(writer)
    bar = tqdm(total=writer.n, initial=start, desc=desc or f"dump {job.split.name}", unit="sample",
               dynamic_ncols=True, mininterval=1.0, disable=not progress)
    try:
        for images, labels, index in loader:
            interrupt.check()
            b = len(labels)
            x = to_input(images.flatten(0, 1), device, job.prepare)
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=job.amp):
                out = job.extractor(x)
            batch = _rows(out, b, v, cfg, job.record["layers"], index)
            batch.update(index=index.numpy(), labels=labels.numpy(), **{job.views.column: job.views.rows[index.numpy()]})
            background.submit(int(index[0]) - offset, batch)
            bar.update(b)
            heartbeat()
    finally:
        bar.close()
        background.drain()


def _rows(out: dict[str, torch.Tensor], b: int, v: int, cfg: DumpConfig, layers: list[dict],
          index: torch.Tensor) -> dict[str, np.ndarray]:
    logits = out["logits"].float().reshape(b, v, -1)
    bad = ~torch.isfinite(logits).all(dim=(1, 2))
    if bad.any():
        raise LogitcacheError(f"teacher produced non-finite logits for sample(s) {index[bad.cpu()].tolist()[:20]}; "
                              "check the teacher checkpoint and the data")
    if cfg.logits_dtype == "float16" and logits.abs().max() > FLOAT16_MAX:
        worst = index[(logits.abs().amax(dim=(1, 2)) > FLOAT16_MAX).cpu()].tolist()[:20]
        raise LogitcacheError(f"logits of sample(s) {worst} overflow float16; set dump.logits_dtype=float32")
    rows = {}
    if cfg.topk:  # from the float32 logits, values then rounded to logits_dtype, as --online summarises
        top = topk_summary(logits, cfg.topk, cfg.topk_temperatures)
        rows["topk_values"] = top.values.cpu().numpy().astype(cfg.logits_dtype)
        rows["topk_indices"] = top.indices.cpu().numpy().astype(np.int32)
        rows["topk_rest"] = top.rest.cpu().numpy()
    else:
        rows["logits"] = logits.cpu().numpy().astype(cfg.logits_dtype)
    for layer in layers:
        for form in layer["forms"]:
            stored = stored_form(out[layer["name"]].float(), form, layer)
            stored = stored.reshape(b, v, *stored.shape[1:])
            bad = ~torch.isfinite(stored).flatten(1).all(dim=1)
            if bad.any():
                raise LogitcacheError(f"layer {layer['name']} ({form} form) of sample(s) {index[bad.cpu()].tolist()[:20]} "
                                      "is not finite in float16 (beyond ±65504); cache another layer or its "
                                      "attention form")
            rows[form_dataset(layer["name"], form)] = stored.cpu().numpy()
    return rows


def _verify_and_score(writer: CacheWriter, split: Split, record: dict,
                      heartbeat: shards.HeartbeatFn = shards.no_heartbeat) -> dict:
    """Read every array back in blocks (checksums, finiteness, index, labels) and score the teacher on it."""
    f, path = writer.file, writer.partial
    labels = split.labels.numpy()
    eval_index = record["views"]["eval_view"]
    hits = np.zeros(len(split), dtype=bool) if eval_index is not None else None
    correct = 0
    for name in writer.arrays:
        for lo, block in read_blocks(f[name], path):
            rows = slice(lo, lo + len(block))
            if block.dtype.kind == "f" and not np.isfinite(block).all():
                raise LogitcacheError(f"{path}: {name} holds non-finite values near row {lo}; rerun with --overwrite")
            if name == "index" and not np.array_equal(block, np.arange(rows.start, rows.stop)):
                raise LogitcacheError(f"{path}: index column is not 0..N-1 after the dump; rerun with --overwrite")
            if name == "labels" and not np.array_equal(block, labels[rows]):
                raise LogitcacheError(f"{path}: labels differ from the data set after the dump; rerun with --overwrite")
            if name == ("topk_indices" if record["topk"] else "logits"):
                top1 = block[..., 0] if record["topk"] else block.argmax(-1)
                match = top1 == labels[rows, None]
                correct += int(match.sum())
                if hits is not None:
                    hits[rows] = match[:, eval_index]
            heartbeat()
    total = len(split) * record["views"]["count"]
    return {"all_views": correct / total, "eval_view": None if hits is None else float(hits.mean())}
