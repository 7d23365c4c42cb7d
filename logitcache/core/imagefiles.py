"""Image folders read in place: an index of the files instead of decoded pixels.

`prepare-data` on an image folder writes, per split, `{split}_index.npz`: each image's path (relative to
`data.source`), label, byte size, SHA-256 and (height, width) from its header. The split's fingerprint is over
the index, so one changed byte of one file changes it. Nothing is decoded to prepare, except a seeded sample
of training images whose statistics are computed in one streaming pass. Later stages decode an image when a
batch needs it (in DataLoader workers) and check its bytes against the index first.
"""

from __future__ import annotations

import hashlib
import json
import os
from io import BytesIO
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from logitcache.core.errors import LogitcacheError

INDEX_FIELDS = ("paths", "labels", "bytes", "sha256", "sizes")


def decoder() -> dict:
    """What turns a file into pixels, recorded in every cache made from image files."""
    import PIL

    return {"name": "PIL.Image.open(...).convert('RGB')", "pillow": PIL.__version__}


@dataclass(frozen=True)
class FileIndex:
    """One split's images: `paths` (utf-8, relative to the source), `labels`, `bytes`, `sha256` (N, 32 uint8) and
    `sizes` (N, 2) (height, width)."""

    paths: np.ndarray
    labels: np.ndarray
    bytes: np.ndarray
    sha256: np.ndarray
    sizes: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def fingerprint(self) -> str:
        """SHA-256 over count, labels, paths, byte sizes and every file's SHA-256."""
        h = hashlib.sha256(json.dumps({"count": len(self), "kind": "image files"}).encode())
        h.update(np.ascontiguousarray(self.labels, dtype="<i8").tobytes())
        h.update(b"\0".join(self.paths.tolist()))
        h.update(np.ascontiguousarray(self.bytes, dtype="<i8").tobytes())
        h.update(np.ascontiguousarray(self.sha256, dtype=np.uint8).tobytes())
        return h.hexdigest()

    def take(self, rows: np.ndarray) -> "FileIndex":
        return FileIndex(*(getattr(self, name)[rows] for name in INDEX_FIELDS))

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **{name: getattr(self, name) for name in INDEX_FIELDS})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "FileIndex":
        try:
            with np.load(path, allow_pickle=False) as f:
                return cls(*(f[name] for name in INDEX_FIELDS))
        except (OSError, ValueError, KeyError, EOFError) as e:
            what = "is missing" if not path.exists() else f"is damaged ({str(e)[:80]})"
            raise LogitcacheError(f"prepared index {path} {what}; rerun `logitcache prepare-data`") from None


def scan(source: Path, folder: Path, classes: list[str]) -> tuple[list[str], np.ndarray]:
    """(paths relative to `source`, labels) of every image under folder/<class>/, in torchvision ImageFolder's
    order; an empty class folder is an error naming it."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    try:
        samples = make_dataset(str(folder), {c: i for i, c in enumerate(classes)}, IMG_EXTENSIONS)
    except FileNotFoundError as e:  # "Found no valid file for the classes X"
        raise LogitcacheError(f"image folder {folder}: {e}; put images in every class folder or remove it") from None
    return [os.path.relpath(p, source) for p, _ in samples], np.array([t for _, t in samples], dtype=np.int64)


def _describe(source: Path, rel: str) -> tuple[int, bytes, tuple[int, int]]:
    """(byte size, SHA-256, (height, width)) of one file, reading its bytes once and only its header's pixels."""
    from PIL import Image, UnidentifiedImageError

    path = source / rel
    try:
        data = path.read_bytes()
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, UnidentifiedImageError) as e:
        raise LogitcacheError(f"image {path} cannot be read ({type(e).__name__}); remove or replace it") from None
    return len(data), hashlib.sha256(data).digest(), (height, width)


def build_index(source: Path, paths: list[str], labels: np.ndarray, threads: int = 4) -> FileIndex:
    """The index of these files: hashed and measured in a few threads (hashing and file reads release the GIL)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        described = list(pool.map(lambda rel: _describe(source, rel), paths))
    return FileIndex(np.array([p.encode() for p in paths], dtype=bytes) if paths else np.zeros(0, dtype="S1"),
                     labels, np.array([d[0] for d in described], dtype=np.int64),
                     np.frombuffer(b"".join(d[1] for d in described), dtype=np.uint8).reshape(-1, 32),
                     np.array([d[2] for d in described], dtype=np.int32).reshape(-1, 2))


def stratified(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Sorted rows of a seeded subset of `limit` rows with each class's share of the whole (largest remainders
    get the rows left over); all rows when limit is None or not below the count. No image is read."""
    n = len(labels)
    if limit is None or limit >= n:
        return np.arange(n)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * limit / n
    take = np.floor(quota).astype(np.int64)
    extra = np.argsort(-(quota - take), kind="stable")[:limit - take.sum()]
    take[extra] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


def decode(path: Path, expected: tuple[int, bytes] | None = None) -> torch.Tensor:
    """uint8 (3, H, W) pixels of one image file (grey-scale and palette images converted to RGB); with `expected`
    (byte size, SHA-256), a file changed since its index was made is refused."""
    from PIL import Image

    try:
        data = path.read_bytes()
    except OSError as e:
        raise LogitcacheError(f"image {path} cannot be read ({type(e).__name__}); restore it or rerun "
                              "`logitcache prepare-data`") from None
    if expected is not None and (len(data) != expected[0] or hashlib.sha256(data).digest() != expected[1]):
        raise LogitcacheError(f"image {path} changed since prepare-data indexed it; restore it or rerun "
                              "`logitcache prepare-data` (and the stages after it)")
    try:
        with Image.open(BytesIO(data)) as image:
            pixels = np.array(image if image.mode == "RGB" else image.convert("RGB"))
    except (OSError, ValueError) as e:
        raise LogitcacheError(f"image {path} cannot be decoded ({type(e).__name__}); remove or replace it and "
                              "rerun `logitcache prepare-data`") from None
    return torch.from_numpy(pixels).permute(2, 0, 1)  # (C, H, W) over the decoded (H, W, C) pixels, not copied


def streaming_statistics(source: Path, index: FileIndex, count: int, seed: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a seeded sample of `count` images (all when fewer), in [0, 1], accumulated one
    image at a time in float64 (squares of uint8 values are exact in float32)."""
    rows = np.sort(np.random.default_rng(seed).permutation(len(index))[:count])
    total, squares, pixels = np.zeros(3), np.zeros(3), 0
    for i in rows:
        image = decode(source / index.paths[i].decode()).numpy().reshape(3, -1)
        total += image.sum(axis=1, dtype=np.float64)
        squares += np.square(image, dtype=np.float32).sum(axis=1, dtype=np.float64)
        pixels += image.shape[1]
    mean = total / max(pixels, 1) / 255.0
    std = np.sqrt(np.maximum(squares / max(pixels, 1) / 255.0**2 - mean * mean, 0.0))
    return mean.round(4).tolist(), std.round(4).tolist()


@dataclass(frozen=True)
class FileSplit:
    """One prepared split of an image folder: its index in memory, each image decoded when it is read."""

    dataset: str
    name: str
    source: Path
    index: FileIndex
    fingerprint: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.index)

    @property
    def labels(self) -> torch.Tensor:
        return torch.from_numpy(self.index.labels)

    @property
    def channels(self) -> int:
        return 3

    @property
    def is_files(self) -> bool:
        return True

    @property
    def sizes(self) -> np.ndarray:
        return self.index.sizes

    @property
    def image_size(self) -> tuple[int, int] | None:
        """One size for every image, when they share it; else None."""
        sizes = np.unique(self.index.sizes, axis=0)
        return tuple(int(v) for v in sizes[0]) if len(sizes) == 1 else None

    @property
    def images(self) -> torch.Tensor:
        raise LogitcacheError(f"{self.dataset} is read from its image files, one at a time; this step needs the data "
                              "as one array (a data set such as fashion_mnist or cifar10)")

    def read(self, i: int) -> torch.Tensor:
        """Sample i's original uint8 (3, H, W) image, decoded from its file after checking its bytes."""
        return decode(self.source / self.index.paths[i].decode(),
                      (int(self.index.bytes[i]), self.index.sha256[i].tobytes()))

    def identity(self) -> dict:
        return {"name": self.dataset, "split": self.name, "count": len(self), "fingerprint": self.fingerprint}
