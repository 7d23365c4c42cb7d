"""Distillation methods, one file each, and the registry that finds them.

A method file declares, in that file only:
- `name`, `family` (response, feature, relation or contrastive) and a one-line `description`;
- `Config`: a pydantic model holding only its own keys (every one with a default and a description);
- `needs(cfg)`: what it reads: teacher logits, cached teacher layers in a stored form, student layers;
- `__init__(cfg, ctx)`: its learnable parts (adapters, heads), from the shapes in `ctx`;
- `forward(student, teacher, batch, at)` returning its loss and a dict of named terms; a method with a
  `temperature` key reads the teacher's logits at it (`teacher.logits_at(T)`), one without at T = 1.

Decorating the class with `@register` is all it takes: config validation, `logitcache methods`,
the loader (what to read from the cache) and `--online` (what the live teacher computes) all
follow from these declarations. A student's loss is `ce_weight * CE + sum(weight * method loss)`.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from logitcache.cache.topk import TopK
from logitcache.core.config import Form
from logitcache.core.errors import LogitcacheError
from logitcache.core.schedule import NonNegative, Progress



@dataclass(frozen=True)
class TeacherInput:
    """A cached teacher layer in one stored form (see `dump.layers` and `logitcache.core.forms.FORMS`)."""

    layer: str
    form: Form = "map"

    def __str__(self) -> str:
        return f"{self.layer}:{self.form}"


@dataclass
class Needs:
    """What a method reads: the teacher's logits, cached teacher layers, student layers, whole-cache banks."""

    logits: bool = False
    teacher: list[TeacherInput] = field(default_factory=list)
    student: list[str] = field(default_factory=list)
    banks: list[TeacherInput] = field(default_factory=list)  # every sample's evaluation-view value, in memory


@dataclass
class Context:
    """What a method's constructor may size itself from."""

    num_classes: int
    num_samples: int
    student_shapes: dict[str, tuple[int, ...]]  # node -> shape of one sample
    teacher_shapes: dict[TeacherInput, tuple[int, ...]]  # -> shape of one sample's view
    banks: dict[TeacherInput, torch.Tensor] = field(default_factory=dict)  # -> (num_samples, ...)
    train_rows: torch.Tensor | None = None  # the rows the run trains on (validation rows are not); None: every row


@dataclass
class StudentOut:
    logits: torch.Tensor  # (B, classes), float32
    features: dict[str, torch.Tensor]  # student node -> (B, ...)


@dataclass
class TeacherOut:
    """The teacher's targets of a batch. A method with a temperature T reads `logits_at(T)`; one without reads
    `logits` (T = 1). Full logits are the same at every T; a top-k cache's rows are rebuilt for the T asked."""

    targets: list[torch.Tensor | TopK]  # one per cache: (B, classes) logits, or its top-k rows
    features: dict[TeacherInput, torch.Tensor]  # from the first cache

    @property
    def logits(self) -> list[torch.Tensor]:
        """One (B, classes) tensor per cache, right at T = 1."""
        return self.logits_at(1.0)

    def logits_at(self, temperature: float) -> list[torch.Tensor]:
        """One (B, classes) tensor per cache whose softmax at `temperature` is the teacher's."""
        return [t.logits(temperature) if isinstance(t, TopK) else t for t in self.targets]


@dataclass
class Batch:
    labels: torch.Tensor  # (B,) int64
    labeled: torch.Tensor  # (B,) float: 1 where the label may be used
    rows: torch.Tensor  # (B,) int64 sample indices
    world_size: int = 1  # processes the global batch is split over (relation losses gather across them)


class MethodConfig(BaseModel):
    """Keys every method has."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # NaN and infinity are never a setting

    weight: NonNegative = Field(1.0, description="weight of this method's loss in the total (a value or a schedule)")


class Method(nn.Module):
    name: ClassVar[str]
    family: ClassVar[str]
    description: ClassVar[str]
    paper: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, cfg: MethodConfig, ctx: Context):
        super().__init__()
        self.cfg = cfg

    @classmethod
    def needs(cls, cfg: MethodConfig) -> Needs:
        raise NotImplementedError

    def forward(self, student: StudentOut, teacher: TeacherOut, batch: Batch,
                at: Progress) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def learned_state(self) -> dict[str, torch.Tensor]:
        """What student.pt keeps of the method (adapters, heads); resume.pt keeps the whole state_dict."""
        return self.state_dict()


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method known by its `name`."""
    for attr in ("name", "family", "description"):
        if not isinstance(getattr(cls, attr, None), str):
            raise TypeError(f"method {cls.__name__} must set `{attr}`")
    if not issubclass(cls.Config, MethodConfig):
        raise TypeError(f"method {cls.__name__}: Config must derive from MethodConfig")
    METHODS[cls.name] = cls
    return cls


def methods() -> dict[str, type[Method]]:
    """Every registered method: the built-in ones in this package, plus any registered elsewhere."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    return dict(sorted(METHODS.items()))


def parse_loss(raw: dict[str, Any], where: str) -> dict[str, MethodConfig]:
    """`loss:` of a student -> each method's validated config; unknown methods and keys are one-line errors."""
    known = methods()
    parsed = {}
    for name, settings in (raw or {}).items():
        if name not in known:
            raise LogitcacheError(f"{where}.loss: unknown method '{name}'; `logitcache methods` lists them "
                                  f"({', '.join(known)})")
        cls = known[name]
        try:
            parsed[name] = cls.Config.model_validate(settings or {})
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            if first["type"] == "extra_forbidden":
                valid = ", ".join(cls.Config.model_fields)
                raise LogitcacheError(f"{where}.loss.{name}: unknown key '{loc}'; {name} takes {valid}") from None
            msg = first["msg"].removeprefix("Value error, ")
            raise LogitcacheError(f"{where}.loss.{name}.{loc}: {msg}, got {first.get('input')!r}") from None
    return parsed


def describe(cls: type[Method]) -> dict[str, Any]:
    """What `logitcache methods` and the docs show of a method."""
    keys = {name: {"default": "required" if f.is_required() else _shown(f.default), "description": f.description or ""}
            for name, f in cls.Config.model_fields.items()}
    needs = cls.needs(cls.Config.model_validate(_example(cls)))
    reads = (["logits"] if needs.logits else []) + [f"teacher {t}" for t in needs.teacher] + \
        [f"bank {t}" for t in needs.banks]
    return {"name": cls.name, "family": cls.family, "description": cls.description, "paper": cls.paper,
            "reads": reads, "keys": keys}


def markdown_table(described: list[dict[str, Any]]) -> str:
    """The methods as a Markdown table (`logitcache methods --markdown`, committed in docs/methods.md)."""
    lines = ["| method | family | reads from the cache | keys (default) |", "|---|---|---|---|"]
    for m in described:
        reads = ", ".join(f"`{r}`" for r in m["reads"]) or "student outputs only"
        keys = ", ".join(f"`{k}` ({_cell(spec['default'])})" for k, spec in m["keys"].items())
        lines.append(f"| `{m['name']}` | {m['family']} | {reads} | {keys} |")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    return str(value).replace("|", "\\|")


def _example(cls: type[Method]) -> dict:
    """Settings that validate, to ask a method what it reads by default."""
    return {name: f.json_schema_extra["example"] for name, f in cls.Config.model_fields.items()
            if f.is_required() and f.json_schema_extra and "example" in f.json_schema_extra}


def _shown(value):
    if isinstance(value, BaseModel):
        return value.model_dump()
    return value
