"""Student batches: replayed views plus the cached teacher targets of exactly those (sample, view) pairs.

The sampler yields whole batches of (row, view) pairs, as one (B, 2) array, and the
dataset builds the batch (in a loader worker, or in the main process with workers: 0):
it renders the batch's views from their parameters in one gather (bit-identical to what
the teacher saw) and takes the cached logits and features of those rows, from memory
when they fit the budget, or by reading the HDF5 file (opened lazily in each worker).
Random augmentation is the same thing with an unbounded view table (`RandomViews`):
the sampler draws a fresh view number per row and epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from logitcache.cache.reader import Cache
from logitcache.cache.topk import TopK
from logitcache.core.data import Split
from logitcache.core.distributed import Dist
from logitcache.core.views import BoxRenderer, RandomViews, ViewRenderer, render_batch, render_rows

FRESH_VIEWS = 2**62  # the view count of random augmentation: every row draws a new view number every epoch


@dataclass
class TrainBatch:
    """One training batch: the rendered images, their labels, which labels CE may use, and the cached targets."""

    images: torch.Tensor  # (B, C, H, W) uint8
    labels: torch.Tensor  # (B,) int64
    labeled: torch.Tensor  # (B,) bool: CE may use the label
    rows: torch.Tensor  # (B,) int64 sample indices
    logits: list[torch.Tensor | TopK] = field(default_factory=list)  # (B, classes) or top-k rows per cache
    features: dict = field(default_factory=dict)  # TeacherInput -> (B, ...) from the first cache

    def pin_memory(self) -> "TrainBatch":  # what DataLoader calls with pin_memory on CUDA
        return TrainBatch(self.images.pin_memory(), self.labels.pin_memory(), self.labeled.pin_memory(),
                          self.rows.pin_memory(), [t.pin_memory() for t in self.logits],
                          {key: t.pin_memory() for key, t in self.features.items()})


class ViewBatchSampler(Sampler):
    """Batches of (row, view) pairs, each a (B, 2) int64 array; which view a row shows changes each epoch (random
    or round-robin), drawn here, in the main process, from (seed, epoch) alone.

    With `block` > 1 it shuffles the order of blocks of consecutive rows, and the rows within each block,
    so a batch's rows come from one or two blocks and disk reads stay chunk-friendly.
    Under torchrun every rank draws the same global batches and keeps its contiguous part
    of each, so the ranks together cover exactly the single-process epoch; a last batch
    smaller than the world is dropped on every rank alike.
    """

    def __init__(self, rows: np.ndarray, views: int, batch_size: int, mode: str, seed: int, *, block: int = 1,
                 dist: Dist = Dist.single()):
        self.rows, self.views, self.batch_size, self.mode, self.seed, self.block = rows, views, batch_size, mode, seed, block
        self.rank, self.world = dist.rank, dist.world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        full, last = divmod(len(self.rows), self.batch_size)
        return full + (last >= self.world)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        starts = np.arange(0, len(self.rows), self.block)
        order = np.concatenate([rng.permutation(self.rows[s:s + self.block]) for s in rng.permutation(starts)])
        if self.mode == "random":
            views = rng.integers(0, self.views, size=len(order))
        else:
            views = (order + self.epoch) % self.views
        for lo in range(0, len(order), self.batch_size):
            hi = min(lo + self.batch_size, len(order))
            if hi - lo >= self.world:  # this rank's contiguous part: neighbouring rows, chunk-friendly reads
                mine = slice(lo + (hi - lo) * self.rank // self.world, lo + (hi - lo) * (self.rank + 1) // self.world)
                yield np.stack([order[mine], views[mine]], axis=1)


class StepStream(Sampler):
    """Global steps [start, stop) of a run that loops over its passes as often as its step budget needs.

    Step s is batch s mod P of pass s // P (P batches per pass): each pass is the sampler's epoch of that
    number, so a run's batches depend on its seed and budget alone, and any range of steps can be replayed.
    """

    def __init__(self, passes: ViewBatchSampler):
        self.passes, self.start, self.stop = passes, 0, 0
        self._pass, self._batches = None, []

    def select(self, start: int, stop: int) -> None:
        """The steps the next iteration yields."""
        self.start, self.stop = start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        per_pass = len(self.passes)
        for step in range(self.start, self.stop):
            number, i = divmod(step, per_pass)
            if number != self._pass:
                self.passes.set_epoch(number)
                self._pass, self._batches = number, list(self.passes)
            yield self._batches[i]


class CachedColumn:
    """One cached array (a cache's logits, or one feature layer), indexed by (rows, views). A top-k cache's
    logits are kept as stored (`TopK`) and rebuilt at each method's temperature in its loss."""

    def __init__(self, path: str | Path, name: str, budget_bytes: float):
        self.path, self.name = Path(path), name
        self.array: np.ndarray | TopK | None = None
        self._cache: Cache | None = None
        with Cache(path) as cache:
            self.topk = self.name == "logits" and bool(cache.topk)
            if self._nbytes(cache) <= budget_bytes:
                self.array = self._read(cache, slice(None))

    def _nbytes(self, cache: Cache) -> int:
        if self.topk:
            return sum(cache.file[name].size * 8 for name in ("topk_values", "topk_indices", "topk_rest"))
        if self.name == "logits":
            return cache.num_samples * cache.num_views * cache.num_classes * 4
        return cache.file[self.name].nbytes

    def _read(self, cache: Cache, selection) -> np.ndarray | TopK:
        if self.topk:
            return cache.topk_rows(selection)
        return cache.logits(selection).numpy() if self.name == "logits" else cache.read(self.name, selection)

    def __getstate__(self):
        return {**self.__dict__, "_cache": None}  # h5py handles never cross process boundaries

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    def take(self, rows: np.ndarray, views: np.ndarray) -> torch.Tensor | TopK:
        if self.array is not None:
            return _pick(self.array, rows, views)
        if self._cache is None:
            self._cache = Cache(self.path)
        unique, inverse = np.unique(rows, return_inverse=True)
        return _pick(self._read(self._cache, unique), inverse, views)  # one sorted read per batch


def _pick(block: np.ndarray | TopK, rows: np.ndarray, views: np.ndarray) -> torch.Tensor | TopK:
    """The (row, view) pairs of a block: float32 values, or top-k rows."""
    if isinstance(block, TopK):
        rows, views = torch.from_numpy(rows), torch.from_numpy(views)
        return TopK(block.values[rows, views], block.indices[rows, views], block.rest[rows, views],
                    block.temperatures, block.num_classes)
    return torch.from_numpy(block[rows, views]).float()


class StudentBatches(Dataset):
    """A (B, 2) array of (row, view) pairs -> a `TrainBatch`.

    `view_params` is a cache's (N, V, 4) view table, or `RandomViews` for random augmentation; without a renderer
    the images are the training images as they are.
    """

    def __init__(self, split: Split, labeled: np.ndarray, *, render: ViewRenderer | BoxRenderer | None = None,
                 view_params: np.ndarray | RandomViews | None = None,
                 logits: list[CachedColumn] = (), features: dict | None = None):
        self.split, self.labeled = split, torch.from_numpy(labeled)
        self.render, self.view_params = render, view_params
        self.logits, self.features = list(logits), features or {}

    def __len__(self) -> int:
        return len(self.split)

    def close(self) -> None:
        for column in [*self.logits, *self.features.values()]:
            column.close()

    def __getitem__(self, pairs: np.ndarray) -> TrainBatch:
        rows, views = np.ascontiguousarray(pairs.T)
        index = torch.from_numpy(rows)
        if isinstance(self.render, BoxRenderer):  # boxes of each original image, at the student's own size
            images = render_rows(self.render, self.split, rows, self.view_params[rows, views])
        else:
            images = self.split.images.index_select(0, index)  # index_select: a fraction of the cost of [index]
            if self.render is not None:
                images = render_batch(self.render, images, self.view_params[rows, views])
        if isinstance(self.view_params, RandomViews):  # random views have no targets: a 1-view cache's only view
            views = np.zeros_like(views)
        return TrainBatch(images, self.split.labels.index_select(0, index), self.labeled.index_select(0, index), index,
                          [column.take(rows, views) for column in self.logits],
                          {name: column.take(rows, views) for name, column in self.features.items()})
