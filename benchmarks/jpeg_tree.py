"""A generated ImageNet-style JPEG tree: <out>/{train,val}/<class>/<n>.jpg, of 200-500 pixels a side.

The pictures are smooth colour fields with blurred noise (so JPEG compresses them about as much as photographs,
100-200 KB at 500 x 375 and quality 90), a few grey-scale ones among them. Seeded: the same arguments write the
same bytes.

    python benchmarks/jpeg_tree.py /tmp/tree --classes 100 --train 20 --val 5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter


def picture(rng: np.random.Generator) -> Image.Image:
    h, w = (int(v) for v in rng.integers(200, 501, size=2))
    base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((w, h), Image.BICUBIC)
    noise = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(0.7))
    image = Image.blend(image, noise, 0.5)
    return image.convert("L") if rng.random() < 0.02 else image


def write_tree(out: Path, classes: int, per_split: dict[str, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in per_split.items():
        for c in range(classes):
            folder = out / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                picture(rng).save(folder / f"{i}.jpg", quality=90)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--train", type=int, default=20, help="images per class in train/")
    ap.add_argument("--val", type=int, default=5, help="images per class in val/")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    write_tree(args.out, args.classes, {"train": args.train, "val": args.val}, args.seed)
    print(f"wrote {args.classes * (args.train + args.val)} images under {args.out}")


if __name__ == "__main__":
    main()
