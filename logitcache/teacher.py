"""Supervised teacher training: the expensive model that the cache is made from."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .config import Params, save_config
from .data import IndexedDataset, load_split
from .evaluate import write_confusion
from .models import build_model
from .train import (autocast, make_loader, make_optimizer, place, predict, save_checkpoint, seed_everything,
                    select_device, to_input, topk_accuracy, train_epoch, write_json)
from .views import ViewSpec, normalizer

CHECKPOINT = "teacher.pt"


def train_teacher(params: Params) -> dict:
    """Train `params.teacher.model` on the prepared training split; write checkpoint, metrics and config."""
    cfg = params.teacher
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = select_device(cfg.device)
    seed_everything(cfg.seed)
    train, test = load_split(params.data, "train"), load_split(params.data, "test")
    model = place(build_model(cfg.model, train.channels, train.num_classes), device)
    prepare = normalizer(train.mean, train.std)
    augment = ViewSpec.from_config(cfg.augment).random_transform(train.image_size)
    loader = make_loader(IndexedDataset(train, augment), cfg.batch_size, shuffle=True, seed=cfg.seed,
                         workers=cfg.workers, device=device, drop_last=True)
    test_loader = make_loader(IndexedDataset(test, torch.nn.Identity()), 512, shuffle=False, seed=cfg.seed,
                              workers=0, device=device)
    optimizer, scheduler = make_optimizer(model.parameters(), cfg, len(loader))

    def step(batch):
        images, labels, _ = batch
        images, labels = to_input(images, device, prepare), labels.to(device, non_blocking=True)
        with autocast(device):
            logits = model(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
        return loss, logits, labels

    history = []
    for epoch in range(1, cfg.epochs + 1):
        stats = train_epoch(model, loader, step, optimizer, scheduler, desc=f"teacher {epoch}/{cfg.epochs}")
        logits, labels = predict(model, test_loader, device, prepare)
        stats.update(epoch=epoch, test_acc=topk_accuracy(logits, labels, 1))
        history.append(stats)
        print(f"epoch {epoch}/{cfg.epochs}: loss {stats['train_loss']:.4f} train {stats['train_acc']:.4f} "
              f"test {stats['test_acc']:.4f} ({stats['seconds']:.0f} s, {stats['img_per_s']:.0f} img/s)", flush=True)

    config = {"data": params.data.model_dump(mode="json"), "teacher": cfg.model_dump(mode="json")}
    model_info = {"model": cfg.model, "in_channels": train.channels, "num_classes": train.num_classes,
                  "dataset": train.identity(), "mean": list(train.mean), "std": list(train.std)}
    save_checkpoint(out / CHECKPOINT, {k: v.cpu() for k, v in model.state_dict().items()}, config,
                    model_info=model_info)
    metrics = {
        "test_acc": history[-1]["test_acc"],
        "test_top5": topk_accuracy(logits, labels, 5),
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": sum(h["seconds"] for h in history),
        "seconds_per_epoch": sum(h["seconds"] for h in history) / len(history),
        "device": device.type,
    }
    write_json(out / "metrics.json", metrics)
    write_confusion(out / "confusion.json", labels, logits.argmax(1))
    write_json(out / "history.json", history)
    save_config({"data": params.data, "teacher": cfg}, out / "config.json")
    return metrics
