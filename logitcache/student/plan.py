"""Planning a student run: every input it reads is checked here, before any output folder is touched.

`plan_run` returns a `Plan`: the training data, the validation and labeled rows, the methods and what they
read, and (when the student distils) what the caches hold. Checks of a run's inputs belong in this module.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from logitcache.cache.reader import Cache
from logitcache.cache.topk import format_grid, in_grid
from logitcache.core.config import Params, StudentConfig
from logitcache.core.data import Split, check_prepared, holdout, load_split, split_identity
from logitcache.core.errors import LogitcacheError
from logitcache.core.preprocess import BoxInput, Preprocess
from logitcache.core.schedule import Progress, Schedule, value_at
from logitcache.core.views import BoxRenderer, Normalizer, ViewRenderer, ViewSpec
from logitcache.student.checks import check_same_teacher
from logitcache.student.methods import MethodConfig, Needs, TeacherInput, methods, parse_loss


@dataclass(frozen=True)
class CacheInfo:
    """What training needs to know of its caches (read from the first; every other one is checked to match)."""

    views: np.ndarray  # (N, V, 4) view parameters, replayed by the student's batches
    spec: ViewSpec  # the augmentation policy the views were drawn from
    shapes: dict[TeacherInput, tuple[int, ...]]  # one sample's view of each teacher input the methods read
    layers: dict[str, dict]  # layer name -> its record (forms and their settings)
    topk: int | None
    preprocess: Preprocess | None  # the teacher's, with which the cached views were rendered
    topk_temperatures: tuple[float, ...] | None  # the temperatures a top-k cache's targets are right at
    teacher_sha256: str
    logits_dtype: str

    @property
    def num_views(self) -> int:
        return self.views.shape[1]


@dataclass
class Plan:
    """What a run needs to know before building anything: data, labeled rows, caches, methods and their needs."""

    train: Split
    validation: np.ndarray  # the held-out rows that score each evaluation, never trained on
    labeled: np.ndarray  # bool per training row: may CE use its label
    rows: np.ndarray  # the rows a pass iterates over (labeled ones `labeled_repeat` times)
    methods: dict[str, MethodConfig]
    needs: Needs  # union over the methods
    cache: CacheInfo | None  # None for a CE-only student
    view: "StudentView"  # how the student renders and normalises its inputs


@dataclass(frozen=True)
class StudentView:
    """How the student sees its views: box views (random_resized_crop) are rendered at its own side `box.size`
    (None: pad-and-crop views, which keep the data's pixels), then normalised with its own mean and std."""

    box: BoxInput | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    own_normalisation: bool

    @property
    def info(self) -> dict:
        """What the student's checkpoint records of its input, beyond the data's defaults (nothing for those)."""
        return {**({"box_input": self.box.to_json()} if self.box else {}),
                **({"normalize": {"mean": list(self.mean), "std": list(self.std)}} if self.own_normalisation else {})}

    def renderer(self, spec: ViewSpec) -> ViewRenderer | BoxRenderer:
        return BoxRenderer(spec, self.box.size, self.box.interpolation) if spec.boxes else ViewRenderer(spec)

    def normalizer(self) -> Normalizer:
        return Normalizer(self.mean, self.std)


def mode_name(cfg: StudentConfig) -> str:
    return "+".join(cfg.loss) or "ce"


def plan_run(params: Params, cfg: StudentConfig, name: str) -> Plan:
    """Validate everything the run reads, before any output folder is touched."""
    chosen = parse_loss(cfg.loss, f"students.{name}")
    needs = union([methods()[m].needs(c) for m, c in chosen.items()])
    train = load_split(params.data, "train")
    check_prepared(params.data)  # the test split too, read once after training
    train_rows, validation = holdout(params.data, len(train))
    labeled = labeled_mask(cfg, len(train), train_rows)
    if not chosen:
        rows = np.flatnonzero(labeled)
    else:
        rows = np.concatenate([train_rows, *[np.flatnonzero(labeled)] * (cfg.labeled_repeat - 1)])
    temperatures = logit_temperatures(chosen, name, last_epoch(cfg, len(rows)))
    cache = open_caches(cfg, train, needs, temperatures) if chosen else None
    check_test_cache(params, cfg)
    check_same_teacher(cfg, cache.teacher_sha256 if cache else None)
    return Plan(train, validation, labeled, rows, chosen, needs, cache, student_view(cfg, name, train, cache))


def student_view(cfg: StudentConfig, name: str, train: Split, cache: CacheInfo | None) -> StudentView:
    """The student's input: with box views, their boxes at `image_size` (default: the teacher's input side) with the
    teacher's interpolation and evaluation region; its own mean and std, or the data's."""
    rendered = cfg.augment if cfg.augment and (cache is None or cfg.force_augment) else None  # fresh random views
    spec = ViewSpec.from_config(rendered) if rendered else (cache.spec if cache else None)
    boxes = spec is not None and spec.boxes
    if cfg.image_size is not None and not boxes:
        raise LogitcacheError(f"students.{name}.image_size needs box views (augment kind random_resized_crop); "
                              "pad-and-crop views keep the data's size: remove image_size")
    box = None
    if boxes:
        pre = cache.preprocess if cache else None
        box = BoxInput.of_teacher(pre) if pre else BoxInput(None, "bilinear", None, None)
        box = replace(box, size=cfg.image_size or box.size)
    if train.is_files and (box is None or box.size is None):
        raise LogitcacheError(f"the images of {train.dataset} differ in size: students.{name} needs box views at one "
                              "size (a random_resized_crop cache, or image_size)")
    own = cfg.mean is not None
    if own and len(cfg.mean) != train.channels:
        raise LogitcacheError(f"students.{name}.mean has {len(cfg.mean)} values, the data has {train.channels} "
                              "channel(s); give one mean and std per channel")
    return StudentView(box, tuple(cfg.mean) if own else train.mean, tuple(cfg.std) if own else train.std, own)


def last_epoch(cfg: StudentConfig, rows: int) -> float:
    """At least the epoch (`Progress.epoch`) of the run's last step: a pass has ceil(rows / batch) batches in one
    process, one fewer under torchrun at worst."""
    if cfg.steps is None:
        return cfg.epochs - 1 / -(-rows // cfg.batch_size)
    return (cfg.steps - 1) / max(1, rows // cfg.batch_size)


def check_test_cache(params: Params, cfg: StudentConfig) -> None:
    """Checked before training, from its metadata: the test split itself is read once, after training."""
    if cfg.test_cache and Path(cfg.test_cache).exists():
        with Cache(cfg.test_cache) as cache:
            cache.check_identity(split_identity(params.data, "test"))
            check_temperatures(cfg.test_cache, cache, {"the test metrics' temperature (KL to the teacher)": [1.0]})


def union(all_needs: list[Needs]) -> Needs:
    def unique(items):
        return list(dict.fromkeys(items))
    return Needs(logits=any(n.logits for n in all_needs), teacher=unique(t for n in all_needs for t in n.teacher),
                 student=unique(s for n in all_needs for s in n.student), banks=unique(b for n in all_needs for b in n.banks))


def labeled_mask(cfg: StudentConfig, n: int, train_rows: np.ndarray) -> np.ndarray:
    """Which rows the CE term may use: an explicit index list, or a seeded fraction of the training rows (never a
    validation row) shared by all student seeds."""
    mask = np.zeros(n, dtype=bool)
    if cfg.labeled_indices:
        mask[_labeled_indices(Path(cfg.labeled_indices), n, train_rows)] = True
        return mask
    count = max(1, round(cfg.labeled_fraction * len(train_rows)))
    mask[np.random.default_rng(cfg.labels_seed).permutation(train_rows)[:count]] = True
    return mask


def _labeled_indices(path: Path, n: int, train_rows: np.ndarray) -> np.ndarray:
    if not path.is_file():
        raise LogitcacheError(f"labeled_indices file {path} does not exist")
    try:
        values = json.loads(path.read_text())
    except ValueError:
        values = None
    if not isinstance(values, list) or not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise LogitcacheError(f"labeled_indices file {path} must hold a non-empty JSON list of integer sample indices")
    indices = np.asarray(values, dtype=np.int64)
    if indices.min() < 0 or indices.max() >= n:
        raise LogitcacheError(f"labeled_indices in {path} must be integers in [0, {n})")
    held = np.setdiff1d(indices, train_rows)
    if len(held):
        raise LogitcacheError(f"labeled_indices in {path} include {len(held)} validation row(s), first "
                              f"{held[:5].tolist()}; leave them out, or change data.validation / validation_seed")
    return indices


def logit_temperatures(chosen: dict[str, MethodConfig], name: str,
                       last: float) -> dict[str, list[float | Schedule]]:
    """`students.NAME.loss.METHOD.temperature` -> the temperatures that method reads the teacher's logits at up to
    epoch `last`: its `temperature` (every value of a switch or step schedule; linear and cosine ones as they
    are), or 1 without one."""
    out = {}
    for method, mcfg in chosen.items():
        if not methods()[method].needs(mcfg).logits:
            continue
        values = _values(getattr(mcfg, "temperature", 1.0), last)
        out[f"students.{name}.loss.{method}.temperature"] = values
    return out


def _values(t: float | Schedule, last: float) -> list[float | Schedule]:
    """The values a temperature setting takes up to epoch `last`: a constant, both ends of a switch, every step of
    a step schedule (as `value_at` computes them); linear and cosine schedules as they are."""
    if not isinstance(t, Schedule):
        return [float(t)]
    if t.kind == "step":
        return [value_at(t, Progress(0.0, j * t.every)) for j in range(math.floor(last / t.every + 1e-9) + 1)]
    return [t.start] if t.kind == "constant" else [t.start, t.end] if t.kind == "switch" else [t]


def check_temperatures(path: str, cache: Cache, temperatures: dict[str, list[float | Schedule]]) -> None:
    """A top-k cache's targets are right at its grid's temperatures only: refuse any other before training."""
    grid = cache.topk_temperatures
    if grid is None:
        return
    for key, values in temperatures.items():
        for t in values:
            if isinstance(t, Schedule):
                raise LogitcacheError(f"{key} is a {t.kind} schedule, but {path} holds top-k targets at the "
                                      f"temperatures {format_grid(grid)} only; give a constant, or a switch or "
                                      "step schedule through listed temperatures, or use a full-logit cache "
                                      "(dump.topk: null)")
            if not in_grid(grid, t):
                raise LogitcacheError(f"{key} is {t:g}, but {path} holds top-k targets at the temperatures "
                                      f"{format_grid(grid)} only; re-dump it with dump.topk_temperatures including "
                                      f"{t:g}, or use a full-logit cache (dump.topk: null)")


def open_caches(cfg: StudentConfig, train: Split, needs: Needs,
                temperatures: dict[str, list[float | Schedule]] | None = None) -> CacheInfo:
    """Check every cache against the training data, each other and the temperatures its logits are read at;
    return what training needs of them."""
    if not cfg.caches:
        raise LogitcacheError(f"students with a loss: ({', '.join(cfg.loss)}) need at least one cache in caches:")
    first: CacheInfo | None = None
    for path in cfg.caches:
        with Cache(path) as cache:
            cache.check_matches(train)
            check_temperatures(path, cache, temperatures or {})
            if first is None:
                first = _cache_info(cfg, cache, needs)
            elif not np.array_equal(cache.view_params(), first.views):
                raise LogitcacheError(f"{path} holds other views than {cfg.caches[0]}; several caches must share views")
            if cache.num_classes != train.num_classes:
                raise LogitcacheError(f"{path} has {cache.num_classes} classes, the data has {train.num_classes}")
    return first


def _cache_info(cfg: StudentConfig, cache: Cache, needs: Needs) -> CacheInfo:
    stored = cache.stored
    missing = [str(t) for t in [*needs.teacher, *needs.banks] if (t.layer, t.form) not in stored]
    if missing:
        have = ", ".join(f"{layer}:{form}" for layer, form in stored) or "none"
        raise LogitcacheError(f"{cfg.caches[0]} does not store {', '.join(missing)} (cached: {have}); dump them with "
                              "dump.layers, e.g. {name: layer2, forms: [map, attention, embedding]}")
    return CacheInfo(views=cache.view_params(), spec=cache.spec,
                     shapes={t: stored[(t.layer, t.form)] for t in [*needs.teacher, *needs.banks]},
                     layers=cache.layers, topk=cache.topk, topk_temperatures=cache.topk_temperatures,
                     preprocess=cache.preprocess,
                     teacher_sha256=cache.teacher_sha256,
                     logits_dtype=cache.dtypes["logits"])
