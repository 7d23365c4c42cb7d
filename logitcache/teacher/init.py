"""Where teacher training starts: a fresh model, or a checkpoint to fine-tune (`teacher.init`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from logitcache.core.config import TeacherConfig
from logitcache.core.data import Split
from logitcache.core.errors import LogitcacheError
from logitcache.core.io import load_model
from logitcache.core.models import build_model
from logitcache.core.preprocess import Preprocess, TeacherInput


@dataclass
class Start:
    """The model training starts from, its input preprocessing, and what its checkpoint passes on."""

    model: nn.Module
    preprocess: Preprocess
    in_channels: int
    head: list[str] = field(default_factory=list)  # parameter names of a newly made head
    inherited: dict = field(default_factory=dict)  # model_info the fine-tuned checkpoint keeps (class map, source)

    def parameter_groups(self, cfg: TeacherConfig):
        """Every parameter at lr; with backbone_lr, all but the head at that peak instead."""
        if cfg.backbone_lr is None:
            return self.model.parameters()
        head = set(self.head or _last_layer(self.model))
        named = list(self.model.named_parameters())
        return [{"params": [p for n, p in named if n not in head], "lr": cfg.backbone_lr},
                {"params": [p for n, p in named if n in head]}]


def initial_teacher(cfg: TeacherConfig, train: Split) -> Start:
    """`cfg.model` freshly initialised for the data; or, with `cfg.init`, that checkpoint's weights and
    preprocessing, with a new head (seeded) where its class count is not the data's."""
    if not cfg.init:
        model = build_model(cfg.model, train.channels, train.num_classes)
        return Start(model, Preprocess.of_data(train.channels, train.image_size, train.mean, train.std), train.channels)
    model, ckpt = load_model(cfg.init)
    info = ckpt["model_info"]
    if info["model"] != cfg.model:
        raise LogitcacheError(f"teacher.init {cfg.init} holds a {info['model']}, teacher.model is {cfg.model}; "
                              f"set teacher.model={info['model']}")
    preprocess = Preprocess.of_checkpoint(info) or Preprocess.of_data(train.channels, train.image_size, train.mean,
                                                                      train.std)
    TeacherInput(preprocess, train.channels)  # refuses channel counts it cannot convert
    origin = {"checkpoint": str(cfg.init), "sha256": hashlib.sha256(Path(cfg.init).read_bytes()).hexdigest(),
              **({"source": info["source"]} if "source" in info else {})}
    if info["num_classes"] == train.num_classes:
        kept = {key: info[key] for key in ("class_map", "source_classes") if info.get(key)}
        return Start(model, preprocess, info["in_channels"], inherited={**kept, "init": origin})
    if info.get("class_map"):
        raise LogitcacheError(f"teacher.init {cfg.init} maps {info['num_classes']} classes, the data has "
                              f"{train.num_classes}; import it again with a class map for this data, or without one")
    fresh = build_model(cfg.model, info["in_channels"], train.num_classes)
    head = _load_all_but_head(fresh, model.state_dict(), cfg.init)
    return Start(fresh, preprocess, info["in_channels"], head, {"init": {**origin, "new_head": head}})


def _load_all_but_head(model: nn.Module, state: dict, path) -> list[str]:
    """Load every tensor whose shape fits; those that do not (the classifier) stay freshly initialised."""
    own = model.state_dict()
    head = [k for k in own if k in state and own[k].shape != state[k].shape]
    result = model.load_state_dict({k: v for k, v in state.items() if k not in head}, strict=False)
    if result.missing_keys != head or result.unexpected_keys:
        raise LogitcacheError(f"teacher.init {path} does not fit a new head: missing {result.missing_keys[:3]}, "
                              f"unexpected {result.unexpected_keys[:3]}; check teacher.model")
    return head


def _last_layer(model: nn.Module) -> list[str]:
    """Parameter names of the last module that holds parameters of its own (the classifier of most models)."""
    owners = [name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    last = owners[-1]
    return [f"{last}.{n}" if last else n for n, _ in model.get_submodule(last).named_parameters(recurse=False)]
