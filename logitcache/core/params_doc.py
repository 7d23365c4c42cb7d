"""docs/params.md, generated from the field descriptions of `config.Params` so that it cannot drift."""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from logitcache.core.config import Params

COMMAND = "logitcache params-doc > docs/params.md"
_BOUNDS = {annotated_types.Ge: ("≥", "ge"), annotated_types.Gt: (">", "gt"), annotated_types.Le: ("≤", "le"),
           annotated_types.Lt: ("<", "lt")}


def render_params_doc(root: type[BaseModel] = Params) -> str:
    """Markdown: one table (key, type, default, description) per section of `root`, nested sections after."""
    sections = _sections(root)
    lines = [
        "# Parameters",
        "",
        f"<!-- Generated from the field descriptions in logitcache/core/config.py by `{COMMAND}`; do not edit. -->",
        "",
        "`params.yaml` holds one section per stage. A key left out takes the default below; a command's flag or",
        "`-S section.key=value` overrides one key on the command line. Unknown keys and bad values are refused",
        "before any work, with one line naming the key.",
        "",
        "| section | what it configures |",
        "|---|---|",
        *(f"| `{path}` | {_text(_described(root, path.partition('.')[0]))} |" for path in _top_level(sections)),
    ]
    for model, paths in sections.items():
        lines += ["", f"## {', '.join(paths)}", ""]
        if model.__doc__:
            lines += [_text(" ".join(model.__doc__.split())), ""]
        lines += _table(model)
    return "\n".join(lines) + "\n"


def _sections(root: type[BaseModel]) -> dict[type[BaseModel], list[str]]:
    """Every section model under `root`, outer ones first, with the paths it appears at."""
    found: dict[type[BaseModel], list[str]] = {}
    todo = [(root, "")]
    while todo:
        model, prefix = todo.pop(0)
        for name, field in model.model_fields.items():
            inner = _section_of(field.annotation)
            if inner is None:
                continue
            path = prefix + name + (".NAME" if get_origin(field.annotation) is dict else "")
            if inner not in found:
                todo.append((inner, path + "."))
            found.setdefault(inner, []).append(path)
    return found


def _top_level(sections: dict[type[BaseModel], list[str]]) -> list[str]:
    return [path for paths in sections.values() for path in paths if "." not in path.removesuffix(".NAME")]


def _described(model: type[BaseModel], name: str) -> str:
    description = model.model_fields[name].description
    if not description:
        raise ValueError(f"{model.__name__}.{name} has no description; add description= to its Field")
    return description


def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The section model a field holds: directly, as `X | None`, or as the values of a mapping."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    args = get_args(annotation)[1:] if get_origin(annotation) is dict else get_args(annotation)
    return next((s for s in map(_section_of, args) if s is not None), None)


def _table(model: type[BaseModel]) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        default = "required" if field.is_required() else _code(_yaml(field.get_default(call_default_factory=True)))
        kind = ", ".join([_code(_type(field.annotation)), *_bounds(field.metadata)])
        rows.append(f"| `{name}` | {kind} | {default} | {_text(_described(model, name))} |")
    return rows


def _type(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    if origin is Literal:
        return " | ".join(f'"{a}"' for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type(a) for a in args)}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return annotation.__name__


def _bounds(metadata: list) -> list[str]:
    words = [f"{_BOUNDS[type(m)][0]} {getattr(m, _BOUNDS[type(m)][1])}" for m in metadata if type(m) in _BOUNDS]
    words += [f"at least {m.min_length} item" + "s" * (m.min_length != 1) for m in metadata
              if isinstance(m, annotated_types.MinLen)]
    return words


def _yaml(value: Any) -> str:
    """A value as it is written in params.yaml."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    value = to_jsonable_python(value, exclude_none=False)
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("\n...\n").strip()


def _code(text: str) -> str:
    """Code in a table cell: a `|` would end the cell."""
    return "`" + text.replace("|", "\\|") + "`"


def _text(text: str) -> str:
    """Prose in Markdown: <out> and the like are not HTML tags, and a `|` would end a table cell."""
    return text.replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
