"""CRD: Tian, Krishnan & Isola (2020), "Contrastive Representation Distillation".

Both sides' embeddings (the student node pooled with `embedding`, the teacher's cached
`embedding` form) go through a linear head to `feat_dim` and are L2-normalised; both heads
train with the student. Each sample's embedding is contrasted, in both directions, with
memory entries: its own sample's entry is the positive, `negatives` other samples' entries
the negatives, scored exp(<anchor, entry> / temperature) / Z with Z fixed on the first batch
(mean score times the number of training rows), and the NCE loss of the paper's code is summed over the
two directions:

- student anchor vs the teacher bank. `bank: exact` (the default): a cache holds every
  sample's teacher embedding, so the bank is exact: the cached evaluation-view embedding of
  every sample (`Needs.banks`), through the current teacher head, never updated.
  `bank: momentum` is the paper's memory, filled with a momentum average of the teacher
  head's outputs as samples come by (the original runs the teacher online and has no bank).
- teacher anchor vs the student memory: necessarily a momentum memory of the student head's
  outputs (`momentum` of the old entry, renormalised), updated after each batch.

Memory entries carry no gradient, as in the paper. The negatives differ from the paper's in two
ways. The paper's code draws, for each anchor, its own K negatives among the samples of the
*other classes*, which needs every training row's label; here one set of negatives is drawn per
batch, from rows of *any class*, and shared by every anchor of the batch:
- any class, because a distillation run usually knows the labels of a few rows only
  (`labeled_fraction`), and the cache's point is to learn from the unlabeled ones; a negative of
  the anchor's own class is pushed away like any other, so the loss also separates samples of
  one class (as instance discrimination does);
- one set per batch, to bound memory: per-anchor sets cost batch × K × feat_dim floats a step
  (256 MiB at batch 128, K = 4096, feat_dim 128), against K × feat_dim here.
The set is drawn uniformly, with replacement, from torch's global RNG (which the trainer seeds
per epoch), from the rows the run trains on (never a validation row: its cached embedding
stays out of training), and excludes every row of the batch, so no anchor meets its own
positive among its negatives (nor its batch neighbours, a negligible difference when the
batch is small against the data set).
Under torchrun each rank contrasts its own rows (the loss is per anchor, so DDP's average is
the single-process loss); the memory updates and Z use the global batch, so every rank's
memories stay identical. Memories and Z are buffers: saved in resume.pt with the learner.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from logitcache.core.features import embedding
from logitcache.core.schedule import NonNegative
from logitcache.student.methods import (
    Method,
    Needs,
    TeacherInput,
    register,
)
from logitcache.student.methods._relations import EmbeddingPairConfig, gather_batch

EPS = 1e-7


class CRDConfig(EmbeddingPairConfig):
    weight: NonNegative = Field(0.8, description="weight of the contrastive term (beta)")
    feat_dim: int = Field(128, gt=0, description="size of the projected, L2-normalised embeddings")
    negatives: int = Field(4096, gt=0, description="negatives K drawn per batch (16384 in the paper)")
    temperature: float = Field(0.07, gt=0, description="NCE temperature")
    bank: Literal["exact", "momentum"] = Field(
        "exact", description="teacher bank: every sample's cached embedding (exact) or the paper's momentum memory")
    momentum: float = Field(0.5, ge=0, lt=1, description="share of the old entry kept by a momentum memory update")


def nce_loss(scores: torch.Tensor, num_samples: int) -> torch.Tensor:
    """The paper's NCE loss of (B, 1 + K) normalised scores, column 0 the positive; noise 1 / num_samples."""
    noise = (scores.shape[1] - 1) / num_samples
    positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + EPS))
    negative = torch.log(noise / (scores[:, 1:] + noise + EPS))
    return -(positive.sum() + negative.sum()) / scores.shape[0]


def contrast(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, 1 + K) exp(similarity / temperature): each anchor with its positive, then the shared negatives."""
    pos = (anchor * positive).sum(1, keepdim=True)
    return torch.exp(torch.cat([pos, anchor @ negatives.T], dim=1) / temperature)


class Head(nn.Module):
    """Linear projection to feat_dim, L2-normalised."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x), dim=1)


@register
class CRD(Method):
    name = "crd"
    family = "contrastive"
    description = "contrastive representation distillation: NCE against a bank of every sample's teacher embedding"
    paper = "Tian et al. 2020"
    Config = CRDConfig

    @classmethod
    def needs(cls, cfg: CRDConfig) -> Needs:
        key = TeacherInput(cfg.teacher, "embedding")
        return Needs(teacher=[key], student=[cfg.student], banks=[key] if cfg.bank == "exact" else [])

    def __init__(self, cfg: CRDConfig, ctx):
        super().__init__(cfg, ctx)
        self.key = TeacherInput(cfg.teacher, "embedding")
        self.num_samples = ctx.num_samples
        trainable = torch.ones(ctx.num_samples, dtype=torch.bool)
        if ctx.train_rows is not None:  # negatives come from the training rows alone: never a validation row
            trainable = torch.zeros_like(trainable).index_fill_(0, ctx.train_rows.cpu(), True)
        self.register_buffer("trainable", trainable, persistent=False)
        self.num_data = int(trainable.sum())  # the paper's training-set size, in the noise and in Z
        student_dim = embedding(torch.zeros(1, *ctx.student_shapes[cfg.student])).shape[1]
        self.student_head = Head(student_dim, cfg.feat_dim)
        self.teacher_head = Head(math.prod(ctx.teacher_shapes[self.key]), cfg.feat_dim)
        self.register_buffer("student_memory", self._random_memory())
        if cfg.bank == "exact":  # from the cache at every start: not saved
            self.register_buffer("teacher_bank", ctx.banks[self.key].float().clone(), persistent=False)
        else:
            self.register_buffer("teacher_memory", self._random_memory())
        self.register_buffer("normalisers", torch.full((2,), -1.0))  # Z of the two directions, set on the first batch

    def _random_memory(self) -> torch.Tensor:
        bound = 1.0 / math.sqrt(self.cfg.feat_dim / 3)
        return torch.rand(self.num_samples, self.cfg.feat_dim) * 2 * bound - bound

    def draw_negatives(self, rows: torch.Tensor) -> torch.Tensor:
        """`negatives` sample indices, uniformly with replacement from the training rows not in this batch."""
        allowed = self.trainable.clone()
        allowed[rows] = False
        pool = allowed.nonzero().squeeze(1)
        return pool[torch.randint(len(pool), (self.cfg.negatives,), device=pool.device)]

    @torch.no_grad()
    def teacher_entries(self, index: torch.Tensor) -> torch.Tensor:
        if self.cfg.bank == "exact":
            return self.teacher_head(self.teacher_bank[index])
        return self.teacher_memory[index]

    def learned_state(self):
        """The heads, not the per-sample memories: they serve training only."""
        return {k: v for k, v in self.state_dict().items() if not k.endswith("_memory")}

    def forward(self, student, teacher, batch, at):
        f_s = self.student_head(embedding(student.features[self.cfg.student].float()))
        f_t = self.teacher_head(teacher.features[self.key].float().flatten(1))
        rows, negatives, tau = batch.rows, self.draw_negatives(batch.rows), self.cfg.temperature
        student_anchor = contrast(f_s, self.teacher_entries(rows), self.teacher_entries(negatives), tau)
        teacher_anchor = contrast(f_t, self.student_memory[rows], self.student_memory[negatives], tau)
        z = self._normalisers(student_anchor, teacher_anchor, batch.world_size)
        loss_s = nce_loss(student_anchor / z[0], self.num_data)
        loss_t = nce_loss(teacher_anchor / z[1], self.num_data)
        self._remember(self.student_memory, f_s, rows, batch.world_size)
        if self.cfg.bank == "momentum":
            self._remember(self.teacher_memory, f_t, rows, batch.world_size)
        loss = loss_s + loss_t
        return loss, {"crd": loss.detach(), "student_anchor": loss_s.detach(), "teacher_anchor": loss_t.detach()}

    @torch.no_grad()
    def _normalisers(self, student_anchor: torch.Tensor, teacher_anchor: torch.Tensor, world: int) -> torch.Tensor:
        """Z = mean score (over the global batch) times the sample count, fixed from the first batch on."""
        if bool((self.normalisers < 0).any()):
            means = torch.stack([student_anchor.mean(), teacher_anchor.mean()])
            self.normalisers.copy_(gather_batch(means[None], world).mean(0) * self.num_data)
        return self.normalisers.clone()

    @torch.no_grad()
    def _remember(self, memory: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, world: int) -> None:
        """memory[rows] <- normalize(momentum * memory[rows] + (1 - momentum) * values), for the global batch."""
        values, rows = gather_batch(values.detach(), world), gather_batch(rows, world)
        m = self.cfg.momentum
        memory.index_copy_(0, rows, F.normalize(memory[rows] * m + values * (1 - m), dim=1))
