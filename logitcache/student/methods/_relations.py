"""Relation losses under torchrun: every rank sees the whole global batch.

A relation loss (SP, RKD, PKT, CRD's memory) compares the samples of a batch with each
other, so a rank that only saw its own part would compute another loss than a single
process. `gather_batch` gives every rank the global batch: the other ranks' rows detached,
its own rows with their gradient, in rank order (the rows of the single-process batch).
Every rank then computes the same loss but back-propagates only through its own rows;
`single_process_gradient` scales that gradient by the world size, so DDP's average over
the ranks equals the single-process gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from pydantic import Field

from logitcache.core.features import embedding
from logitcache.student.methods import MethodConfig, Needs, TeacherInput

AllGather = Callable[[torch.Tensor], list[torch.Tensor]]


class EmbeddingPairConfig(MethodConfig):
    """Keys of a method that compares a student embedding with a cached teacher embedding."""

    student: str = Field(description="student node whose pooled output is the embedding (logitcache layers MODEL)",
                         json_schema_extra={"example": "block3"})
    teacher: str = Field(description="cached teacher layer; needs the embedding form in the cache",
                         json_schema_extra={"example": "layer3"})

    def needs(self) -> Needs:
        return Needs(teacher=[TeacherInput(self.teacher, "embedding")], student=[self.student])


def global_embeddings(cfg: EmbeddingPairConfig, student, teacher, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) embeddings of the global batch: the student node pooled, the cached teacher form."""
    s = gather_batch(embedding(student.features[cfg.student].float()), world_size)
    t = gather_batch(teacher.features[TeacherInput(cfg.teacher, "embedding")].float(), world_size)
    return s, t


def gather_batch(x: torch.Tensor, world_size: int, *, rank: int | None = None,
                 all_gather: AllGather | None = None) -> torch.Tensor:
    """The global batch's rows of `x` (B_rank, ...) on every rank; the identity for one process.

    `all_gather` (each rank's detached part, in rank order) and `rank` default to
    torch.distributed's; tests pass their own to simulate several ranks in one process.
    """
    if world_size == 1:
        return x
    if all_gather is None:
        all_gather, rank = _all_gather_rows, torch_dist.get_rank()
    parts = list(all_gather(x.detach()))
    parts[rank] = x
    return torch.cat(parts)


def single_process_gradient(loss: torch.Tensor, world_size: int) -> torch.Tensor:
    """The same value, with world_size times the gradient (see the module docstring)."""
    if world_size == 1:
        return loss
    return loss * world_size - loss.detach() * (world_size - 1)


def _all_gather_rows(x: torch.Tensor) -> list[torch.Tensor]:
    """torch.distributed's all_gather for parts whose row counts may differ (the epoch's last batch)."""
    world = torch_dist.get_world_size()
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    torch_dist.all_gather(counts, count)
    most = int(max(c.item() for c in counts))
    padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, most - x.shape[0]))
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch_dist.all_gather(parts, padded.contiguous())
    return [p[:int(c.item())] for p, c in zip(parts, counts)]
