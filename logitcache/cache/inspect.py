"""`logitcache inspect`: what a cache holds, and whether it still agrees with its teacher."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from logitcache.cache.format import form_dataset, open_h5, read_metadata
from logitcache.cache.reader import Cache
from logitcache.cache.topk import TopK, topk_summary
from logitcache.core.config import DataConfig
from logitcache.core.data import load_split
from logitcache.core.errors import LogitcacheError
from logitcache.core.features import FeatureExtractor, load_teacher, stored_form
from logitcache.core.views import render_rows


def describe(path: str | Path) -> dict:
    """Summary of any cache file, complete or not (an unfinished .partial reports complete: false)."""
    path = Path(path)
    with open_h5(path) as f:
        if "rows_done" not in f.attrs:  # a finished cache: refuse what a reader would refuse
            read_metadata(f, path)
        attrs = {k: _json(v) for k, v in f.attrs.items()}
        arrays = {}
        f.visititems(lambda name, obj: arrays.__setitem__(name, (obj.shape, str(obj.dtype)))
                     if isinstance(obj, h5py.Dataset) else None)
    n = arrays.get("index", ((0,),))[0][0]
    size = path.stat().st_size
    return {"path": str(path), "complete": attrs.get("complete") is True, "teacher": attrs.get("teacher"),
            "dataset": attrs.get("dataset"), "preprocess": (attrs.get("transform") or {}).get("preprocess"),
            "samples": n, "views": attrs.get("views"), "layers": attrs.get("layers"),
            "forms": _forms(attrs.get("layers"), arrays),
            "topk": attrs.get("topk"), "topk_temperatures": attrs.get("topk_temperatures"),
            "teacher_accuracy": attrs.get("teacher_accuracy"),
            "rows_done": attrs.get("rows_done"),
            "arrays": {k: {"shape": list(s), "dtype": d, "bytes_per_sample": _row_bytes(s, d)}
                       for k, (s, d) in arrays.items()},
            "bytes": size, "bytes_per_sample": size / n if n else None,
            "bytes_per_view": size / (n * _view_count(attrs)) if n and _view_count(attrs) else None}


def _view_count(attrs: dict) -> int | None:
    views = attrs.get("views")
    return views.get("count") if isinstance(views, dict) else None


def _row_bytes(shape: tuple[int, ...], dtype: str) -> int:
    """What one sample (all its views) costs in an array, uncompressed."""
    return int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize


def _forms(layers, arrays: dict) -> list[dict]:
    """Every stored form of every layer: its dataset, the shape of one view and the bytes of one sample."""
    out = []
    for layer in layers if isinstance(layers, list) else []:
        for form, info in (layer.get("forms") or {}).items() if isinstance(layer, dict) else ():
            name = form_dataset(layer["name"], form)
            shape, dtype = arrays.get(name, ((), "float16"))
            out.append({"layer": layer["name"], "form": form, "dataset": name, "shape": info.get("shape"),
                        "bytes_per_sample": _row_bytes(shape, dtype) if name in arrays else None,
                        **{k: v for k, v in info.items() if k != "shape"}})
    return out


def _json(value):
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return value.item() if hasattr(value, "item") else value


def verify(path: str | Path, teacher_path: str | Path, data: DataConfig, *, samples: int = 64, seed: int = 0,
           atol: float = 0.05, min_cosine: float = 0.999) -> dict:
    """Check every chunk's checksum, then recompute random (sample, view) rows with the teacher and compare
    the logits and every stored form of every layer (through `stored_form`); raises on damage or beyond tolerance."""
    if samples < 1:
        raise LogitcacheError(f"--samples must be at least 1 (rows recomputed with the teacher), got {samples}")
    if not (np.isfinite(atol) and atol >= 0):
        raise LogitcacheError(f"--atol must be a finite number >= 0 (largest allowed |logit difference|), got {atol}")
    with Cache(path) as cache:
        cache.verify_checksums()
        teacher = load_teacher(teacher_path)
        if teacher.sha256 != cache.teacher_sha256:
            raise LogitcacheError(f"{path} was made by another teacher checkpoint (SHA-256 differs from {teacher_path}); "
                                  "pass --teacher with the checkpoint it was made from")
        split = load_split(data, cache.split)
        cache.check_matches(split)
        recorded, own = cache.meta["transform"].get("preprocess"), teacher.preprocess_for(split).to_json()
        if recorded is not None and recorded != own:
            raise LogitcacheError(f"{path} was made with teacher preprocessing {recorded}, the teacher {teacher_path} "
                                  f"has {own}; re-dump it")
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(cache.num_samples, size=min(samples, cache.num_samples), replace=False))
        views = rng.integers(0, cache.num_views, size=len(rows))
        params = cache.view_params()[rows, views]
        render, prepare = teacher.views_for(split, cache.spec)
        images = render_rows(render, split, rows, params)
        extractor = FeatureExtractor(teacher.model, list(cache.layers)).eval()
        with torch.inference_mode():
            out = extractor(prepare(images))
        live = out["logits"].float()
        max_diff, (t, kl), rest_diff = _compare_logits(cache, rows, views, live)
        report = {"rows": len(rows), "max_abs_logit_diff": max_diff, "kl_t1" if t == 1 else f"kl_t{t:g}": kl,
                  "cosine": {}, **({"max_abs_rest_diff": rest_diff} if cache.topk else {})}
        for name, layer in cache.layers.items():
            for form in layer["forms"]:
                stored = torch.from_numpy(cache.read(form_dataset(name, form), rows)[np.arange(len(rows)), views])
                fresh = stored_form(out[name].float(), form, layer)
                report["cosine"][f"{name}:{form}"] = F.cosine_similarity(
                    stored.float().flatten(1), fresh.float().flatten(1), dim=1).min().item()
    bad = [f"max |Δlogit| {max_diff:.4g} > {atol}"] if not max_diff <= atol else []
    bad += [f"max |Δ topk_rest| {rest_diff:.4g} > {atol}"] if cache.topk and not rest_diff <= atol else []
    bad += [f"{n} cosine {c:.5f} < {min_cosine}" for n, c in report["cosine"].items() if c < min_cosine]
    report["ok"] = not bad
    if bad:
        raise LogitcacheError(f"{path} does not match its teacher: {'; '.join(bad)}; re-dump it "
                              "(or raise --atol when checking on another device)")
    return report


def _compare_logits(cache: Cache, rows: np.ndarray, views: np.ndarray,
                    live: torch.Tensor) -> tuple[float, tuple[float, float], float | None]:
    """(max |Δlogit|, (T, KL at T), max |Δ topk_rest|) of the cached rows against the live teacher's logits, with
    T = 1 unless a top-k cache's grid lacks it (then its first temperature); a top-k cache is compared with the
    live logits' `topk_summary` at every temperature of its grid."""
    pick = np.arange(len(rows)), views
    if not cache.topk:
        cached, rest_diff, t = cache.logits(rows)[pick], None, 1.0
        max_diff = (live - cached).abs().max().item()
    else:
        grid = cache.topk_temperatures
        stored, t = cache.topk_rows(rows), 1.0 if 1.0 in grid else grid[0]
        stored = TopK(stored.values[pick], stored.indices[pick], stored.rest[pick], stored.temperatures,
                      stored.num_classes)
        fresh = topk_summary(live, cache.topk, stored.temperatures)
        max_diff = (fresh.values - stored.logits(t).gather(1, fresh.indices)).abs().max().item()
        rest_diff = (fresh.rest - stored.rest).abs().max().item()
        cached = stored.logits(t)
    kl = max(0.0, F.kl_div(F.log_softmax(cached.double() / t, -1), F.log_softmax(live.double() / t, -1),
                           log_target=True, reduction="batchmean").item())  # >= 0; rounding alone could make it negative
    return max_diff, (t, kl), rest_diff
