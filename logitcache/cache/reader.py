"""Reading a cache: validation against the data, and its arrays as float32 tensors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import torch

from logitcache.cache.format import dataset_names, open_cache, read_blocks, read_rows, stored_forms
from logitcache.cache.topk import TopK
from logitcache.core.data import Split
from logitcache.core.errors import LogitcacheError
from logitcache.core.preprocess import Preprocess
from logitcache.core.views import ViewSpec, boxes_from_stored, params_from_codes


class Cache:
    """A complete, validated cache opened read-only. Open it lazily in each DataLoader worker."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file, self.meta = open_cache(self.path)

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()

    def __getstate__(self):
        raise TypeError("Cache holds an h5py handle: pass its path to workers and open it there")

    @property
    def num_samples(self) -> int:
        return self.meta["dataset"]["count"]

    @property
    def split(self) -> str:
        """The split the cache was made from ("train", "test")."""
        return self.meta["dataset"]["split"]

    @property
    def num_views(self) -> int:
        return self.meta["views"]["count"]

    @property
    def num_classes(self) -> int:
        return self.meta["teacher"]["num_classes"]

    @property
    def layers(self) -> dict[str, dict]:
        """Layer name -> its record: `activation` and `forms` ({form: {shape, pooled_to or p}})."""
        return {layer["name"]: layer for layer in self.meta["layers"]}

    @property
    def stored(self) -> dict[tuple[str, str], tuple[int, ...]]:
        """(layer, form) -> the shape of one (sample, view), for every layer and form the cache stores."""
        return stored_forms(self.meta)

    @property
    def spec(self) -> ViewSpec:
        """The augmentation policy the views were drawn from (and are replayed with)."""
        return ViewSpec.from_json(self.meta["transform"]["augment"])

    @property
    def preprocess(self) -> "Preprocess | None":
        """The teacher's preprocessing the views were rendered with (None in a cache that records none)."""
        recorded = self.meta["transform"].get("preprocess")
        return Preprocess.from_json(recorded) if recorded else None

    @property
    def topk(self) -> int | None:
        """k when only the k largest logits per view are stored; None for full logits."""
        return self.meta["topk"]

    @property
    def topk_temperatures(self) -> tuple[float, ...] | None:
        """The temperatures a top-k cache's targets are right at (`dump.topk_temperatures`); None for full logits."""
        return tuple(self.meta["topk_temperatures"]) if self.topk else None

    @property
    def teacher_sha256(self) -> str:
        """SHA-256 of the teacher checkpoint the cache was made from."""
        return self.meta["teacher"]["checkpoint_sha256"]

    @property
    def teacher_params(self) -> int | None:
        """The teacher's parameter count, when the dump recorded it."""
        return self.meta["teacher"].get("params")

    @property
    def dtypes(self) -> dict[str, str]:
        """Array name -> its storage dtype name (e.g. {"logits": "float16"})."""
        return dict(self.meta["dtypes"])

    @property
    def eval_view(self) -> int:
        """The view that shows each sample unaugmented (0 when the dump recorded none)."""
        return self.meta["views"]["eval_view"] or 0

    @property
    def identity(self) -> str:
        """sha256 of everything that fixes the targets: teacher checkpoint, data, transform, views, layers, dtypes
        (the metadata but the writer's version); a re-dump from another teacher or with other settings changes it."""
        fixed = {key: value for key, value in self.meta.items() if key != "logitcache_version"}
        return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()

    def dataset(self, name: str) -> h5py.Dataset:
        return self.file[name]

    def read(self, name: str, selection=slice(None)) -> np.ndarray:
        return read_rows(self.file[name], selection, self.path)

    def verify_checksums(self) -> None:
        """Read every array in chunk-aligned blocks: fletcher32 catches damage anywhere, not only in sampled rows."""
        for name in dataset_names(self.file):
            for _ in read_blocks(self.file[name], self.path):
                pass

    def view_params(self) -> np.ndarray:
        """(N, V, 4) int64 `(seed, top, left, flip)` of every view, for `ViewRenderer` / `render_batch`: the stored
        crop/flip codes, with each view's policy seed derived again from the dump's seed."""
        views, spec = self.meta["views"], self.spec
        if spec.boxes:
            return self._box_params(views["seed"])
        codes = self.read("views/code")
        self._check_codes(codes, spec, views.get("eval_view"))
        return params_from_codes(codes, spec, views["seed"], views["mode"])

    def _box_params(self, seed: int) -> np.ndarray:
        """(N, V, 6) int64 `(seed, top, left, height, width, flip)` of every box view, for `BoxRenderer`."""
        stored = self.read("views/box")
        if stored.size and (stored[..., :2].min() < 0 or stored[..., 2:4].min() < 1 or stored[..., 4].max() > 1
                            or stored[..., 4].min() < 0):
            raise LogitcacheError(f"{self.path}: the stored view boxes are out of range; the file is damaged, re-dump it")
        return boxes_from_stored(stored, seed)

    def _check_codes(self, codes: np.ndarray, spec: ViewSpec, eval_view: int | None) -> None:
        """The stored crop/flip codes fit the recorded transform: every code in range, the evaluation view the
        centre crop unflipped (an edited crop_padding would replay other crops, or none)."""
        side = 2 * spec.padding + 1
        centre = (spec.padding * side + spec.padding) * 2
        if codes.size and (int(codes.max()) >= side * side * 2 or
                           (eval_view is not None and not (codes[:, eval_view] == centre).all())):
            raise LogitcacheError(f"{self.path}: the stored view codes do not fit its transform attribute (crop_padding "
                                  f"{spec.padding}); the file is damaged, re-dump it")

    def logits(self, selection=slice(None), temperature: float = 1.0) -> torch.Tensor:
        """Float32 logits (rows, V, C) whose softmax at `temperature` is the teacher's; full logits ignore it, top-k
        caches are rebuilt for it (`TopK.logits`: one of `topk_temperatures`, else a one-line error)."""
        if not self.topk:
            return torch.from_numpy(self.read("logits", selection).astype(np.float32))
        return self.topk_rows(selection).logits(temperature)

    def topk_rows(self, selection=slice(None)) -> TopK:
        """A top-k cache's rows as stored: values (float32), indices, the leftover log-sum-exp per temperature."""
        return TopK(torch.from_numpy(self.read("topk_values", selection).astype(np.float32)),
                    torch.from_numpy(self.read("topk_indices", selection).astype(np.int64)),
                    torch.from_numpy(self.read("topk_rest", selection)), self.topk_temperatures, self.num_classes)

    def check_identity(self, identity: dict) -> None:
        """Refuse a cache made from another data set or split (`Split.identity` or `split_identity`)."""
        made = self.meta["dataset"]
        which = "training" if identity["split"] == "train" else identity["split"]
        for key in ("name", "split", "count", "fingerprint"):
            if made[key] != identity[key]:
                raise LogitcacheError(f"{self.path}: cache was made from {key} {made[key]!r}, "
                                      f"the {which} data has {key} {identity[key]!r}; dump the teacher "
                                      "on this data")

    def check_matches(self, split: Split) -> None:
        """Refuse a cache made from other data: one line naming what differs."""
        self.check_identity(split.identity())
        norm = self.meta["transform"]["normalize"]  # the teacher's inputs: another transform, other targets
        if (norm["mean"], norm["std"]) != (list(split.mean), list(split.std)):
            raise LogitcacheError(f"{self.path}: cache was made with normalisation mean {norm['mean']} std {norm['std']}, "
                                  f"the training data has mean {list(split.mean)} std {list(split.std)}; "
                                  "dump the teacher on this data")
        labels = self.read("labels")
        wrong = np.flatnonzero(labels != split.labels.numpy())
        if len(wrong):
            raise LogitcacheError(f"{self.path}: labels differ from the data at {len(wrong)} row(s), "
                                  f"first {wrong[:5].tolist()}; dump the teacher on this data")
        if not np.array_equal(self.read("index"), np.arange(len(split))):
            raise LogitcacheError(f"{self.path}: sample index column is not 0..N-1; the cache is damaged, re-dump it")
