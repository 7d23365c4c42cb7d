"""Supervised teacher training: the expensive model that the cache is made from."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler, Subset

from logitcache.core import provenance
from logitcache.core.config import Params, save_config
from logitcache.core.data import IndexedDataset, holdout, load_split
from logitcache.core.distributed import Dist
from logitcache.core.io import check_output_folder, save_checkpoint, write_confusion, write_json
from logitcache.core.models import build_model
from logitcache.core.training import (
    Checkpointer,
    Selector,
    autocast,
    data_parallel,
    fit,
    make_loader,
    make_optimizer,
    per_rank_batch,
    place,
    predict,
    seed_epoch,
    seed_everything,
    select_device,
    to_input,
    topk_accuracy,
    train_epoch,
    validation_scorer,
)
from logitcache.core.views import Normalizer, ViewSpec

CHECKPOINT = "teacher.pt"


def train_teacher(params: Params, *, resume: bool = False, dist: Dist = Dist.single()) -> dict:
    """Train `params.teacher.model` on the prepared training split; write checkpoint, metrics and config.

    Under torchrun each rank trains on its part of every global batch (DDP); rank 0 writes.
    """
    cfg = params.teacher
    out = Path(cfg.out)
    check_output_folder(out, "teacher.out")
    device = select_device(cfg.device, dist)
    train = load_split(params.data, "train")
    train_rows, validation_rows = holdout(params.data, len(train))
    seed_everything(cfg.seed)
    model = place(build_model(cfg.model, train.channels, train.num_classes), device)
    trained = data_parallel(model, device, dist)
    prepare = Normalizer(train.mean, train.std)
    augment = ViewSpec.from_config(cfg.augment).random_transform(train.image_size)
    dataset = Subset(IndexedDataset(train, augment), train_rows.tolist())  # never the validation rows
    sampler = DistributedSampler(dataset, dist.world_size, dist.rank, seed=cfg.seed, drop_last=True) if dist.active else None
    loader = make_loader(dataset, per_rank_batch(cfg.batch_size, dist), shuffle=True, seed=cfg.seed,
                         workers=cfg.workers, device=device, drop_last=True, sampler=sampler)
    optimizer, scheduler = make_optimizer(model.parameters(), cfg, cfg.epochs * len(loader))
    selector = Selector(model, cfg.select, validation_scorer(model, train, validation_rows, device))
    config = {"data": params.data.model_dump(mode="json"), "teacher": cfg.model_dump(mode="json")}
    checkpointer = Checkpointer(out, [out / CHECKPOINT, out / "metrics.json"], {**config, "world_size": dist.world_size},
                                {"model": model, "optimizer": optimizer, "scheduler": scheduler, "selector": selector},
                                dist)

    def step(batch):
        images, labels, _ = batch
        images, labels = to_input(images, device, prepare), labels.to(device, non_blocking=True)
        with autocast(device):
            logits = trained(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
        return loss, logits, labels

    def run_epoch(epoch: int) -> dict:
        seed_epoch(cfg.seed, dist.rank, epoch, loader.generator)  # each rank its own augmentations
        if sampler is not None:
            sampler.set_epoch(epoch)
        stats = train_epoch(trained, loader, step, optimizer, scheduler, epoch=epoch + 1,
                            desc=f"teacher {epoch + 1}/{cfg.epochs}", dist=dist)
        stats["epoch"] = epoch + 1
        if dist.is_main:
            scored = selector.evaluate(epoch + 1, stats)
            print(f"epoch {epoch + 1}/{cfg.epochs}: loss {stats['train_loss']:.4f} train {stats['train_acc']:.4f} "
                  f"{scored} ({stats['seconds']:.0f} s, {stats['img_per_s']:.0f} img/s)", flush=True)
        return stats

    history = fit(cfg.epochs, run_epoch, checkpointer, resume)
    if not dist.is_main:
        return {}
    selected = selector.restore()
    test = load_split(params.data, "test")  # scored once, on the selected weights, after training
    logits, labels = predict(model, make_loader(IndexedDataset(test, torch.nn.Identity()), 512, shuffle=False,
                                                seed=cfg.seed, workers=0, device=device), device, prepare)
    model_info = {"model": cfg.model, "in_channels": train.channels, "num_classes": train.num_classes,
                  "dataset": train.identity(), "mean": list(train.mean), "std": list(train.std)}
    metrics = {
        "test_acc": topk_accuracy(logits, labels, 1),
        "test_top5": topk_accuracy(logits, labels, 5),
        **selected,
        "params": sum(p.numel() for p in model.parameters()),
        "steps": cfg.epochs * len(loader),
        "train_seconds": sum(h["seconds"] for h in history),
        "seconds_per_epoch": sum(h["seconds"] for h in history) / len(history),
        "device": device.type,
        "world_size": dist.world_size,
        provenance.KEY: provenance.environment(device).as_dict(),
    }
    write_json(out / "metrics.json", metrics)
    write_confusion(out / "confusion.json", labels, logits.argmax(1))
    write_json(out / "history.json", history)
    save_config({"data": params.data, "teacher": cfg}, out / "config.json")
    save_checkpoint(out / CHECKPOINT, {k: v.cpu() for k, v in model.state_dict().items()}, config,
                    model_info=model_info)  # last: its presence means the run finished
    checkpointer.discard()
    return metrics
