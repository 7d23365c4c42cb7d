"""`logitcache import-teacher`: a pretrained model from a local weight file -> an ordinary teacher checkpoint.

Nothing is downloaded and nothing is unpickled: a torch file is read with weights_only=True, a .safetensors
file with safetensors. The checkpoint records where the weights came from (architecture, the file's SHA-256,
the class map) and the teacher's preprocessing; dump-teacher, inspect and train-student read it unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from logitcache.core.config import Params, save_config
from logitcache.core.data import holdout, load_split
from logitcache.core.errors import LogitcacheError
from logitcache.core.io import _load_failure, check_output_folder, load_checkpoint, save_checkpoint, write_json
from logitcache.core.models import ClassMap, build_model
from logitcache.core.preprocess import Preprocess, TeacherInput, preprocess_input
from logitcache.core.training import place, select_device, validation_scorer

CHECKPOINT = "teacher.pt"
OUTPUTS = (CHECKPOINT, "metrics.json", "config.json")
WRAPPER_KEYS = ("state_dict", "model")  # the usual containers of a state_dict in a training checkpoint


@dataclass(frozen=True)
class DataShape:
    """What the import needs to know of the prepared data: its classes, channels, image size and statistics."""

    classes: list[str]
    channels: int
    image_size: tuple[int, int] | None  # None: images of many sizes (an image folder)
    mean: tuple[float, ...]
    std: tuple[float, ...]


def import_teacher(params: Params, weights: str | Path, *, num_classes: int | None = None,
                   class_map: str | Path | None = None) -> dict:
    """Check every input, build `teacher.model` with the file's weights, write <teacher.out>/teacher.pt,
    metrics.json (its validation score where its classes are the data's) and config.json; returns the metrics."""
    cfg, weights = params.teacher, Path(weights)
    out = Path(cfg.out)
    data = _data_shape(params)
    _check_outputs(out, weights)
    state = read_state_dict(weights)
    family = cfg.model.partition(":")[1] != ""
    channels = 3 if family else data.channels  # a pretrained family model is RGB; grey data is repeated for it
    classes = num_classes or len(data.classes)
    indices = read_class_map(class_map, data.classes, classes) if class_map else None
    model = build_model(cfg.model, channels, classes)
    load_weights(model, state, weights, cfg.model)
    preprocess = _preprocess(model, cfg, data, weights, channels)
    TeacherInput(preprocess, data.channels)  # refuses channel counts it cannot convert, before writing
    teacher = ClassMap(model, indices) if indices else model
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    info = {"model": cfg.model, "in_channels": channels, "num_classes": len(indices) if indices else classes,
            "source_classes": classes, "class_map": indices, "preprocess": preprocess.to_json(),
            "source": {"weights": str(weights), "sha256": digest,
                       "format": "safetensors" if weights.suffix == ".safetensors" else "torch"}}
    metrics = {**_score(params, teacher.eval(), info, preprocess, data), "source_sha256": digest,
               "params": sum(p.numel() for p in teacher.parameters())}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    save_config({"data": params.data, "teacher": cfg}, out / "config.json")
    config = {"data": params.data.model_dump(mode="json"), "teacher": cfg.model_dump(mode="json"),
              "import": {"weights": str(weights), "num_classes": num_classes, "class_map": str(class_map or "") or None}}
    save_checkpoint(out / CHECKPOINT, {k: v.detach().cpu() for k, v in teacher.state_dict().items()}, config,
                    model_info=info)  # last: its presence means the import finished
    return metrics


def _data_shape(params: Params) -> DataShape:
    """The prepared training split's classes and shape, from meta.json (the arrays are read only to score)."""
    from logitcache.core.data import dataset_dir

    meta_path = dataset_dir(params.data) / "meta.json"
    if not meta_path.is_file():
        raise LogitcacheError(f"no prepared data at {meta_path.parent}; run `logitcache prepare-data` first "
                              "(the import fits the teacher to the data's classes and channels)")
    meta = json.loads(meta_path.read_text())
    return DataShape(list(meta["classes"]), meta["channels"], tuple(meta["image_size"]) if meta["image_size"] else None,
                     tuple(meta["mean"]),
                     tuple(meta["std"]))


def _check_outputs(out: Path, weights: Path) -> None:
    """The weight file must exist; the outputs may replace only an earlier import's, never the input itself."""
    if not weights.is_file():
        raise LogitcacheError(f"weight file {weights} does not exist or is not a file; give a state_dict saved with "
                              "torch.save or a .safetensors file")
    check_output_folder(out, "teacher.out")
    if any((out / name).resolve() == weights.resolve() for name in OUTPUTS):
        raise LogitcacheError(f"weight file {weights} is one of the outputs in {out}; import into another --out")
    present = [out / name for name in OUTPUTS if (out / name).exists()]
    if present and not _written_by_import(out):
        raise LogitcacheError(f"{present[0]} exists and was not written by import-teacher; give another --out "
                              "(teacher.out) or move it away")


def _written_by_import(out: Path) -> bool:
    """Whether the outputs in `out` are an earlier import's: its checkpoint names a source; without one (an import
    stopped before its last write), its metrics name the weight file's SHA-256."""
    if (out / CHECKPOINT).exists():
        try:
            return "source" in (load_checkpoint(out / CHECKPOINT).get("model_info") or {})
        except LogitcacheError:
            return False
    try:
        return "source_sha256" in json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weight file: safetensors, or torch.load(weights_only=True) of a state_dict, also inside
    a training checkpoint ({"state_dict": ...} or {"model": ...}) and with DataParallel's `module.` prefix."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except (SafetensorError, OSError) as e:
            raise LogitcacheError(f"weight file {path} cannot be read as safetensors ({str(e).splitlines()[0]}); "
                                  "it is damaged or in another format") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a pickle carrying code, or not a torch file
            remedy = "save the model's state_dict (torch.save(model.state_dict(), path)) or a .safetensors file"
            raise LogitcacheError(f"weight file {path} {_load_failure(e, remedy)}") from None
    return _unwrap(state, path)


def _unwrap(state, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(state, dict) and any(isinstance(state.get(k), dict) for k in WRAPPER_KEYS) \
            and not all(isinstance(v, torch.Tensor) for v in state.values()):
        state = next(state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), dict))
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LogitcacheError(f"weight file {path} holds no state_dict (a mapping of names to tensors, also under "
                              f"{' or '.join(WRAPPER_KEYS)}); save model.state_dict()")
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DistributedDataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    """Every name and every shape checked against the model before loading; one line naming the first mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        first = ", ".join(part for part in (f"missing {missing[0]!r}" if missing else "",
                                             f"unexpected {unexpected[0]!r}" if unexpected else "") if part)
        prefix = _common_prefix(unexpected, missing)
        cause = f"the file's names carry the prefix {prefix!r}" if prefix else "the file is for another architecture"
        raise LogitcacheError(f"weight file {path} does not fit {arch}: {len(missing)} key(s) missing, "
                              f"{len(unexpected)} unexpected ({first}); likely {cause}: check --arch")
    wrong = next((k for k in own if own[k].shape != state[k].shape), None)
    if wrong is not None:
        hint = (" (the head: set --num-classes to the file's class count)" if own[wrong].dim() and
                state[wrong].dim() == own[wrong].dim() and own[wrong].shape[1:] == state[wrong].shape[1:] else "")
        raise LogitcacheError(f"weight file {path}: {wrong} has shape {list(state[wrong].shape)}, {arch} needs "
                              f"{list(own[wrong].shape)}{hint}; check --arch and --num-classes")
    model.load_state_dict(state)


def _common_prefix(unexpected: list[str], missing: list[str]) -> str | None:
    """A prefix such that every unexpected key is a missing one with it prepended (e.g. 'backbone.')."""
    if not unexpected or not missing:
        return None
    key = unexpected[0]
    for name in missing:
        if key != name and key.endswith(name):
            prefix = key.removesuffix(name)
            if all(k.startswith(prefix) for k in unexpected):
                return prefix
    return None


def read_class_map(path: str | Path, classes: list[str], teacher_classes: int) -> list[int]:
    """A JSON class map -> the teacher output index of each data class, in the data's class order.

    Either a list (entry i: the teacher index of data class i) or an object keyed by class name or number."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LogitcacheError(f"class map {path} cannot be read as JSON ({str(e).splitlines()[0]}); give a list of "
                              "teacher indices or an object {data class: teacher index}") from None
    if isinstance(raw, dict):
        names = {str(i): name for i, name in enumerate(classes)} | {name: name for name in classes}
        unknown = [key for key in raw if key not in names]
        if unknown:
            raise LogitcacheError(f"class map {path}: {unknown[0]!r} is not a data class; the classes are "
                                  f"{', '.join(classes)} (or their numbers 0..{len(classes) - 1})")
        by_name = {names[key]: value for key, value in raw.items()}
        absent = [name for name in classes if name not in by_name]
        if absent:
            raise LogitcacheError(f"class map {path} does not map data class {absent[0]!r}; map every class")
        raw = [by_name[name] for name in classes]
    if not isinstance(raw, list) or len(raw) != len(classes):
        raise LogitcacheError(f"class map {path} must map each of the {len(classes)} data classes, "
                              f"got {len(raw) if isinstance(raw, (list, dict)) else type(raw).__name__} entries")
    for i, value in enumerate(raw):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < teacher_classes:
            raise LogitcacheError(f"class map {path}: data class {classes[i]!r} maps to {value!r}, not a teacher "
                                  f"output index in 0..{teacher_classes - 1}; fix it or set --num-classes")
    twice = next((v for i, v in enumerate(raw) if v in raw[:i]), None)
    if twice is not None:
        raise LogitcacheError(f"class map {path}: teacher output {twice} is mapped twice; each data class needs "
                              "its own teacher output")
    return list(raw)


def _preprocess(model: nn.Module, cfg, data: DataShape, weights: Path, channels: int) -> Preprocess:
    """The weights' own preprocessing (timm's pretrained_cfg, torchvision's weights transforms; the data's for a
    registry model), then teacher.preprocess's overrides."""
    family, _, name = cfg.model.partition(":")
    if family == "timm":
        own = _timm_preprocess(model, weights)
    elif family == "torchvision":
        own = _torchvision_preprocess(name, weights)
    else:
        own = Preprocess.of_data(channels, data.image_size, data.mean, data.std)
    return own.override(**cfg.preprocess.model_dump())


def _timm_preprocess(model: nn.Module, weights: Path) -> Preprocess:
    """timm's evaluation transform of the model's pretrained_cfg: resize to floor(size / crop_pct), center crop."""
    from timm.data import resolve_data_config

    config = resolve_data_config(pretrained_cfg={**model.pretrained_cfg, "file": str(weights)})
    size = config["input_size"][-1]
    if config.get("crop_mode", "center") != "center" or config["input_size"][-2] != size:
        raise LogitcacheError(f"timm preprocessing {config} is not a square center crop; set teacher.preprocess "
                              "(resize, crop) yourself")
    return Preprocess(math.floor(size / config["crop_pct"]), size, config["interpolation"], tuple(config["mean"]),
                      tuple(config["std"]), config["input_size"][0])


def _torchvision_preprocess(name: str, weights: Path) -> Preprocess:
    """The transforms of the torchvision weights this file is (by its published file name), else the default ones."""
    from torchvision.models import get_model_weights

    options = list(get_model_weights(name))
    chosen = next((w for w in options if Path(w.url).name == weights.name), get_model_weights(name).DEFAULT)
    t = chosen.transforms()
    return Preprocess(t.resize_size[0], t.crop_size[0], t.interpolation.value, tuple(t.mean), tuple(t.std), 3)


def _score(params: Params, teacher: nn.Module, info: dict, preprocess: Preprocess, data: DataShape) -> dict:
    """Validation accuracy where the teacher's outputs are the data's classes: a wrong preprocessing or class
    map shows at once."""
    if info["num_classes"] != len(data.classes):
        return {"val_acc": None, "scored": f"not scored: the teacher has {info['num_classes']} outputs, the data "
                                           f"{len(data.classes)} classes (give --class-map)"}
    train = load_split(params.data, "train")
    _, validation_rows = holdout(params.data, len(train))
    if not len(validation_rows):
        return {"val_acc": None, "scored": "not scored: data.validation is 0"}
    device = select_device(params.teacher.device)
    scores = validation_scorer(place(teacher, device), train, validation_rows, device,
                               preprocess_input(preprocess, train))()
    return {**scores, "scored": f"{len(validation_rows)} validation rows"}
