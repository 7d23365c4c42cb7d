"""logitcache prune: remove whole channels (structured pruning) with torch-pruning's dependency graph.

The pruned model is a real, smaller network: its checkpoint records the base model
name plus every layer's channel counts (plain data), and `load_model` rebuilds it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

from logitcache.core import provenance
from logitcache.core.config import Params
from logitcache.core.data import load_split
from logitcache.core.errors import LogitcacheError
from logitcache.core.io import (check_not_input, check_output_folder, claim_files, load_model, output_lock,
                                record_files, save_checkpoint, write_json)
from logitcache.core.models import layer_channels
from logitcache.core.preprocess import model_input
from logitcache.deploy.export import checkpoint_data
from logitcache.deploy.measure import predict, torch_runtime


def prune_checkpoint(params: Params, checkpoint: str | Path) -> dict:
    """Prune `prune.ratio` of every layer's channels; write the checkpoint to `prune.out`, metrics.json beside it.

    Neither replaces a file that prune did not write (the checkpoint it reads, another command's metrics).
    """
    out = Path(params.prune.out)
    check_not_input(out, {"checkpoint": checkpoint}, "prune.out")
    check_output_folder(out.parent, "prune.out")
    claim_files(out.parent, [out.name, "metrics.json"], "prune", "prune.out")
    with output_lock(out, "prune"):
        return _prune(params, checkpoint, out)


def _prune(params: Params, checkpoint: str | Path, out: Path) -> dict:
    cfg = params.prune
    model, ckpt = load_model(checkpoint)
    info = ckpt["model_info"]
    test = load_split(checkpoint_data(ckpt, checkpoint), "test")
    images = model_input(info, test).inputs(test, range(len(test)))
    before = _summary(model, images, test.labels)
    prune_model(model, images[:2], cfg.ratio, info)
    after = _summary(model, images, test.labels)
    metrics = {"model": info["model"], "ratio": cfg.ratio, "source": str(checkpoint),
               "params_before": before["params"], "params": after["params"],
               "params_kept": after["params"] / before["params"],
               "test_acc_before": before["test_acc"], "test_acc": after["test_acc"],
               provenance.KEY: provenance.environment().as_dict()}
    out.parent.mkdir(parents=True, exist_ok=True)
    record_files(out.parent, [out.name, "metrics.json"], "prune")
    write_json(out.with_name("metrics.json"), metrics)
    save_checkpoint(out, {k: v.contiguous() for k, v in model.state_dict().items()},
                    {**ckpt["config"], "prune": {"source": str(checkpoint), "ratio": cfg.ratio}},
                    model_info={**info, "channels": layer_channels(model)})
    return metrics


def prune_model(model: nn.Module, example: torch.Tensor, ratio: float, info: dict) -> nn.Module:
    """Remove `ratio` of the channels of every coupled group of layers, by L2 magnitude; the class outputs stay."""
    model.eval()
    outputs = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == info["num_classes"]]
    before = sum(p.numel() for p in model.parameters())
    try:
        pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=ratio, ignored_layers=outputs)
        pruner.step()
        with torch.no_grad():
            model(example)
    except Exception as e:
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise LogitcacheError(f"model {info['model']} cannot be pruned with torch-pruning: {reason[:200]}") from None
    if sum(p.numel() for p in model.parameters()) >= before:
        why, fix = (("would empty its layers, so none is removed", "a smaller") if ratio > 0.5
                    else ("rounds to no channel of any layer", "a larger"))
        raise LogitcacheError(f"pruning ratio {ratio} removes no channel of {info['model']} (it {why}); give {fix} "
                              "ratio")
    return model


def _summary(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    logits = predict(torch_runtime(model.eval()), images.numpy())
    return {"params": sum(p.numel() for p in model.parameters()),
            "test_acc": float((logits.argmax(1) == labels.numpy()).mean())}
