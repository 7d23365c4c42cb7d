"""The cache reader's typed accessors are the only way code outside logitcache/cache reads cache metadata."""

import json
import re
from pathlib import Path

import h5py

from logitcache.cache.reader import Cache
from logitcache.core.views import ViewSpec

ROOT = Path(__file__).resolve().parents[1]


def test_typed_accessors_return_what_the_file_records(cache_dir):
    with h5py.File(cache_dir / "train.h5", "r") as f:
        raw = {name: json.loads(f.attrs[name]) for name in ("teacher", "dataset", "transform", "views", "dtypes",
                                                             "layers", "topk")}
    with Cache(cache_dir / "train.h5") as cache:
        assert cache.teacher_sha256 == raw["teacher"]["checkpoint_sha256"]
        assert cache.teacher_params == raw["teacher"]["params"]
        assert cache.topk is raw["topk"] is None
        assert cache.dtypes == raw["dtypes"] and cache.dtypes["logits"] == "float16"
        assert cache.split == raw["dataset"]["split"] == "train"
        assert cache.eval_view == (raw["views"]["eval_view"] or 0)
        assert cache.spec == ViewSpec.from_json(raw["transform"]["augment"])
        assert cache.stored == {(layer["name"], form): tuple(info["shape"]) for layer in raw["layers"]
                                for form, info in layer["forms"].items()}
        assert cache.stored.keys() == {("layer2", "map")}


def test_no_module_outside_the_cache_package_reads_cache_metadata_by_key():
    """`cache.meta[...]` (or `.meta.get`) outside logitcache/cache would tie that module to the writer's JSON keys."""
    readers = [path.relative_to(ROOT) for path in (ROOT / "logitcache").rglob("*.py")
               if "cache" not in path.relative_to(ROOT / "logitcache").parts[:1]
               and re.search(r"\bcache\.meta\b|\binfo\[\"meta\"\]", path.read_text())]
    assert readers == []
