"""torch.distributed plumbing: one `Dist` describes this process's place in a torchrun job.

Launched plainly, `Dist.single()` stands for a world of one and every helper is a no-op,
so the same code path serves single-process and distributed runs.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from logitcache.core.errors import LogitcacheError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: object = None  # a gloo group for logitcache's own small messages (CPU tensors, no GPU sync)

    @classmethod
    def single(cls) -> "Dist":
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def device(self, name: str) -> torch.device:
        """The device for `name` (auto/cpu/cuda): under torchrun, the GPU of this rank's local_rank."""
        if name == "cuda" and not torch.cuda.is_available():
            raise LogitcacheError("device=cuda but no CUDA GPU is visible; use device=auto or device=cpu")
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cuda" and self.active:
            return torch.device("cuda", self.local_rank)  # `session` checked it exists and made it current
        return torch.device(name)

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self.group)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over all ranks (on the CPU gloo group, so it never waits for a GPU)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return t.tolist()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def session(device: str = "auto"):
    """Join the torchrun job (nccl on GPUs, gloo on the CPU) for the duration of a command; a world of one otherwise."""
    if not launched_by_torchrun():
        yield Dist.single()
        return
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    use_gpu = device != "cpu" and torch.cuda.is_available()
    if use_gpu:
        if local >= torch.cuda.device_count():  # before joining: no rank may wait for one that cannot start
            raise LogitcacheError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible); "
                                  "launch at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_gpu else "gloo", timeout=datetime.timedelta(minutes=30))
    try:
        # NCCL neither runs CPU tensors nor reports a vanished peer; gloo does both
        group = dist.new_group(backend="gloo") if use_gpu else None
        yield Dist(rank, world, local, group)
    finally:
        dist.destroy_process_group()
