"""Augmented views that can be replayed bit-identically.

A view of sample i is fixed by four integers, `(seed, top, left, flip)`: a crop
offset into the zero-padded image, a horizontal flip, and the seed of any extra
transforms.v2 policy (-1: no policy, as in the evaluation view). They are derived from (run seed, sample index, view number)
by a counter-based hash. The cache stores one small integer per view, the crop and flip
(`crop_flip_codes`); the seed is derived again on reading (`params_from_codes`), and
`ViewRenderer` turns the four back into the exact uint8 input the teacher saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.lib.stride_tricks import as_strided
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from logitcache.core.config import AugmentConfig
from logitcache.core.errors import LogitcacheError

PARAM_FIELDS = ("seed", "top", "left", "flip")
EVAL_SEED = -1
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


PAD_CROP, RESIZED_CROP = "pad_crop", "random_resized_crop"
BOX_FIELDS = ("seed", "top", "left", "height", "width", "flip")  # a random_resized_crop view's row


@dataclass(frozen=True)
class ViewBox:
    """One view's geometry: a box in the original image's pixel coordinates, and a horizontal flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool

    @classmethod
    def of_row(cls, row) -> "ViewBox":
        """A random_resized_crop view's (seed, top, left, height, width, flip) row."""
        return cls(*(int(v) for v in row[1:5]), bool(row[5]))


@dataclass(frozen=True)
class ViewSpec:
    """The augmentation policy that maps view parameters to an input image."""

    padding: int
    flip: bool
    policy: tuple[dict[str, Any], ...] = field(default=())
    kind: str = PAD_CROP
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    @classmethod
    def from_config(cls, cfg: AugmentConfig) -> "ViewSpec":
        return cls(cfg.crop_padding, cfg.flip, tuple(cfg.policy), cfg.kind, tuple(cfg.scale), tuple(cfg.ratio))

    @property
    def boxes(self) -> bool:
        """Views are boxes of the original image resized to each model's size (random_resized_crop)."""
        return self.kind == RESIZED_CROP

    @property
    def discrete_count(self) -> int | None:
        """Number of distinct views when the policy is a finite grid (crop offsets x flip), else None."""
        if self.policy or self.boxes:
            return None
        return (2 * self.padding + 1) ** 2 * (2 if self.flip else 1)

    @classmethod
    def from_json(cls, data: dict) -> "ViewSpec":
        """The spec a cache recorded in its `transform.augment` attribute."""
        if data.get("kind", PAD_CROP) == RESIZED_CROP:
            return cls(0, data["flip"], tuple(data["policy"]), RESIZED_CROP, tuple(data["scale"]), tuple(data["ratio"]))
        return cls(data["crop_padding"], data["flip"], tuple(data["policy"]))

    def to_json(self) -> dict:
        if self.boxes:
            return {"kind": self.kind, "scale": list(self.scale), "ratio": list(self.ratio), "flip": self.flip,
                    "policy": list(self.policy)}
        return {"crop_padding": self.padding, "flip": self.flip, "policy": list(self.policy)}

    def random_transform(self, size: tuple[int, int]) -> v2.Transform:
        """The same policy as an ordinary random transform, for teacher training."""
        ops: list[v2.Transform] = []
        if self.padding:
            ops.append(v2.RandomCrop(size, padding=self.padding))
        if self.flip:
            ops.append(v2.RandomHorizontalFlip())
        ops.extend(_policy_ops(self.policy))
        return v2.Compose(ops) if ops else v2.Identity()


def _policy_ops(policy) -> list[v2.Transform]:
    ops = []
    for op in policy:
        kwargs = {k: v for k, v in op.items() if k != "name"}
        try:
            ops.append(getattr(v2, op["name"])(**kwargs))
        except (TypeError, ValueError) as e:
            raise LogitcacheError(f"augment policy op {op['name']}: {e}") from None
    return ops


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash: view parameters depend on (seed, index, view) alone."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def _hash(seed: int, index: np.ndarray, view: np.ndarray, salt: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        h = _splitmix64(np.full(index.shape, seed & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64))
        for part in (index.astype(np.uint64), view.astype(np.uint64), np.full(index.shape, salt, dtype=np.uint64)):
            h = _splitmix64(h ^ part)
    return h


def _policy_seeds(seed: int, indices: np.ndarray, views: int) -> np.ndarray:
    """The policy seed of views 0..views-1 of each sample; view 0, the evaluation view, has none."""
    n = len(indices)
    idx = np.repeat(indices[:, None], views, axis=1)
    vv = np.broadcast_to(np.arange(views), (n, views))
    seeds = (_hash(seed, idx, vv, 0) >> np.uint64(1)).astype(np.int64)
    seeds[:, 0] = EVAL_SEED
    return seeds


def view_params(spec: ViewSpec, seed: int, indices: np.ndarray, views: int | str) -> np.ndarray:
    """Parameters of every (sample, view): int64 array (len(indices), V, 4) over PARAM_FIELDS.

    views=1 is the evaluation view (no augmentation); with views=K>1, view 0 is the
    evaluation view and views 1..K-1 are random. views="all" enumerates a discrete
    policy's every view, in the same order for every sample.
    """
    indices = np.asarray(indices, dtype=np.int64)
    n = len(indices)
    if views == "all":
        count = spec.discrete_count
        if count is None:
            raise LogitcacheError("views=all needs a finite policy (crop and flip only); remove augment.policy or give a number")
        v = np.arange(count)
        side = 2 * spec.padding + 1
        grid = np.stack([np.full(count, EVAL_SEED, dtype=np.int64), (v // (2 if spec.flip else 1)) // side,
                         (v // (2 if spec.flip else 1)) % side, v % 2 if spec.flip else np.zeros(count, dtype=np.int64)], axis=1)
        return np.broadcast_to(grid, (n, count, 4)).copy()
    if views == 1:
        return np.broadcast_to(np.array([EVAL_SEED, spec.padding, spec.padding, 0]), (n, 1, 4)).copy()
    params = pair_params(spec, seed, np.repeat(indices[:, None], views, axis=1),
                         np.broadcast_to(np.arange(views), (n, views)))
    params[:, 0] = [EVAL_SEED, spec.padding, spec.padding, 0]
    return params


def check_view_count(spec: ViewSpec, views: int | str, key: str) -> None:
    """Refuse more views per sample than a finite policy has distinct views (the rest would only repeat them)."""
    if views != "all" and spec.discrete_count is not None and views > spec.discrete_count:
        raise LogitcacheError(f"{key}={views} asks for more views than the {spec.discrete_count} distinct views of this "
                              f"policy (crop padding {spec.padding}, flip {spec.flip}); give at most "
                              f"{spec.discrete_count}, or views=all")


def pair_params(spec: ViewSpec, seed: int, indices: np.ndarray, views: np.ndarray) -> np.ndarray:
    """Parameters of view `views[i]` of sample `indices[i]` (arrays of one shape S): int64 array S + (4,), drawn by
    the counter-based hash of (seed, sample, view), so they depend on nothing else: no RNG state, no process."""
    indices, views = np.asarray(indices, dtype=np.int64), np.asarray(views, dtype=np.int64)
    side = np.uint64(2 * spec.padding + 1)
    return np.stack([
        (_hash(seed, indices, views, 0) >> np.uint64(1)).astype(np.int64),
        (_hash(seed, indices, views, 1) % side).astype(np.int64),
        (_hash(seed, indices, views, 2) % side).astype(np.int64),
        (_hash(seed, indices, views, 3) % np.uint64(2)).astype(np.int64) if spec.flip else np.zeros(indices.shape, dtype=np.int64),
    ], axis=-1)


RESIZED_CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries this many boxes before its central fallback


def _uniform(seed: int, indices: np.ndarray, views: np.ndarray, salt: int) -> np.ndarray:
    """A float64 in [0, 1) per (sample, view), from the counter hash."""
    return (_hash(seed, indices, views, salt) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def resized_crop_boxes(spec: ViewSpec, seed: int, indices: np.ndarray, views: np.ndarray,
                       sizes: np.ndarray) -> np.ndarray:
    """Rows (seed, top, left, height, width, flip) of view `views[i]` of sample `indices[i]`: torchvision's
    `RandomResizedCrop.make_params` (up to 10 boxes of random area and aspect, the first that fits, else the central
    fallback), with its uniform draws taken from the counter hash of (seed, sample, view); `sizes` is the (N, 2)
    (height, width) of every original image."""
    indices, views = np.asarray(indices, dtype=np.int64), np.asarray(views, dtype=np.int64)
    height, width = sizes[indices, 0].astype(np.int64), sizes[indices, 1].astype(np.int64)
    (s0, s1), (r0, r1) = spec.scale, (np.log(spec.ratio[0]), np.log(spec.ratio[1]))
    box = np.zeros(indices.shape + (4,), dtype=np.int64)
    found = np.zeros(indices.shape, dtype=bool)
    for attempt in range(RESIZED_CROP_ATTEMPTS):
        salt = 4 + 4 * attempt
        target = height * width * (s0 + (s1 - s0) * _uniform(seed, indices, views, salt))
        aspect = np.exp(r0 + (r1 - r0) * _uniform(seed, indices, views, salt + 1))
        w, h = np.rint(np.sqrt(target * aspect)).astype(np.int64), np.rint(np.sqrt(target / aspect)).astype(np.int64)
        fits = ~found & (w > 0) & (w <= width) & (h > 0) & (h <= height)
        top = np.floor(_uniform(seed, indices, views, salt + 2) * (height - h + 1)).astype(np.int64)
        left = np.floor(_uniform(seed, indices, views, salt + 3) * (width - w + 1)).astype(np.int64)
        box[fits] = np.stack([top, left, h, w], axis=-1)[fits]
        found |= fits
    box[~found] = _central_fallback(spec, height[~found], width[~found])
    flip = (_hash(seed, indices, views, 3) % np.uint64(2)).astype(np.int64) if spec.flip else np.zeros_like(indices)
    seeds = (_hash(seed, indices, views, 0) >> np.uint64(1)).astype(np.int64)
    return np.concatenate([seeds[..., None], box, flip[..., None]], axis=-1)


def _central_fallback(spec: ViewSpec, height: np.ndarray, width: np.ndarray) -> np.ndarray:
    """torchvision's fallback box: the whole image, narrowed to the nearest allowed aspect ratio, centred."""
    in_ratio = width / np.maximum(height, 1)
    low, high = min(spec.ratio), max(spec.ratio)
    w = np.where(in_ratio < low, width, np.where(in_ratio > high, np.rint(height * high), width)).astype(np.int64)
    h = np.where(in_ratio < low, np.rint(width / low), height).astype(np.int64)
    return np.stack([(height - h) // 2, (width - w) // 2, h, w], axis=-1)


def center_box(height: np.ndarray, width: np.ndarray, resize: int | None, crop: int | None) -> np.ndarray:
    """(top, left, height, width) of the evaluation view in original pixels: the region that torchvision's
    `Resize(resize)` (shorter side to resize, the longer truncated) then `CenterCrop(crop)` keeps, mapped back
    through each axis's own scale and rounded to whole pixels. No crop: the whole image."""
    height, width = np.asarray(height, dtype=np.int64), np.asarray(width, dtype=np.int64)
    if crop is None:
        return np.stack([np.zeros_like(height), np.zeros_like(width), height, width], axis=-1)
    short = np.minimum(height, width)
    side = resize or short  # no resize: the crop is taken from the image as it is
    rh = np.where(height <= width, side, (side * height / short).astype(np.int64)) if resize else height
    rw = np.where(height <= width, (side * width / short).astype(np.int64), side) if resize else width
    top_r, left_r = np.round((rh - crop) / 2.0), np.round((rw - crop) / 2.0)
    sy, sx = height / rh, width / rw
    box_h = np.minimum(height, np.rint(crop * sy)).astype(np.int64)
    box_w = np.minimum(width, np.rint(crop * sx)).astype(np.int64)
    top = np.clip(np.rint(top_r * sy), 0, height - box_h).astype(np.int64)
    left = np.clip(np.rint(left_r * sx), 0, width - box_w).astype(np.int64)
    return np.stack([top, left, box_h, box_w], axis=-1)


def box_table(spec: ViewSpec, seed: int, sizes: np.ndarray, views: int, eval_region: tuple[int | None, int | None]
              ) -> np.ndarray:
    """Every sample's views 0..views-1 as (N, V, 6) rows over BOX_FIELDS: view 0 is the evaluation view (the centre
    box of `eval_region` = (resize, crop), unflipped, no policy), the others random boxes."""
    n = len(sizes)
    rows = np.repeat(np.arange(n, dtype=np.int64)[:, None], views, axis=1)
    table = resized_crop_boxes(spec, seed, rows, np.broadcast_to(np.arange(views), (n, views)), sizes)
    centre = center_box(sizes[:, 0].astype(np.int64), sizes[:, 1].astype(np.int64), *eval_region)
    table[:, 0] = np.concatenate([np.full((n, 1), EVAL_SEED), centre, np.zeros((n, 1), dtype=np.int64)], axis=1)
    return table


def box_dtype(sizes: np.ndarray) -> str:
    """The smallest signed dtype that holds every box coordinate of images of these sizes."""
    return "int16" if (sizes.max(initial=0)) < 2**15 else "int32"


class BoxRenderer:
    """Renders a random_resized_crop view: the box cut from the original uint8 image and resized to the consumer's
    `size` (torchvision's `resized_crop`, antialiased), flipped, then the seeded policy. size None keeps the image's
    own size."""

    def __init__(self, spec: ViewSpec, size: int | None, interpolation: str = "bilinear"):
        self.spec, self.size = spec, size
        self.interpolation = v2.InterpolationMode(interpolation)
        self.policy = v2.Compose(_policy_ops(spec.policy)) if spec.policy else None

    def __call__(self, image: torch.Tensor, row) -> torch.Tensor:
        box = ViewBox.of_row(row)
        size = [self.size, self.size] if self.size is not None else list(image.shape[-2:])
        x = TF.resized_crop(image, box.top, box.left, box.height, box.width, size, interpolation=self.interpolation,
                            antialias=True)
        if box.flip:
            x = TF.horizontal_flip(x)
        if self.policy is not None and int(row[0]) != EVAL_SEED:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(row[0]))
                x = self.policy(x)
        return x.contiguous()


class RandomViews:
    """Random augmentation as an unbounded view table: `[rows, views]` gives the (seed, top, left, flip) of those
    (sample, view number) pairs, like a cache's (N, V, 4) table. A sampler that draws fresh view numbers every
    epoch thus draws fresh random views, in the main process, the same whatever the number of loader workers."""

    def __init__(self, spec: ViewSpec, seed: int, sizes: np.ndarray | None = None):
        self.spec, self.seed, self.sizes = spec, seed, sizes

    def __getitem__(self, key: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        rows, views = key
        if self.spec.boxes:
            return resized_crop_boxes(self.spec, self.seed, rows, views, self.sizes)
        return pair_params(self.spec, self.seed, rows, views)


def code_dtype(spec: ViewSpec) -> str:
    """The smallest unsigned dtype that holds every crop/flip code of this policy."""
    codes = (2 * spec.padding + 1) ** 2 * 2
    return "uint8" if codes <= 2**8 else "uint16" if codes <= 2**16 else "uint32"


def crop_flip_codes(params: np.ndarray, spec: ViewSpec) -> np.ndarray:
    """(N, V, 4) view parameters -> (N, V) codes `(top * (2 * padding + 1) + left) * 2 + flip`, the part of a
    view that the cache stores (the seed is derived from the dump's seed, the sample and the view number)."""
    side = 2 * spec.padding + 1
    return ((params[..., 1] * side + params[..., 2]) * 2 + params[..., 3]).astype(code_dtype(spec))


def params_from_codes(codes: np.ndarray, spec: ViewSpec, seed: int, mode: str) -> np.ndarray:
    """The inverse of `crop_flip_codes` for views 0..V-1 of samples 0..N-1 of a dump with this seed and view mode:
    (N, V, 4) int64 parameters equal to the ones the dump rendered."""
    side = 2 * spec.padding + 1
    codes = codes.astype(np.int64)
    n, views = codes.shape
    seeds = _policy_seeds(seed, np.arange(n, dtype=np.int64), views) if mode == "random" \
        else np.full((n, views), EVAL_SEED, dtype=np.int64)
    return np.stack([seeds, codes // 2 // side, codes // 2 % side, codes % 2], axis=-1)


def eval_view(params: np.ndarray, spec: ViewSpec) -> int | None:
    """Which view number is the un-augmented evaluation view (same for every sample), if any."""
    target = [spec.padding, spec.padding, 0]
    hits = np.flatnonzero((params[0, :, 1:] == target).all(axis=1) & ((params[0, :, 0] == EVAL_SEED) | (not spec.policy)))
    return int(hits[0]) if len(hits) else None


class ViewRenderer:
    """Replays a view: pad, crop at (top, left), flip, then the seeded policy, on a uint8 image."""

    def __init__(self, spec: ViewSpec):
        self.spec = spec
        self.policy = v2.Compose(_policy_ops(spec.policy)) if spec.policy else None

    def __call__(self, image: torch.Tensor, params) -> torch.Tensor:
        seed, top, left, flip = (int(p) for p in params)
        height, width = image.shape[-2:]
        x = image
        if self.spec.padding:
            x = TF.pad(x, [self.spec.padding])
            x = TF.crop(x, top, left, height, width)
        if flip:
            x = TF.horizontal_flip(x)
        if self.policy is not None and seed != EVAL_SEED:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                x = self.policy(x)
        return x.contiguous()


def render_batch(renderer: ViewRenderer, images: torch.Tensor, params: np.ndarray) -> torch.Tensor:
    """Many views at once. Without a policy, one gather for the whole batch: each image is zero-padded as it is and
    mirrored, and a view is one window of one of the two (a mirrored crop at `left` is the crop at `2p - left` of
    the mirrored image), taken by a single index into a strided view of every window. The same bytes as
    `renderer` per image (pad, crop and flip only move pixels), at a fraction of the cost."""
    if renderer.policy is not None:
        return torch.stack([renderer(img, p) for img, p in zip(images, params)])
    pad, params, images = renderer.spec.padding, np.asarray(params), np.asarray(images)
    b, c, h, w = images.shape
    both = np.zeros((b, 2, c, h + 2 * pad, w + 2 * pad), dtype=images.dtype)
    both[:, 0, :, pad:pad + h, pad:pad + w] = images
    both[:, 1, :, pad:pad + h, pad:pad + w] = images[..., ::-1]
    s = both.strides  # windows[i, flip, top, left] is a (C, H, W) view: no copy until the index below
    windows = as_strided(both, (b, 2, 2 * pad + 1, 2 * pad + 1, c, h, w), (s[0], s[1], s[3], s[4], s[2], s[3], s[4]),
                         writeable=False)
    flip = params[:, 3]
    left = np.where(flip == 1, 2 * pad - params[:, 2], params[:, 2])
    return torch.from_numpy(windows[np.arange(b), flip, params[:, 1], left])


def render_rows(renderer: "ViewRenderer | BoxRenderer", split, rows: np.ndarray, params: np.ndarray) -> torch.Tensor:
    """The views `params` of rows `rows` of `split`, as one uint8 batch: box views are cut from each original image
    (which may differ in size, and is decoded here when the split is a folder of files), pad-and-crop views in one
    gather from the split's array."""
    if isinstance(renderer, BoxRenderer):
        return torch.stack([renderer(split.read(int(r)), p) for r, p in zip(rows, params)])
    images = split.images.index_select(0, torch.as_tensor(np.asarray(rows, dtype=np.int64)))
    return render_batch(renderer, images, params)


def stored_boxes(table: np.ndarray, dtype: str) -> np.ndarray:
    """(N, V, 6) box rows -> the (N, V, 5) (top, left, height, width, flip) a cache stores."""
    return table[..., 1:].astype(dtype)


def boxes_from_stored(stored: np.ndarray, seed: int) -> np.ndarray:
    """The inverse of `stored_boxes` for views 0..V-1 of samples 0..N-1 of a dump with this seed: (N, V, 6) int64
    rows equal to the ones the dump rendered."""
    n, views = stored.shape[:2]
    seeds = _policy_seeds(seed, np.arange(n, dtype=np.int64), views)
    return np.concatenate([seeds[..., None], stored.astype(np.int64)], axis=-1)


class Normalizer:
    """uint8 batch -> normalised float batch, run on the device after the loader: the arithmetic of
    `v2.ToDtype(float32, scale=True)` then `v2.Normalize(mean, std)`, to the bit (tests/test_views.py), without
    their per-call dispatch, which costs as much as the arithmetic on a training batch."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"Normalizer takes uint8 images, got {images.dtype}")
        if self.mean.device != images.device:
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        return images.to(torch.float32).mul_(1.0 / 255).sub_(self.mean).div_(self.std)