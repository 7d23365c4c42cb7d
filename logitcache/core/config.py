"""params.yaml (plus CLI overrides) -> one validated, typed `Params` object.

This is the only way configuration enters the code: every stage reads its
section of `Params`, and saves the sections it used next to its outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from logitcache.core.errors import LogitcacheError
from logitcache.core.schedule import NonNegative

DEFAULT_PARAMS = "params.yaml"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # NaN and infinity are never a setting


def _known_model(name: str) -> str:
    from logitcache.core.models import check_model

    return check_model(name)  # UnknownModelError is a ValueError: pydantic reports it on the key


def _known_dataset(name: str) -> str:
    from logitcache.core.data import DATASETS

    if name not in DATASETS:
        raise ValueError(f"unknown data set '{name}'; choose one of {', '.join(DATASETS)} (the DATASETS registry in "
                         "logitcache/core/data.py)")
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
    """A replayable augmentation policy: a crop box and flip, then optional transforms.v2 ops."""

    kind: Literal["pad_crop", "random_resized_crop"] = Field(
        "pad_crop", description="pad_crop: a crop of the zero-padded image at its own size (CIFAR style, for data sets "
        "of one image size); random_resized_crop: a box of random area and aspect in the original image, resized to "
        "each model's input size (ImageNet style; the evaluation view is the teacher's resize-then-center-crop)")
    crop_padding: int = Field(2, ge=0, le=64, description="pad_crop: random crop after zero-padding each side by this "
                              "many pixels (the image keeps its size); 0 = no crop")
    scale: tuple[float, float] = Field((0.08, 1.0), description="random_resized_crop: range of the box's area as a "
                                       "fraction of the image's, as torchvision's RandomResizedCrop")
    ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="random_resized_crop: range of the box's aspect "
                                       "ratio (width / height), as torchvision's RandomResizedCrop")
    flip: bool = Field(True, description="random horizontal flip")
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
            try:
                getattr(v2, name)(**{k: v for k, v in op.items() if k != "name"})
            except (TypeError, ValueError) as e:  # built once here, so that no run fails at its first image
                raise ValueError(f"policy op {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        return ops

    @field_validator("scale", "ratio")
    @classmethod
    def _ordered_range(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        if not 0 < bounds[0] <= bounds[1]:
            raise ValueError(f"{list(bounds)} must be two positive numbers, the smaller first")
        return bounds

    @model_validator(mode="after")
    def _area_at_most_whole(self) -> "AugmentConfig":
        if self.scale[1] > 1:
            raise ValueError(f"scale {list(self.scale)}: a box's area is at most the image's (1.0)")
        return self


class DataConfig(Section):
    """The data set: where its raw files are and where prepare-data writes the arrays every stage reads."""

    dataset: str = Field("fashion_mnist", description="which data set, by its name in the DATASETS registry of "
                         "logitcache/core/data.py; imagefolder reads <source>/<folder>/<class>/<image> in place")
    source: str | None = Field(None, description="folder of the raw files; null = the data set's "
                                             "default (Debian's /usr/share/datasets/fashion-mnist for fashion_mnist)")
    root: str = Field("data/prepared", description="prepare-data writes <root>/<dataset>/; "
                      "the other stages read the arrays there")
    download: bool = Field(False, description="let torchvision download the raw files into source "
                           "(fashion_mnist, cifar10, cifar100)")
    folders: dict[str, str] = Field({"train": "train", "test": "test"}, description="imagefolder only: the "
                                    "folder of each split under source (ImageNet's test split is `val`)")
    train_limit: int | None = Field(None, ge=1, description="keep only N training samples: the first N, or for "
                                    "imagefolder a seeded subset with each class's share (subset_seed)")
    test_limit: int | None = Field(None, ge=1, description="keep only N test samples (as train_limit)")
    subset_seed: int = Field(0, ge=0, description="imagefolder only: seed of the train_limit / test_limit subset "
                             "and of the images the statistics are measured on")
    stats_images: int = Field(5000, ge=1, description="imagefolder only: the normalisation statistics are measured "
                              "on a seeded sample of this many training images, decoded one at a time")
    validation: int = Field(5000, ge=0, description="training rows held out as the validation split, the same for "
                            "the teacher and every student: scored after every epoch, never trained on; 0 = none "
                            "(then only select: last)")
    validation_seed: int = Field(0, ge=0, description="seed of which training rows are held out")

    _check_dataset = field_validator("dataset")(_known_dataset)

    @field_validator("folders")
    @classmethod
    def _check_folders(cls, value: dict[str, str]) -> dict[str, str]:
        if set(value) != {"train", "test"}:
            raise ValueError("give the folder of each split, train and test, e.g. {train: train, test: val}")
        bad = [name for name in value.values() if not name or Path(name).is_absolute() or ".." in Path(name).parts]
        if bad:
            raise ValueError(f"split folders are names under data.source, not {bad[0]!r}")
        return value
    _check_root = field_validator("root")(_folder)


class TrainConfig(Section):
    """What teacher and student training share: model, optimiser, schedule, loader."""

    model: str = Field(description="architecture (logitcache models lists them)")
    epochs: int = Field(ge=1, le=100_000, description="passes over the training rows")
    batch_size: int = Field(128, ge=1, description="global batch: under torchrun each of N ranks takes batch_size / N")
    lr: float = Field(0.1, gt=0, description="peak learning rate of SGD with Nesterov momentum")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="SGD weight decay")
    schedule: Literal["onecycle", "cosine", "constant"] = Field("onecycle", description="learning-rate schedule over "
                                                                "every step of the run")
    augment: AugmentConfig = Field(AugmentConfig(), description="random augmentation of the training images")
    select: Literal["best", "last"] = Field("best", description="the weights reported and saved: those of the "
                                            "evaluation with the best validation accuracy, or the last; the test "
                                            "split is scored once, on them, after training")
    seed: int = Field(0, ge=0, description="seed of initialisation, shuffling and augmentation")
    workers: int = Field(1, ge=0, description="DataLoader worker processes")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when a GPU is visible, else cpu")
    out: str = Field(description="output folder")

    _check_model = field_validator("model")(_known_model)
    _check_out = field_validator("out")(_folder)


class PreprocessConfig(Section):
    """import-teacher: the teacher's input preprocessing, each key overriding what the weights come with."""

    resize: int | None = Field(None, ge=1, description="resize the shorter side of a view to this; null = the "
                               "weights' own (torchvision's weights transforms, timm's pretrained_cfg; the data's "
                               "size for a registry model)")
    crop: int | None = Field(None, ge=1, description="then center-crop to this square side; null = the weights' own")
    interpolation: Literal["nearest", "bilinear", "bicubic"] | None = Field(None, description="of the resize; null = "
                                                                            "the weights' own")
    mean: list[float] | None = Field(None, min_length=1, description="per-channel mean of the normalisation; null = "
                                     "the weights' own (the data set's for a registry model)")
    std: list[float] | None = Field(None, min_length=1, description="per-channel std of the normalisation; null = "
                                    "the weights' own")

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _comma_list(cls, value):
        """`0.485,0.456,0.406` (a flag) or a list."""
        return [float(v) for v in value.split(",")] if isinstance(value, str) else value


class TeacherConfig(TrainConfig):
    """Phase one's model, trained with labels: train-teacher writes <out>/teacher.pt and its metrics."""

    model: str = Field("resnet8", description="teacher architecture (logitcache models lists them; torchvision:NAME "
                       "or timm:NAME for a pretrained model, docs/teachers.md)")
    epochs: int = Field(15, ge=1, le=100_000, description="passes over the training rows (the training split less "
                        "the validation "
                        "rows)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the cross-entropy")
    init: str | None = Field(None, description="fine-tune: start from this teacher checkpoint (e.g. from "
                             "import-teacher; its architecture must be `model`), with a new head where its class "
                             "count differs from the data's; its preprocessing is kept")
    backbone_lr: float | None = Field(None, gt=0, description="with init: peak learning rate of every layer but the "
                                      "head (null = lr)")
    preprocess: PreprocessConfig = Field(PreprocessConfig(), description="import-teacher: overrides of the teacher's "
                                         "input preprocessing")
    out: str = Field("data/teacher", description="folder of teacher.pt, metrics.json, history.json, config.json "
                     "and, while a run is unfinished, resume.pt")

    _check_init = field_validator("init")(_file)


def _known_form(name: str) -> str:
    from logitcache.core.forms import FORMS

    if name not in FORMS:
        raise ValueError(f"unknown stored form '{name}'; choose one of {', '.join(FORMS)} (the FORMS registry in "
                         "logitcache/core/forms.py)")
    return name


Form = Annotated[str, AfterValidator(_known_form)]  # a name in logitcache.core.forms.FORMS


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
            raise ValueError("a form is listed twice; list each form at most once")
        return forms


class DumpConfig(Section):
    """Phase one: which teacher, which views and layers, and how the HDF5 file is stored."""

    teacher: str = Field("data/teacher/teacher.pt", description="teacher checkpoint from train-teacher")
    splits: list[Literal["train", "test"]] = Field(["train", "test"], min_length=1, description="the splits to dump, "
                                                   "one <out>/<split>.h5 each")
    views: int | Literal["all"] = Field(4, description="views per training sample (view 0 is the evaluation view); "
                                        "all = every crop/flip view; other splits use the evaluation view")
    augment: AugmentConfig = Field(AugmentConfig(), description="how the training views are drawn")
    seed: int = Field(0, ge=0, description="seed of the views' augmentation parameters")
    layers: list[LayerSpec] = Field(
        [{"name": "layer2", "forms": ["map", "attention"]}, {"name": "layer3", "forms": ["embedding"]}],
        validate_default=True, description="teacher layers to cache: a node name (logitcache layers MODEL), stored as a map "
                                "pooled to feature_pool, or {name, forms: [map, attention, embedding], pool, p}")
    feature_pool: int = Field(4, ge=0, description="adaptive-average-pool feature maps to this side; 0 keeps them whole")
    logits_dtype: Literal["float16", "float32"] = Field("float16", description="storage type of the logits "
                                                        "(float16 is checked for overflow)")
    topk: int | None = Field(None, ge=1, description="store only the k largest logits per view")
    topk_temperatures: list[float] = Field([1.0, 2.0, 4.0, 8.0], description="with topk: the temperatures whose "
                                           "leftover mass is stored; students may read the cache at these only")
    compression: Literal["none", "lzf", "gzip"] = Field("none", description="HDF5 compression of the arrays "
                                                        "(docs/benchmarks.md)")
    batch_size: int = Field(512, ge=1, description="images per teacher forward pass")
    workers: int = Field(1, ge=0, description="DataLoader worker processes that render the views")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when a GPU is visible, else cpu")
    amp: bool = Field(True, description="float16 autocast on CUDA when logits are stored as float16")
    out: str = Field("data/cache", description="folder of <split>.h5 files")
    overwrite: bool = Field(False, description="replace an existing complete cache (--overwrite)")

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

    @field_validator("topk_temperatures")
    @classmethod
    def _temperature_grid(cls, grid: list[float]) -> list[float]:
        if any(t <= 0 for t in grid) or grid != sorted(set(grid)):
            raise ValueError("topk_temperatures must be distinct positive numbers in increasing order")
        return grid

    @model_validator(mode="after")
    def _grid_with_topk(self):
        if self.topk is not None and not self.topk_temperatures:
            raise ValueError("topk_temperatures must list at least one temperature when topk is set")
        return self

    @field_validator("views")
    @classmethod
    def _positive_views(cls, views):
        if isinstance(views, int) and views < 1:
            raise ValueError("views must be >= 1 or 'all'")
        return views


class StudentConfig(TrainConfig):
    """Phase two: a student trained against one or more caches (or plain CE)."""

    model: str = Field("cnn_small", description="student architecture (logitcache models lists them)")
    epochs: int = Field(10, ge=1, le=100_000, description="passes over the training rows: the labeled ones for ce, "
                        "every cached "
                        "one otherwise (ignored when steps is set)")
    steps: int | None = Field(None, ge=1, description="training length in optimizer steps (samples seen = steps x "
                              "batch_size), whatever the rows: give every student of a comparison the same; a student "
                              "loops over its rows as often as that needs")
    evaluations: int | None = Field(None, ge=1, description="validation scores (and resumable checkpoints) per run, "
                                    "evenly spaced in steps; null = one per pass over the rows")
    labeled_repeat: int = Field(1, ge=1, description="with a cache: every pass shows each labeled row this many "
                                "times (the others once), so the CE term sees more labeled rows per step")
    lr: float = Field(0.05, gt=0, description="peak learning rate of SGD with Nesterov momentum")
    workers: int = Field(0, ge=0, description="DataLoader worker processes that build batches (0: in the training "
                         "process; benchmarks/student_loop.py compares worker counts)")
    loss: dict[str, dict[str, Any] | None] = Field(
        default_factory=lambda: {"kd": {}},
        description="distillation methods and their settings, e.g. {kd: {temperature: 4}, at: {pairs: [[block2, "
                    "layer2]]}} (logitcache methods lists them); {} trains with cross-entropy alone, without a cache")
    ce_weight: NonNegative = Field(1.0, description="weight of cross-entropy on the labeled rows (a value or a schedule)")
    caches: list[str] = Field(["data/cache/train.h5"], description="training-split caches; several = ensemble")
    test_cache: str | None = Field("data/cache/test.h5", description="test-split cache for agreement/KL metrics")
    teacher: str = Field("data/teacher/teacher.pt", description="teacher checkpoint, used only with --online")
    online: bool = Field(False, description="reference mode: compute the same targets with the live teacher")
    view_sampling: Literal["random", "round_robin"] = Field("random", description="which cached view of each sample "
                                                            "an epoch uses")
    augment: AugmentConfig | None = Field(None, description="random augmentation; with a cache only for 1-view caches "
                                          "and force_augment")
    force_augment: bool = Field(False, description="accept random augmentation on top of a 1-view cache (the "
                                "teacher's targets then belong to other inputs)")
    image_size: int | None = Field(None, ge=8, le=1024, description="the student's input side: each view's box is "
                                   "rendered at this size (random_resized_crop views; e.g. 160 for a 224-pixel "
                                   "teacher); null = the teacher's view size")
    mean: list[float] | None = Field(None, description="the student's own input normalisation mean per channel; "
                                     "null = the data set's statistics")
    std: list[float] | None = Field(None, description="the student's own input normalisation std per channel; "
                                    "null = the data set's statistics")
    labeled_fraction: float = Field(1.0, gt=0, le=1, description="fraction of training rows whose labels CE uses; "
                                    "distillation terms use every cached row")
    labeled_indices: str | None = Field(None, description="JSON file with a list of labeled sample indices")
    labels_seed: int = Field(0, ge=0, description="seed of the labeled subset, shared by every student seed")
    feature_budget_mb: float = Field(1024, ge=0, description="hold cached features in RAM up to this size")
    shuffle_block: int = Field(256, ge=1, description="each epoch shuffles blocks of this many consecutive rows "
                               "(1 = single rows); the same order whether the cache is read from RAM or disk")
    seeds: list[int] | None = Field(None, min_length=1, description="train once per seed "
                                       "(all different), in <out>/runs/seed<N>/, with mean and std in <out>; null = "
                                       "one run in <out> with seed")
    init: str | None = Field(None, description="start from this checkpoint's weights and architecture, e.g. a "
                             "model from `logitcache prune`; its base model must be `model`")
    latency: bool = Field(True, description="end the run by timing the trained model at batch 1 (metrics "
                          "latency_ms, latency_p90_ms; `logitcache export` times it at length); false: no timing, "
                          "both null")
    out: str = Field("data/students/default", description="folder of student.pt, metrics.json, history.json and "
                     "config.json; with seeds, each seed's run is in runs/seed<N>/ and metrics.json holds mean and std")

    _check_files = field_validator("labeled_indices", "teacher", "test_cache", "init")(_file)

    @model_validator(mode="after")
    def _normalisation_pairs(self) -> "StudentConfig":
        if (self.mean is None) != (self.std is None) or (self.mean is not None and len(self.mean) != len(self.std)):
            raise ValueError("mean and std: give both, one value per input channel each, or neither")
        if self.std is not None and not all(s > 0 for s in self.std):
            raise ValueError(f"std {self.std}: every value must be positive")
        return self

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds):
        if seeds is not None and len(set(seeds)) < len(seeds):
            raise ValueError("seeds must differ: each trains into <out>/runs/seed<N>/ and the spread is taken over them")
        return seeds


class ExportConfig(Section):
    """logitcache export: ONNX, torch.export and int8 ONNX of a checkpoint, checked on the test split and timed."""

    out: str = Field("data/deploy", description="exports go to <out>/<name>/")
    opset: int = Field(18, ge=18, le=23, description="ONNX opset of the exported model")
    atol: float = Field(1e-4, gt=0, description="largest |logit difference| an fp32 export may have from PyTorch "
                        "on the test split")
    calibration_cache: str | None = Field("data/cache/train.h5", description="training cache whose replayed views "
                                          "calibrate static int8; None = dynamic int8")
    calibration_images: int = Field(256, ge=1, description="replayed training views that calibrate int8")
    calibration_seed: int = Field(0, ge=0, description="seed of the calibration views' choice")
    latency_runs: int = Field(200, ge=1, description="timed batch-1 runs per runtime (median and p90)")
    warmup_runs: int = Field(20, ge=0, description="untimed runs before timing each runtime")
    throughput_runs: int = Field(10, ge=1, description="timed batch-256 runs per runtime")
    threads: int | None = Field(None, ge=1, description="CPU threads of every runtime; None = torch's default")

    _check_out = field_validator("out")(_folder)
    _check_cache = field_validator("calibration_cache")(_file)


class PruneConfig(Section):
    """logitcache prune: structured channel pruning of a checkpoint."""

    ratio: float = Field(0.4, gt=0, lt=1, description="fraction of every layer's channels removed (output layer kept)")
    out: str = Field("data/pruned/teacher.pt", description="the pruned checkpoint; metrics.json beside it")

    _check_out = field_validator("out")(_file)


class Params(Section):
    data: DataConfig = Field(DataConfig(), description="the data set (prepare-data; every stage reads it)")
    teacher: TeacherConfig = Field(TeacherConfig(), description="the teacher (train-teacher)")
    dump: DumpConfig = Field(DumpConfig(), description="the cache (dump-teacher)")
    students: dict[str, StudentConfig] = Field(default_factory=dict, description="train-student NAME trains "
                                               "students.NAME; a key left out takes the student default")
    export: ExportConfig = Field(ExportConfig(), description="deployable exports (export)")
    prune: PruneConfig = Field(PruneConfig(), description="structured channel pruning (prune)")

    @field_validator("students")
    @classmethod
    def _names_are_plain(cls, students):
        """A student's name is also the name of its export folder (summarize reads <export.out>/<name>/)."""
        from logitcache.core.io import plain_name

        for name in students:
            try:
                plain_name(name, "student name")
            except LogitcacheError as e:
                raise ValueError(str(e)) from None
        return students

    @model_validator(mode="after")
    def _selection_needs_validation(self):
        if self.data.validation == 0:
            chosen = {"teacher": self.teacher, **{f"students.{k}": v for k, v in self.students.items()}}
            best = [name for name, cfg in chosen.items() if cfg.select == "best"]
            if best:
                raise ValueError(f"{best[0]}.select: best needs a validation split; set data.validation > 0 or "
                                 f"{best[0]}.select: last")
        return self

    def student(self, name: str) -> StudentConfig:
        if name in self.students:
            return self.students[name]
        if name == "default":
            return StudentConfig()
        known = ", ".join(self.students) or "none"
        raise LogitcacheError(f"no student '{name}' in params (students: {known}); add it under students:")


def load_params(path: str | Path | None = None, overrides: list[str] = (), flags: dict[str, str] | None = None) -> Params:
    """Read params.yaml (defaults when absent and not asked for), apply `a.b=value` overrides, validate.

    `flags` maps a command-line flag to the override it stands for (e.g. {"--views": "dump.views=0"}); they apply
    before `overrides`. An invalid value is reported as the flag or `-S` override that set it, if one did.
    """
    raw = _read_yaml(path)
    given = [*((f"{flag} ({item.partition('=')[0]})", item) for flag, item in (flags or {}).items()),
             *((f"-S {item}", item) for item in overrides)]
    for _, item in given:
        _apply_override(raw, item)
    return validate(raw, source=str(path or DEFAULT_PARAMS), given=given)


def validate(raw: dict[str, Any], source: str = "params", given: list[tuple[str, str]] = ()) -> Params:
    """The typed configuration, or one line naming the first bad key: as the (label, "key=value") override
    of `given` that set it, else as `source`."""
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        key, message = _one_line(e)
        label, target = next(((label, item.partition("=")[0]) for label, item in reversed(given)
                              if _sets(item.partition("=")[0], key)), (source, None))
        if target == key:
            message = message.removeprefix(f"{key}: ")  # the label names the key already
        raise LogitcacheError(f"invalid {label}: {message}") from None


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
    try:
        node[leaf] = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise LogitcacheError(f"override {item!r}: the value is not valid YAML ({str(e).splitlines()[0]}); close its "
                              "brackets or quotes, e.g. seeds=[0, 1]") from None


def _sets(target: str, key: str) -> bool:
    """Whether an override of `target` sets `key` (itself, a key inside that section, or the unknown section
    `target` is inside)."""
    return key == target or key.startswith(target + ".") or target.startswith(key + ".")


def _one_line(error: ValidationError) -> tuple[str, str]:
    """The first error's key and its one-line message."""
    first = error.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        parts = [str(p) for p in first["loc"]]
        if len(parts) == 3 and parts[0] == "students" and parts[2] in TeacherConfig.model_fields:
            return loc, f"students do not use '{parts[2]}' (a teacher setting); remove '{loc}'"
        return loc, f"unknown key '{loc}'; check its spelling against docs/params.md"
    msg = first["msg"].removeprefix("Value error, ")
    if not loc:  # a check across sections names its keys itself
        return loc, msg
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return loc, f"{loc}: {msg}, got {first.get('input')!r}{more}"
