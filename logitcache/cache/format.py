"""The HDF5 cache layout (docs/cache-format.md), shared by the writer and the reader.

Metadata are root attributes holding JSON text, so plain h5py reads them without
pickle; arrays are chunked along the sample axis and fletcher32-checksummed.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py

from logitcache import __version__
from logitcache.core.errors import LogitcacheError
from logitcache.core.forms import FORMS

FORMAT_NAME = "logitcache"
SCHEMA_VERSION = 2
SCHEMA_CHANGES = {2: "layers are stored in chosen forms (map, attention, embedding) and views as one small "
                     "crop/flip code each"}
JSON_ATTRS = ("format", "schema_version", "logitcache_version", "teacher", "dataset", "transform",
              "views", "dtypes", "layers", "topk", "teacher_accuracy", "complete")
REQUIRED_DATASETS = ("index", "labels")


def view_dataset(meta: dict) -> str:
    """The dataset that holds a cache's views: box rows for random_resized_crop views, crop/flip codes otherwise."""
    return "views/box" if meta["transform"]["augment"].get("kind") == "random_resized_crop" else "views/code"


TOPK_DATASETS = ("topk_values", "topk_indices", "topk_rest")
ATTR_KEYS = {"teacher": ("model", "checkpoint_sha256", "num_classes", "in_channels"),
             "dataset": ("name", "split", "count", "fingerprint"),
             "transform": ("normalize.mean", "normalize.std", "augment"),
             "views": ("count", "mode", "seed", "eval_view"), "dtypes": ("logits",)}
FLOAT16_MAX = 65504.0


def form_dataset(layer: str, form: str) -> str:
    """Where a teacher layer's stored form lives in the file, e.g. features/layer2 or attention/layer2."""
    return f"{FORMS[form].group}/{layer}"


def stored_forms(meta: dict) -> dict[tuple[str, str], tuple[int, ...]]:
    """(layer, form) -> the shape of one (sample, view), for every layer and form the cache stores."""
    return {(layer["name"], form): tuple(info["shape"]) for layer in meta["layers"]
            for form, info in layer["forms"].items()}


def set_attr(f: h5py.File, name: str, value) -> None:
    f.attrs[name] = json.dumps(value, sort_keys=True)


def get_attr(f: h5py.File, name: str, path: str | Path = "cache"):
    if name not in f.attrs:
        raise LogitcacheError(f"{path}: attribute '{name}' is missing; the file is not a logitcache cache, re-dump it")
    raw = f.attrs[name]
    try:
        return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError):
        raise LogitcacheError(f"{path}: attribute '{name}' is not valid JSON; the file is damaged, re-dump it") from None


def read_metadata(f: h5py.File, path: str | Path) -> dict:
    """Every JSON attribute, after checking that this is a complete cache of a schema we read."""
    if get_attr(f, "format", path) != FORMAT_NAME:
        raise LogitcacheError(f"{path}: not a logitcache cache (format attribute is wrong); give a file from dump-teacher")
    version = get_attr(f, "schema_version", path)
    if version != SCHEMA_VERSION:
        changed = f" (since version {SCHEMA_VERSION}, {SCHEMA_CHANGES[SCHEMA_VERSION]})" \
            if isinstance(version, int) and version < SCHEMA_VERSION else ""
        raise LogitcacheError(f"{path}: cache schema version {version}, this logitcache reads {SCHEMA_VERSION}"
                              f"{changed}; re-dump it with logitcache {__version__}")
    meta = {name: get_attr(f, name, path) for name in JSON_ATTRS}
    _check_structure(meta, path)
    if meta["complete"] is not True:
        raise LogitcacheError(f"{path}: cache is incomplete (the dump did not finish); rerun dump-teacher to resume it")
    if meta["topk"]:
        meta["topk_temperatures"] = _topk_temperatures(f, path)
    expected = [*REQUIRED_DATASETS, view_dataset(meta), *(TOPK_DATASETS if meta["topk"] else ("logits",)),
                *(form_dataset(layer, form) for layer, form in stored_forms(meta))]
    missing = [name for name in expected if name not in f]
    if missing:
        raise LogitcacheError(f"{path}: dataset(s) {', '.join(missing)} missing; the file is damaged, re-dump it")
    return meta


def _check_structure(meta: dict, path: str | Path) -> None:
    """JSON that parses but lacks what readers index into is damage too: refuse it here, not as a KeyError later."""
    for name, keys in ATTR_KEYS.items():
        missing = [key for key in keys if not _has(meta[name], key.split("."))]
        if missing:
            raise LogitcacheError(f"{path}: attribute '{name}' lacks {', '.join(missing)}; the file is damaged, re-dump it")
    layers = meta["layers"]
    if not isinstance(layers, list) or not all(_is_layer_record(x) for x in layers):
        raise LogitcacheError(f"{path}: attribute 'layers' is not a list of layer records "
                              "({name, activation, forms}); the file is damaged, re-dump it")


def _topk_temperatures(f: h5py.File, path: str | Path) -> list[float]:
    """A top-k cache's temperature grid (attribute `topk_temperatures`, with dataset `topk_rest`). Top-k caches
    that stored the leftover mass at T = 1 only (`topk_lse`) are refused: their targets are wrong at T > 1."""
    if "topk_temperatures" not in f.attrs and "topk_lse" in f:
        raise LogitcacheError(f"{path}: top-k cache of the older layout, right at T = 1 only (topk_lse, no "
                              "topk_temperatures); re-dump it, with dump.topk_temperatures listing the temperatures "
                              "students read it at")
    grid = get_attr(f, "topk_temperatures", path)
    if not (isinstance(grid, list) and grid and all(isinstance(t, (int, float)) and t > 0 for t in grid)
            and grid == sorted(set(grid))):
        raise LogitcacheError(f"{path}: attribute 'topk_temperatures' is not a sorted list of distinct positive "
                              "numbers; the file is damaged, re-dump it")
    if "topk_rest" in f and f["topk_rest"].shape[-1] != len(grid):
        raise LogitcacheError(f"{path}: topk_rest holds {f['topk_rest'].shape[-1]} temperature(s), "
                              f"topk_temperatures lists {len(grid)}; the file is damaged, re-dump it")
    return [float(t) for t in grid]


def _is_layer_record(layer) -> bool:
    """{name, activation, forms: {form: {shape, ...}}} with at least one known form, each with its keys."""
    if not isinstance(layer, dict) or not {"name", "activation", "forms"} <= layer.keys():
        return False
    forms = layer["forms"]
    return isinstance(forms, dict) and bool(forms) and all(
        form in FORMS and isinstance(info, dict) and {"shape", *FORMS[form].keys} <= info.keys()
        and isinstance(info["shape"], list) for form, info in forms.items())


def _has(value, keys: list[str]) -> bool:
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return False
        value = value[key]
    return True


class UnreadableFile(LogitcacheError):
    """HDF5 cannot make sense of the file: truncated, or damaged beyond its checksums."""


def open_h5(path: str | Path, mode: str = "r", *, kind: str = "cache",
            busy: str = "is being written by another process; wait for the dump to finish",
            remedy: str = "it is truncated or damaged, re-dump it") -> h5py.File:
    """The one way logitcache opens an HDF5 file: every failure becomes one line naming the file and what to do.

    `kind` names the file for the user, `busy` says what a lock held by another process means,
    `remedy` what to do about a file HDF5 cannot read (raised as UnreadableFile).
    """
    path = Path(path)
    named = f"{kind} {path}".lstrip()
    if mode == "r" and not path.exists():
        raise LogitcacheError(f"{named} does not exist; run `logitcache dump-teacher` first")
    if path.is_dir():
        raise LogitcacheError(f"{named} is a directory; give the .h5 file")
    try:
        return h5py.File(path, mode)
    except BlockingIOError:
        raise LogitcacheError(f"{named} {busy}") from None
    except PermissionError:
        raise LogitcacheError(f"{path} cannot be opened for {'reading' if mode == 'r' else 'writing'} "
                              "(permission denied); fix its permissions and rerun the same command") from None
    except OSError as e:
        if e.errno is not None and mode != "r":  # the system refused (read-only file system...): the file may be fine
            raise LogitcacheError(f"{path} cannot be opened for writing ({str(e).splitlines()[0]}); "
                                  "fix that and rerun the same command to resume") from None
        raise UnreadableFile(f"{named} cannot be opened as HDF5 ({str(e).splitlines()[0]}); {remedy}") from None


def dataset_names(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def read_blocks(dataset: h5py.Dataset, path: str | Path, stop: int | None = None):
    """Rows [0, stop) as (first row, block) in blocks of 8 chunks, each read through its checksum."""
    stop = len(dataset) if stop is None else stop
    step = max(1, (dataset.chunks or (max(1, len(dataset)),))[0] * 8)
    for lo in range(0, stop, step):
        yield lo, read_rows(dataset, slice(lo, min(stop, lo + step)), path)


def open_cache(path: str | Path) -> tuple[h5py.File, dict]:
    """Open a cache read-only and validate it; the caller closes the file."""
    f = open_h5(path)
    try:
        return f, read_metadata(f, path)
    except Exception:
        f.close()
        raise


def read_rows(dataset: h5py.Dataset, selection, path: str | Path):
    """Read rows, turning a checksum failure into a clear error."""
    try:
        return dataset[selection]
    except OSError as e:
        raise LogitcacheError(f"{path}: dataset {dataset.name} failed its checksum or could not be read "
                              f"({str(e).splitlines()[0]}); the file is damaged, re-dump it") from None
