"""Top-k targets: the k largest logits of a row, plus the leftover mass at each temperature of a grid.

Phase one summarises with `topk_summary` before writing; the reader and `--online` rebuild full logits with
`logits_from_topk`. The missing classes share their true leftover mass at the requested temperature T
(one of the grid's), so softmax(rebuilt / T) equals the teacher's top-k probabilities and leftover mass at T.
A single fill right at T = 1 only would give the missing classes too much mass at every T > 1 (power-mean
inequality): the grid stores, per temperature, what the missing classes sum to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from logitcache.core.errors import LogitcacheError


@dataclass(frozen=True)
class TopK:
    """Top-k rows of a batch or a cache: `values`/`indices` (..., k), descending; `rest` (..., G): log-sum-exp
    over the missing classes of z / T for each temperature T of `temperatures` (length G)."""

    values: torch.Tensor
    indices: torch.Tensor
    rest: torch.Tensor
    temperatures: tuple[float, ...]
    num_classes: int

    def logits(self, temperature: float) -> torch.Tensor:
        """(..., C) logits whose softmax at `temperature` (a grid temperature) matches the teacher's."""
        g = grid_position(self.temperatures, temperature)
        return logits_from_topk(self.values, self.indices, self.rest[..., g], self.num_classes,
                                self.temperatures[g])

    def to(self, device) -> "TopK":
        return TopK(self.values.to(device), self.indices.to(device), self.rest.to(device), self.temperatures,
                    self.num_classes)

    def pin_memory(self) -> "TopK":
        return TopK(self.values.pin_memory(), self.indices.pin_memory(), self.rest.pin_memory(), self.temperatures,
                    self.num_classes)


def topk_summary(logits: torch.Tensor, k: int, temperatures: tuple[float, ...]) -> TopK:
    """The k largest logits of every row (last axis) and, per temperature, the log-sum-exp of the others / T.

    The sums are taken in float64 and returned in the logits' dtype."""
    values, indices = logits.topk(k, dim=-1)
    missing = logits.double().scatter(-1, indices, float("-inf"))
    rest = torch.stack([torch.logsumexp(missing / t, dim=-1) for t in temperatures], dim=-1)
    return TopK(values, indices, rest.to(logits.dtype), tuple(float(t) for t in temperatures), logits.shape[-1])


def logits_from_topk(values: torch.Tensor, indices: torch.Tensor, rest: torch.Tensor, num_classes: int,
                     temperature: float) -> torch.Tensor:
    """Full logits from a top-k row: known classes exact, the C - k others share the leftover mass at T evenly.

    With `rest` the log-sum-exp of the missing logits / T, each missing class gets
    fill = T * (rest - log(C - k)): softmax(logits / T) then gives them exp(rest) / Z together, their true
    leftover mass at T (docs/cache-format.md). Computed in float64 for float64 values, else in float32."""
    dtype = values.dtype if values.dtype == torch.float64 else torch.float32
    values = values.to(dtype)
    k = values.shape[-1]
    fill = temperature * (rest.to(dtype) - math.log(num_classes - k))
    full = fill[..., None].expand(*values.shape[:-1], num_classes).clone()
    return full.scatter_(-1, indices.long(), values)


def in_grid(temperatures: tuple[float, ...], temperature: float) -> bool:
    return any(math.isclose(t, temperature, rel_tol=1e-9) for t in temperatures)


def grid_position(temperatures: tuple[float, ...], temperature: float) -> int:
    """Where `temperature` sits in the grid (equal up to rounding); a one-line error when it is not there."""
    for g, t in enumerate(temperatures):
        if in_grid((t,), temperature):
            return g
    raise LogitcacheError(f"temperature {temperature:g} is not among the top-k cache's temperatures "
                          f"{format_grid(temperatures)}; re-dump it with dump.topk_temperatures including "
                          f"{temperature:g} (or use full logits, dump.topk: null)")


def format_grid(temperatures: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{t:g}" for t in temperatures) + "]"
