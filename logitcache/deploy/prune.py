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
from logitcache.core.io import load_model, save_checkpoint, write_json
from logitcache.core.models import layer_channels
from logitcache.core.views import Normalizer
from logitcache.deploy.export import checkpoint_data
from logitcache.deploy.measure import predict, torch_runtime


def prune_checkpoint(params: Params, checkpoint: str | Path) -> dict:
    """Prune `prune.ratio` of every layer's channels; write the checkpoint to `prune.out`, metrics.json beside it."""
    cfg = params.prune
    model, ckpt = load_model(checkpoint)
    info = ckpt["model_info"]
    test = load_split(checkpoint_data(ckpt, checkpoint), "test")
    images = Normalizer(test.mean, test.std)(test.images)
    before = _summary(model, images, test.labels)
    prune_model(model, images[:2], cfg.ratio, info)
    after = _summary(model, images, test.labels)
    metrics = {"model": info["model"], "ratio": cfg.ratio, "source": str(checkpoint),
               "params_before": before["params"], "params": after["params"],
               "params_kept": after["params"] / before["params"],
               "test_acc_before": before["test_acc"], "test_acc": after["test_acc"],
               provenance.KEY: provenance.environment().as_dict()}
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
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
        raise LogitcacheError(f"pruning ratio {ratio} removes no channel of {info['model']}; give a larger ratio")
    return model


def _summary(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    logits = predict(torch_runtime(model.eval()), images.numpy())
    return {"params": sum(p.numel() for p in model.parameters()),
            "test_acc": float((logits.argmax(1) == labels.numpy()).mean())}
