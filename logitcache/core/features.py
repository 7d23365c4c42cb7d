"""Taking a teacher's outputs: its checkpoint, its logits and named intermediate features.

Phase one writes what these functions compute; phase two's --online reference and
`inspect --verify` recompute it, so the three can never disagree on what a layer means.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from logitcache.core.data import Split
from logitcache.core.errors import LogitcacheError
from logitcache.core.forms import FORMS
from logitcache.core.io import load_model
from logitcache.core.models import feature_extractor, feature_nodes
from logitcache.core.preprocess import Preprocess, TeacherInput
from logitcache.core.views import BoxRenderer, ViewRenderer, ViewSpec


@dataclass
class Teacher:
    model: nn.Module
    info: dict
    sha256: str
    preprocess: Preprocess | None

    def identity(self) -> dict:
        """What a cache records of its teacher; an imported one also names its weight file and class map."""
        imported = {key: self.info[key] for key in ("source", "class_map") if self.info.get(key)}
        return {"model": self.info["model"], "checkpoint_sha256": self.sha256,
                "num_classes": self.info["num_classes"], "in_channels": self.info["in_channels"],
                "params": sum(p.numel() for p in self.model.parameters()), **imported}

    def preprocess_for(self, split: Split) -> Preprocess:
        """The checkpoint's preprocessing; a checkpoint that records none takes the data as it is."""
        return self.preprocess or Preprocess(None, None, "bilinear", split.mean, split.std, self.info["in_channels"])

    def input_for(self, split: Split) -> TeacherInput:
        """uint8 views of this data -> this teacher's input (refuses channels it cannot convert)."""
        return TeacherInput(self.preprocess_for(split), split.channels)

    def views_for(self, split: Split, spec: ViewSpec) -> tuple[ViewRenderer | BoxRenderer, TeacherInput]:
        """How this teacher sees views of `spec` on `split`: box views rendered at its input side, then only its
        normalisation; pad-and-crop views through its whole preprocessing."""
        if not spec.boxes:
            return ViewRenderer(spec), self.input_for(split)
        pre = self.preprocess_for(split)
        return BoxRenderer(spec, pre.crop, pre.interpolation), TeacherInput(pre.at_size(), split.channels)


def load_teacher(path: str | Path) -> Teacher:
    """The teacher from its checkpoint (weights_only), with the checkpoint's SHA-256 and its preprocessing."""
    model, ckpt = load_model(path)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return Teacher(model.eval(), ckpt["model_info"], digest, Preprocess.of_checkpoint(ckpt["model_info"]))


class FeatureExtractor(nn.Module):
    """The teacher as {'logits': ..., <layer>: ...} through torchvision's feature_extraction."""

    def __init__(self, model: nn.Module, layers: list[str]):
        super().__init__()
        nodes = feature_nodes(model)
        unknown = [name for name in layers if name not in nodes]
        if unknown:
            raise LogitcacheError(f"unknown layer(s) {', '.join(unknown)}; valid names: {', '.join(nodes)}")
        self.layers = list(layers)
        self.net = feature_extractor(model, {**{n: n for n in layers}, nodes[-1]: "logits"})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(x)


ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU, nn.Mish, nn.Sigmoid, nn.Tanh)
ACTIVATION_FUNCTIONS = {"relu", "relu_", "relu6", "gelu", "silu", "hardswish", "leaky_relu", "mish", "sigmoid", "tanh"}


def activation_side(extractor: torch.fx.GraphModule, name: str) -> str:
    """'after' or 'before' the activation: read off the traced op that produces the returned node."""
    output = next(node for node in extractor.graph.nodes if node.op == "output")
    node = output.args[0][name]
    if node.op == "call_module":
        return "after" if isinstance(extractor.get_submodule(node.target), ACTIVATIONS) else "before"
    target = getattr(node.target, "__name__", str(node.target))
    return "after" if target in ACTIVATION_FUNCTIONS else "before"


def pool_feature(t: torch.Tensor, pool: int) -> torch.Tensor:
    """Bound a feature map's size: adaptive-average-pool to pool x pool when larger (0 keeps it whole)."""
    if pool and t.dim() == 4 and (t.shape[2] > pool or t.shape[3] > pool):
        return F.adaptive_avg_pool2d(t, pool)
    return t


def attention_map(t: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """AT's attention map (Zagoruyko & Komodakis 2017): channel-mean of |f|^p, flattened, L2-normalised per sample."""
    return F.normalize(t.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def embedding(t: torch.Tensor) -> torch.Tensor:
    """A per-sample vector: a map globally average-pooled, a vector as it is."""
    return t.mean(dim=(2, 3)) if t.dim() == 4 else t.flatten(1)


def stored_form(t: torch.Tensor, form: str, layer: dict) -> torch.Tensor:
    """A layer's output in one stored form (`logitcache.core.forms.FORMS`), rounded to float16 as the cache holds it.

    `layer` is the layer's record in the cache metadata (`forms.<form>` holds the form's settings, e.g. `pooled_to`
    of map, `p` of attention). The dump writes exactly this, and `--online` and `inspect --verify` recompute it.
    """
    if form not in FORMS:
        raise LogitcacheError(f"unknown stored form {form!r}; use one of {', '.join(FORMS)}")
    return FORMS[form].compute(t, layer["forms"][form]).half()
