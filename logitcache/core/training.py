"""The training machinery teacher and student share: device, seeding, loaders, optimiser, epochs, checkpoints."""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from logitcache.core import interrupt
from logitcache.core.config import TrainConfig
from logitcache.core.data import IndexedDataset, Split
from logitcache.core.distributed import Dist
from logitcache.core.errors import LogitcacheError
from logitcache.core.io import load_checkpoint, save_checkpoint
from logitcache.core.preprocess import ModelInput, data_input


def select_device(name: str, dist: Dist = Dist.single()) -> torch.device:
    return dist.device(name)


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """Move to the device in channels-last layout, which oneDNN's CPU convolutions and tensor cores run faster."""
    return model.to(device=device, memory_format=torch.channels_last)


def data_parallel(module: nn.Module, device: torch.device, dist: Dist) -> nn.Module:
    """DistributedDataParallel under torchrun (gradients averaged over ranks); the module itself otherwise."""
    if not dist.active:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def per_rank_batch(batch_size: int, dist: Dist) -> int:
    """The configured batch size is global: each of the world's ranks takes an equal part of it."""
    if batch_size % dist.world_size:
        raise LogitcacheError(f"batch_size {batch_size} does not split evenly over {dist.world_size} processes; "
                              f"use a multiple of {dist.world_size}")
    return batch_size // dist.world_size


def to_input(images: torch.Tensor, device: torch.device, prepare: Callable) -> torch.Tensor:
    """uint8 loader batch -> normalised, channels-last float batch on the device."""
    x = prepare(images.to(device, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_epoch(seed: int, rank: int, epoch: int, generator: torch.Generator) -> None:
    """Every random draw of an epoch (augmentations, dropout, loader workers) derives from (seed, rank, epoch)
    alone, so a resumed run replays any epoch on any rank without saving RNG states."""
    derived = int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])
    seed_everything(derived)
    generator.manual_seed(derived)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int | None, *, shuffle: bool, seed: int, workers: int,
                device: torch.device, drop_last: bool = False, sampler=None) -> DataLoader:
    """A seeded loader: same seed and worker count, same batches and augmentations.

    Workers are started afresh each epoch and seeded from the loader's generator, which
    `seed_epoch` re-seeds: any epoch can be replayed on its own.
    """
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        num_workers=workers, pin_memory=device.type == "cuda", drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed), worker_init_fn=_seed_worker,
    )


def autocast(device: torch.device):
    """bfloat16 autocast on CUDA (no loss scaling needed); full precision on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(parameters: Iterable[nn.Parameter], cfg: TrainConfig, total: int):
    """SGD (Nesterov) and the learning-rate schedule over the run's `total` optimizer steps; `parameters` may be
    groups with a peak "lr" of their own (cfg.lr for the others)."""
    optimizer = torch.optim.SGD(parameters, lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    if cfg.schedule == "onecycle" and total >= 8:  # one-cycle needs a few steps per phase
        peaks = [group["lr"] for group in optimizer.param_groups]
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks if len(peaks) > 1 else cfg.lr,
                                                        total_steps=total, pct_start=0.25)
    elif cfg.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return optimizer, scheduler


@dataclass
class StepOut:
    """What one training step's forward returns: the loss to minimise, the batch's logits and labels (for the
    running accuracy) and, optionally, the named loss terms whose per-sample means the curves record."""

    loss: torch.Tensor  # scalar
    logits: torch.Tensor  # (B, classes)
    labels: torch.Tensor  # (B,) int64
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


StepFn = Callable[[Any], StepOut]  # a loader batch -> its forward
SYNC_EVERY = 25  # steps between host syncs (finiteness check, progress bar): no per-step GPU stall


def train_steps(model: nn.Module, loader: DataLoader, step: StepFn, optimizer, scheduler, *, first_step: int,
                desc: str, modules: Iterable[nn.Module] = (), dist: Dist = Dist.single(), bar: bool = True) -> dict:
    """One optimizer step per batch of the loader (the teacher's: an epoch; a student's: the steps up to its next
    evaluation). `step(batch)` returns a `StepOut`, whose named loss terms' per-sample means over these steps are
    returned as `loss/<name>`; `first_step` is the run's number of steps done before them.

    A non-finite loss stops the run naming the run's first bad step, before any checkpoint
    of a NaN model can be written. Loss and accuracy are summed over all ranks.
    """
    model.train()
    for m in modules:
        m.train()
    device = next(model.parameters()).device
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, correct: read every SYNC_EVERY steps
    term_sums: dict[str, torch.Tensor] = {}  # named loss terms, summed over samples on the device
    first_bad = torch.tensor(-1, device=device)  # first step with a non-finite loss
    seen = 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0, disable=not (bar and dist.is_main))
    with bar:  # closed, its line cleared, however the epoch ends: an interrupt's message starts a clean line
        for i, batch in enumerate(bar):
            interrupt.check()
            out = step(batch)
            loss, logits, labels = out.loss, out.logits, out.labels
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            n = len(labels)
            seen += n
            with torch.no_grad():
                first_bad = torch.where(torch.isfinite(loss) | (first_bad >= 0), first_bad, i)
                totals += torch.stack([loss.double() * n, (logits.argmax(1) == labels).sum().double()]).nan_to_num()
                for name, value in out.terms.items():
                    term_sums[name] = term_sums.get(name, 0) + torch.as_tensor(value, device=device).double() * n
            if (i + 1) % SYNC_EVERY == 0 or i + 1 == len(loader):
                _stop_if_non_finite(int(first_bad), first_step, desc, dist)
                loss_sum, correct = totals.tolist()
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                                img_s=f"{seen / (time.perf_counter() - start):.0f}", refresh=False)
    seconds = time.perf_counter() - start
    names = sorted(term_sums)
    seen, loss_sum, correct, *term_values = dist.sum([seen, *totals.tolist(), *(float(term_sums[k]) for k in names)])
    return {"train_loss": loss_sum / seen, "train_acc": correct / seen, "samples": int(seen), "seconds": seconds,
            "img_per_s": seen / seconds,
            **{f"loss/{name}": value / seen for name, value in zip(names, term_values)}}


def _stop_if_non_finite(first_bad: int, first_step: int, desc: str, dist: Dist) -> None:
    """Every rank checks at the same step, so under DDP all stop together instead of one waiting for the others.
    Steps are counted from 1 over the whole run, as the progress lines count them."""
    if dist.sum([float(first_bad >= 0)])[0] == 0:
        return
    where = f"step {first_step + first_bad + 1:,}" if first_bad >= 0 else f"a step after {first_step:,} on another rank"
    raise LogitcacheError(f"{desc}: loss became non-finite at {where}; nothing was saved since step {first_step:,} "
                          "(the last checkpoint); lower the learning rate or check the inputs and cached targets")


@torch.inference_mode()
def predict(model: nn.Module, loader: DataLoader, device: torch.device, prepare: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits and labels for a whole loader, in loader order."""
    model.eval()
    outputs, targets = [], []
    for images, labels, _ in loader:
        with autocast(device):
            logits = model(to_input(images, device, prepare))
        outputs.append(logits.float().cpu())
        targets.append(labels)
    return torch.cat(outputs), torch.cat(targets)


@dataclass
class Scored:
    """A model's float32 logits on a split, with the split's labels, in split order."""

    logits: torch.Tensor
    labels: torch.Tensor

    def accuracy(self) -> dict:
        return {"test_acc": topk_accuracy(self.logits, self.labels, 1),
                "test_top5": topk_accuracy(self.logits, self.labels, 5)}


def score_split(model: nn.Module, split: Split, device: torch.device, view: ModelInput | None = None,
                workers: int = 0) -> Scored:
    """Every image of `split`, unaugmented, through `model`: the one way teacher and students score the test split.
    `view` renders its input (default: the data's normalisation)."""
    view = view or data_input(split)
    loader = make_loader(IndexedDataset(split, view.render), view.batch, shuffle=False, seed=0, workers=workers,
                         device=device)
    return Scored(*predict(model, loader, device, view.prepare))


def validation_scorer(model: nn.Module, split: Split, rows: np.ndarray, device: torch.device,
                      view: ModelInput | None = None, workers: int = 0) -> Callable[[], dict]:
    """Scores `model` on the held-out `rows` of the training split (unaugmented): accuracy and cross-entropy.
    `view` renders its input (default: the data's normalisation)."""
    view = view or data_input(split)
    loader = make_loader(Subset(IndexedDataset(split, view.render), rows.tolist()), view.batch, shuffle=False, seed=0,
                         workers=workers, device=device)

    def score() -> dict:
        if not len(rows):
            return {}
        logits, labels = predict(model, loader, device, view.prepare)
        return {"val_acc": topk_accuracy(logits, labels, 1), "val_loss": F.cross_entropy(logits, labels).item()}

    return score


class Selector:
    """The weights a run reports: those of the evaluation with the best validation accuracy (the first of equals),
    or the last. Its state goes into resume.pt, so a resumed run selects as an uninterrupted one."""

    def __init__(self, module: nn.Module, mode: str, score: Callable[[], dict] = dict):
        self.module, self.mode, self.score = module, mode, score
        self.chosen: dict = {}  # evaluation, val_acc and, for "best", a copy of the weights

    def evaluate(self, evaluation: int, stats: dict) -> str:
        """After evaluation number `evaluation` (from 1; the teacher's: after each epoch): its validation scores into
        `stats`, the weights kept if chosen; the scores as text for the log."""
        stats.update(self.score())
        self.update(evaluation, stats)
        return f"val acc {stats['val_acc']:.4f}" if "val_acc" in stats else "no validation split"

    def update(self, evaluation: int, scores: dict) -> None:
        if self.mode == "last":
            self.chosen = {"evaluation": evaluation, "val_acc": scores.get("val_acc")}
        elif not self.chosen or scores["val_acc"] > self.chosen["val_acc"]:
            state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
            self.chosen = {"evaluation": evaluation, "val_acc": scores["val_acc"], "state": state}

    def restore(self) -> dict:
        """Load the chosen weights into the module; return which evaluation they come from and its score."""
        if "state" in self.chosen:
            self.module.load_state_dict(self.chosen["state"])
        return {"select": self.mode, "selected": self.chosen["evaluation"], "val_acc": self.chosen["val_acc"]}

    def state_dict(self) -> dict:
        return self.chosen

    def load_state_dict(self, state: dict) -> None:
        self.chosen = state


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return hits.float().mean().item()


RESUME = "resume.pt"
RESUME_LAYOUT = 2  # raised when the state resume.pt holds changes shape: an older file is refused, not misread


class Checkpointer:
    """Per-epoch resumable state: every stateful object (model, optimiser, scheduler...) and the history.

    Saved by rank 0 after each epoch; `--resume` restores it on every rank and continues
    from the next epoch to the same result as an uninterrupted run (to the bit on the CPU;
    random draws are re-seeded per epoch by `seed_epoch`). The file is refused when it was
    made with other settings, and removed once the run's outputs exist.
    """

    def __init__(self, out: Path, outputs: Iterable[Path], config: dict, stateful: dict, dist: Dist):
        self.out, self.outputs = out, list(outputs)
        self.path, self.stateful, self.dist = out / RESUME, stateful, dist
        self.config = resume_settings(config)

    def begin(self, resume: bool) -> None:
        """Once the inputs are checked: the run's folder, rid of an earlier run's finished outputs (the checkpoint,
        whose presence means "finished", and metrics) so that a kill now cannot leave them looking current."""
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            for path in self.outputs:
                path.unlink(missing_ok=True)
            if not resume:
                self.discard()  # a stale file from an earlier run must not be resumed later by mistake

    def restore(self) -> tuple[int, list[dict]]:
        """(epochs already done, their history); (0, []) when there is nothing to resume."""
        if not self.path.is_file():
            return 0, []
        state = check_resumable(self.path, self.config)
        for name, obj in self.stateful.items():
            obj.load_state_dict(state["state_dict"][name])
        return state["epoch"], json.loads(state["history"])

    def save(self, epoch: int, history: list[dict]) -> None:
        if self.dist.is_main:
            state = {name: obj.state_dict() for name, obj in self.stateful.items()}
            save_checkpoint(self.path, state, self.config, epoch=epoch, history=json.dumps(history))

    def discard(self) -> None:
        if self.dist.is_main:
            self.path.unlink(missing_ok=True)


def resume_settings(config: dict) -> dict:
    """The settings a resume.pt records and is compared on: `config` with the state's layout, as JSON reads it back."""
    return json.loads(json.dumps({**config, "resume_layout": RESUME_LAYOUT}, sort_keys=True))


def check_resumable(path: Path, config: dict) -> dict:
    """The saved state at `path`, refused when it was saved with other settings than `config` (or another layout)."""
    state = load_checkpoint(path)
    config = resume_settings(config)
    if state["config"] != config:
        differ = sorted(_differing_keys(state["config"], config))
        raise LogitcacheError(f"{path} was saved with other settings ({', '.join(differ)}); "
                              "rerun without --resume to start over")
    return state


def fit(epochs: int, run_epoch: Callable[[int], dict], checkpointer: Checkpointer, resume: bool,
        unit: str = "epoch") -> list[dict]:
    """Run epochs (or another `unit` of training between evaluations) [start, epochs), saving resumable state
    after each; start > 0 only with resume."""
    checkpointer.begin(resume)
    start, history = checkpointer.restore() if resume else (0, [])
    if start and checkpointer.dist.is_main:
        print(f"{checkpointer.path}: resuming at {unit} {start + 1} of {epochs}", flush=True)
    elif resume and checkpointer.dist.is_main:
        print(f"{checkpointer.path} not found: nothing to resume, training from the first {unit}", flush=True)
    for epoch in range(start, epochs):
        interrupt.check()
        history.append(run_epoch(epoch))
        checkpointer.save(epoch + 1, history)
    return history


def _differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            keys += _differing_keys(x, y, f"{prefix}{key}.")
        elif x != y:
            keys.append(f"{prefix}{key}")
    return keys
