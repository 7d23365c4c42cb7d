"""Values that change over training: a constant, or a schedule from `start` to `end`.

Any float setting of a method (its weight, KD's temperature...) accepts either form:
`temperature: 4` or `temperature: {start: 8, kind: step, every: 2, factor: 0.5}` (halve it
every 2 epochs), or `weight: {start: 1, end: 0, kind: switch, at: 0.2}` (1 for the first 20 %
of the steps, 0 after: training in stages). `Progress` tells where training stands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


@dataclass(frozen=True)
class Progress:
    """Where training stands: `fraction` of all steps done (0 to 1) and `epoch` (completed epochs, fractional)."""

    fraction: float
    epoch: float


class Schedule(BaseModel):
    """A value moving from `start` towards `end` over training."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # NaN and infinity are never a setting

    start: float = Field(description="value at the start of training")
    end: float | None = Field(None, description="value at the end (linear, cosine); default: start")
    kind: Literal["constant", "linear", "cosine", "step", "switch"] = Field(
        "linear", description="linear/cosine: start -> end over training; step: start * factor^(epoch // every); "
                              "switch: start before fraction `at` of the steps, end from there on")
    every: float = Field(1.0, gt=0, description="step: epochs between steps")
    factor: float = Field(0.5, gt=0, description="step: multiplier applied at every step")
    at: float = Field(0.5, gt=0, lt=1, description="switch: the fraction of training where start gives way to end")

    @model_validator(mode="after")
    def _complete(self):
        if self.kind in ("linear", "cosine", "switch") and self.end is None:
            raise ValueError(f"a {self.kind} schedule needs end:")
        return self


Scheduled = Union[float, Schedule]


def _bounded(low: float, strict: bool):
    def check(value):
        ends = [value.start, value.end] if isinstance(value, Schedule) else [value]
        for v in ends:
            if v is not None and (v <= low if strict else v < low):
                raise ValueError(f"must be {'>' if strict else '>='} {low:g} (at every point of its schedule)")
        return value
    return AfterValidator(check)


NonNegative = Annotated[Scheduled, _bounded(0.0, strict=False)]  # weights
Positive = Annotated[Scheduled, _bounded(0.0, strict=True)]  # temperatures


def value_at(value: Scheduled, at: Progress) -> float:
    """The value of a constant or a schedule at this point of training."""
    if not isinstance(value, Schedule):
        return float(value)
    s, p = value, min(max(at.fraction, 0.0), 1.0)
    end = s.start if s.end is None else s.end
    if s.kind == "constant":
        return s.start
    if s.kind == "linear":
        return s.start + (end - s.start) * p
    if s.kind == "cosine":
        return end + (s.start - end) * (1 + math.cos(math.pi * p)) / 2
    if s.kind == "switch":
        return s.start if at.fraction < s.at else end
    return s.start * s.factor ** math.floor(at.epoch / s.every + 1e-9)
