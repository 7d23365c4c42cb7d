"""params.yaml (plus CLI overrides) -> one validated, typed `Params` object.

This is the only way configuration enters the code: every stage reads its
section of `Params`, and saves the sections it used next to its outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from logitcache.core.errors import LogitcacheError
from logitcache.core.schedule import NonNegative

DEFAULT_PARAMS = "params.yaml"
DatasetName = Literal["fashion_mnist", "cifar10", "cifar100", "imagefolder"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _known_model(name: str) -> str:
    import difflib

    from logitcache.core.models import list_models

    names = list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown model '{name}'{hint}; `logitcache models` lists them")
    return name


def _folder(path: str) -> str:
    """An output folder: a file in its place would only fail when the run writes its results."""
    if Path(path).exists() and not Path(path).is_dir():
        raise ValueError("is a file, not a folder; give a folder path")
    return path


def _file(path: str | None) -> str | None:
    if path is not None and Path(path).is_dir():
        raise ValueError("is a directory; give a file path")
    return path


class AugmentConfig(Section):
    """A replayable augmentation policy: crop offsets and flip, then optional transforms.v2 ops."""

    crop_padding: int = Field(2, ge=0, le=64)
    flip: bool = True
    policy: list[dict[str, Any]] = Field(
        default_factory=list,
        description="extra torchvision.transforms.v2 ops on uint8 images, e.g. [{name: ColorJitter, brightness: 0.2}]",
    )

    @field_validator("policy")
    @classmethod
    def _ops_exist(cls, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from torchvision.transforms import v2

        for op in ops:
            name = op.get("name")
            if not isinstance(name, str) or not hasattr(v2, name):
                raise ValueError(f"policy op {op!r} needs 'name:' set to a torchvision.transforms.v2 class")
        return ops


class DataConfig(Section):
    dataset: DatasetName = "fashion_mnist"
    source: str | None = Field(None, description="raw files; None = the data set's default location")
    root: str = Field("data/prepared", description="where prepare-data writes the arrays")
    download: bool = False
    image_size: int = Field(32, ge=8, le=512, description="imagefolder only: images are resized to this")
    train_limit: int | None = Field(None, ge=1, description="keep only the first N training samples")
    test_limit: int | None = Field(None, ge=1, description="keep only the first N test samples")

    _check_root = field_validator("root")(_folder)


class TrainConfig(Section):
    """What teacher and student training share: model, optimiser, schedule, loader."""

    model: str
    epochs: int = Field(ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    augment: AugmentConfig = AugmentConfig()
    seed: int = Field(0, ge=0)
    workers: int = Field(1, ge=0, description="DataLoader worker processes")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    out: str

    _check_model = field_validator("model")(_known_model)
    _check_out = field_validator("out")(_folder)


class TeacherConfig(TrainConfig):
    model: str = "resnet8"
    epochs: int = Field(10, ge=1)
    out: str = "data/teacher"


Form = Literal["map", "attention", "embedding"]


class LayerSpec(Section):
    """One teacher layer to cache, and the forms it is stored in (see docs/cache-format.md)."""

    name: str = Field(description="teacher node name (logitcache layers MODEL)")
    forms: list[Form] = Field(["map"], min_length=1,
                              description="map: the feature map pooled to `pool`; attention: AT's attention map "
                                          "(channel-mean of |f|^p at full resolution, L2-normalised); embedding: "
                                          "the globally average-pooled vector")
    pool: int | None = Field(None, ge=0, description="map form: adaptive-average-pool to this side (0 keeps the map "
                                                     "whole); default dump.feature_pool")
    p: float = Field(2.0, gt=0, description="attention form: the exponent of |f|^p")

    @field_validator("forms")
    @classmethod
    def _distinct_forms(cls, forms: list[str]) -> list[str]:
        if len(set(forms)) != len(forms):
            raise ValueError("a form is listed twice; list each of map, attention, embedding at most once")
        return forms


class DumpConfig(Section):
    """Phase one: which teacher, which views and layers, and how the HDF5 file is stored."""

    teacher: str = Field("data/teacher/teacher.pt", description="teacher checkpoint from train-teacher")
    splits: list[Literal["train", "test"]] = Field(["train", "test"], min_length=1)
    views: int | Literal["all"] = Field(4, description="views per training sample; other splits use the evaluation view")
    augment: AugmentConfig = AugmentConfig()
    seed: int = Field(0, ge=0)
    layers: list[LayerSpec] = Field(
        ["layer2"], validate_default=True, description="teacher layers to cache: a node name (logitcache layers MODEL), stored as a map "
                                "pooled to feature_pool, or {name, forms: [map, attention, embedding], pool, p}")
    feature_pool: int = Field(4, ge=0, description="adaptive-average-pool feature maps to this side; 0 keeps them whole")
    logits_dtype: Literal["float16", "float32"] = "float16"
    topk: int | None = Field(None, ge=1, description="store only the k largest logits per view")
    compression: Literal["none", "lzf", "gzip"] = "none"
    batch_size: int = Field(512, ge=1, description="images per teacher forward pass")
    workers: int = Field(1, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(True, description="float16 autocast on CUDA when logits are stored as float16")
    out: str = Field("data/cache", description="folder of <split>.h5 files")
    overwrite: bool = False

    _check_out = field_validator("out")(_folder)
    _check_teacher = field_validator("teacher")(_file)

    @field_validator("layers", mode="before")
    @classmethod
    def _names_are_map_layers(cls, layers):
        """`layer2,layer3` (the --layers flag) or a list; a bare name is that layer's map form."""
        if isinstance(layers, str):
            layers = [name.strip() for name in layers.split(",") if name.strip()]
        return [{"name": layer} if isinstance(layer, str) else layer for layer in layers] \
            if isinstance(layers, list) else layers

    @field_validator("layers")
    @classmethod
    def _distinct_layers(cls, layers):
        names = [layer.name for layer in layers]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"layer(s) {', '.join(twice)} listed twice; list each layer once with all its forms")
        return layers

    def layer_specs(self) -> list[LayerSpec]:
        """Every entry of `layers` as a LayerSpec, its map pooling resolved (`pool` defaults to feature_pool)."""
        return [spec.model_copy(update={"pool": self.feature_pool if spec.pool is None else spec.pool})
                for spec in self.layers]

    @field_validator("views")
    @classmethod
    def _positive_views(cls, views):
        if isinstance(views, int) and views < 1:
            raise ValueError("views must be >= 1 or 'all'")
        return views


class StudentConfig(TrainConfig):
    """Phase two: a student trained against one or more caches (or plain CE)."""

    model: str = "cnn_small"
    epochs: int = Field(10, ge=1)
    lr: float = Field(0.05, gt=0)
    loss: dict[str, dict[str, Any] | None] = Field(
        default_factory=lambda: {"kd": {}},
        description="distillation methods and their settings, e.g. {kd: {temperature: 4}, at: {pairs: [[block2, "
                    "layer2]]}} (logitcache methods lists them); {} trains with cross-entropy alone, without a cache")
    ce_weight: NonNegative = Field(1.0, description="weight of cross-entropy on the labeled rows (a value or a schedule)")
    caches: list[str] = Field(["data/cache/train.h5"], description="training-split caches; several = ensemble")
    test_cache: str | None = Field("data/cache/test.h5", description="test-split cache for agreement/KL metrics")
    teacher: str = Field("data/teacher/teacher.pt", description="teacher checkpoint, used only with --online")
    online: bool = Field(False, description="reference mode: compute the same targets with the live teacher")
    view_sampling: Literal["random", "round_robin"] = "random"
    augment: AugmentConfig | None = Field(None, description="random augmentation; with a cache only for 1-view caches "
                                          "and force_augment")
    force_augment: bool = False
    labeled_fraction: float = Field(1.0, gt=0, le=1)
    labeled_indices: str | None = Field(None, description="JSON file with a list of labeled sample indices")
    labels_seed: int = Field(0, ge=0, description="seed of the labeled subset, shared by every student seed")
    feature_budget_mb: float = Field(1024, ge=0, description="hold cached features in RAM up to this size")
    shuffle_block: int = Field(256, ge=1, description="each epoch shuffles blocks of this many consecutive rows "
                               "(1 = single rows); the same order whether the cache is read from RAM or disk")
    seeds: list[int] | None = Field(None, min_length=1, description="train once per seed; mean and std in <out>")
    out: str = "data/students/default"

    _check_files = field_validator("labeled_indices", "teacher", "test_cache")(_file)


class Params(Section):
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    dump: DumpConfig = DumpConfig()
    students: dict[str, StudentConfig] = Field(default_factory=dict)

    def student(self, name: str) -> StudentConfig:
        if name in self.students:
            return self.students[name]
        if name == "default":
            return StudentConfig()
        known = ", ".join(self.students) or "none"
        raise LogitcacheError(f"no student '{name}' in params (students: {known}); add it under students:")


def load_params(path: str | Path | None = None, overrides: list[str] = ()) -> Params:
    """Read params.yaml (defaults when absent and not asked for), apply `a.b=value` overrides, validate."""
    raw = _read_yaml(path)
    for item in overrides:
        _apply_override(raw, item)
    return validate(raw, source=str(path or DEFAULT_PARAMS))


def validate(raw: dict[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise LogitcacheError(f"invalid {source}: {_one_line(e)}") from None


def save_config(sections: dict[str, Section], path: str | Path) -> None:
    """Record the resolved configuration beside an output, as JSON."""
    data = {name: section.model_dump(mode="json") for name, section in sections.items()}
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _read_yaml(path: str | Path | None) -> dict[str, Any]:
    explicit = path is not None
    path = Path(path or DEFAULT_PARAMS)
    if not path.exists():
        if explicit:
            raise LogitcacheError(f"params file {path} does not exist; pass an existing file to --params")
        return {}
    if path.is_dir():
        raise LogitcacheError(f"params file {path} is a directory; pass a YAML file to --params")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise LogitcacheError(f"params file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise LogitcacheError(f"params file {path} must hold a mapping of sections, not {type(raw).__name__}")
    return raw


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise LogitcacheError(f"override {item!r} must look like section.key=value, e.g. teacher.epochs=3")
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise LogitcacheError(f"override {item!r}: {part} is not a section")
    node[leaf] = yaml.safe_load(text)


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"unknown key '{loc}'; check its spelling against the documented params"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{loc}: {msg}, got {first.get('input')!r}{more}"
