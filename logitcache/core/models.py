"""Model registry by name: small-image families from distillation papers plus every torchvision classifier.

Every model takes ``(in_channels, num_classes)`` and accepts any image of at least 28x28 pixels,
so one name works for Fashion-MNIST (1x28x28) and CIFAR (3x32x32) alike.

Two families take a name of their own after a prefix: ``torchvision:NAME`` is a torchvision classifier as
torchvision builds it (its own stem and input size, for its pretrained weights: `logitcache import-teacher`),
``timm:NAME`` any model ``timm.create_model`` builds.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models import regnet
from torchvision.models.resnet import BasicBlock

from logitcache.core.errors import LogitcacheError

_Builder = Callable[[int, int], nn.Module]


class UnknownModelError(LogitcacheError, ValueError):
    """A model name that is not in the registry; the message is one line with close matches."""


# ---------------------------------------------------------------- CIFAR-style ResNets and WRNs


class _SmallResNet(nn.Module):
    """3x3 stride-1 stem, three stages of torchvision BasicBlocks (strides 1, 2, 2), pool, linear.

    Module names match torchvision's ResNet so feature nodes read ``layer1``..``layer3``, ``avgpool``, ``fc``.
    """

    def __init__(self, in_channels: int, num_classes: int, stem: int, widths: list[int], blocks: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = stem
        self.layer1 = self._stage(widths[0], blocks, stride=1)
        self.layer2 = self._stage(widths[1], blocks, stride=2)
        self.layer3 = self._stage(widths[2], blocks, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        """One stage; a 1x1 conv + BN shortcut where the shape changes, as in RepDistiller."""
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def _cifar_resnet(depth: int, in_channels: int, num_classes: int, width: int = 1) -> nn.Module:
    """RepDistiller's resnet{depth} (widths 16/32/64, depth = 6n+2); ``width=4`` gives resnet{depth}x4.

    resnet8x4/resnet32x4 follow RepDistiller: stem 32, stages 64/128/256. Parameters for
    1 channel and 10 classes: resnet8 77,754; resnet20 272,186; resnet56 855,482; resnet32x4 7,410,154.
    """
    stem, widths = (16, [16, 32, 64]) if width == 1 else (32, [64, 128, 256])
    return _SmallResNet(in_channels, num_classes, stem, widths, (depth - 2) // 6)


def _wrn(depth: int, k: int, in_channels: int, num_classes: int) -> nn.Module:
    """Wide ResNet WRN-depth-k: stem 16, stages 16k/32k/64k, n = (depth-4)/6 blocks per stage.

    Built from torchvision's BasicBlock, so blocks are post-activation (conv-BN-ReLU), not the
    pre-activation blocks of the WRN paper and RepDistiller; widths and depths match theirs.
    """
    return _SmallResNet(in_channels, num_classes, 16, [16 * k, 32 * k, 64 * k], (depth - 4) // 6)


# ---------------------------------------------------------------- small students


def _conv_block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)


class _PlainCNN(nn.Module):
    """Three conv-BN-ReLU blocks (max-pool after the first two), global average pool, linear head."""

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, int, int]):
        super().__init__()
        self.block1 = _conv_block(in_channels, widths[0], pool=True)
        self.block2 = _conv_block(widths[0], widths[1], pool=True)
        self.block3 = _conv_block(widths[1], widths[2], pool=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _cnn_tiny(in_channels: int, num_classes: int) -> nn.Module:
    """Widths 10/20/40: 9,640 parameters for 1 channel and 10 classes (a floor for students)."""
    return _PlainCNN(in_channels, num_classes, (10, 20, 40))


def _cnn_small(in_channels: int, num_classes: int) -> nn.Module:
    """Widths 32/64/128: 94,186 parameters for 1 channel and 10 classes."""
    return _PlainCNN(in_channels, num_classes, (32, 64, 128))


def _small_mobilenetv2(width_mult: float, in_channels: int, num_classes: int) -> nn.Module:
    """torchvision's MobileNetV2 with a stride-1 stem, so 28-32 px images end on a 2x2 map, not 1x1.

    Parameters for 1 channel and 10 classes: 250,778 (x0.25) and 700,202 (x0.5); nearly half
    of x0.25 is torchvision's 1280-channel last conv and head, which width_mult < 1 does not shrink.
    """
    model = torchvision.models.mobilenet_v2(weights=None, width_mult=width_mult, num_classes=num_classes)
    _replace_first_conv(model, in_channels, stride=1)
    return model


# ---------------------------------------------------------------- torchvision classifiers

_EXTRA_KWARGS = {
    "googlenet": {"aux_logits": False, "init_weights": False},
    "inception_v3": {"aux_logits": False, "init_weights": False},
}

# Smallest input side each model accepts (found on the meta device); smaller inputs are upsampled.
# Models absent here run on 28x28 as they are.
_MIN_SIZE = {"alexnet": 63, "inception_v3": 75, "convnext": 32, "densenet": 29, "vgg": 32}

# Models built for one image size (position embeddings / fixed attention grids): always resized to it.
_EXACT_SIZE = {"vit_": 224, "maxvit_t": 224}


def _by_prefix(table: dict[str, int], name: str) -> int | None:
    return next((size for prefix, size in table.items() if name.startswith(prefix)), None)


def _resize(x: torch.Tensor, size: int, exact: bool) -> torch.Tensor:
    """Bilinear resize to ``size`` (``exact``) or up to at least ``size`` per side."""
    h, w = x.shape[-2:]
    target = (size, size) if exact else (max(h, size), max(w, size))
    if (h, w) == target:
        return x
    return F.interpolate(x, size=target, mode="bilinear", align_corners=False, antialias=False)


torch.fx.wrap("_resize")  # a leaf for FX tracing: its shape checks would break feature_extraction


class _ResizeInput(nn.Module):
    """Runs ``net`` on inputs resized to the size it needs; ``net`` keeps node names predictable."""

    def __init__(self, net: nn.Module, size: int, exact: bool):
        super().__init__()
        self.net, self.size, self.exact = net, size, exact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(_resize(x, self.size, self.exact))


@contextlib.contextmanager
def _regnet_params_on_cpu() -> Iterator[None]:
    """RegNet computes its stage widths with torch ops and ``.tolist()``; under a meta default
    device that fails, so compute them on the CPU (the model itself still goes where asked)."""
    original = regnet.BlockParams.__dict__["from_init_params"]

    def on_cpu(cls, *args, **kwargs):
        with torch.device("cpu"):
            return original.__func__(cls, *args, **kwargs)

    regnet.BlockParams.from_init_params = classmethod(on_cpu)
    try:
        yield
    finally:
        regnet.BlockParams.from_init_params = original


def _replace_first_conv(model: nn.Module, in_channels: int, stride: int | None = None) -> None:
    """Swap the first Conv2d for one with ``in_channels`` inputs, other hyperparameters kept."""
    name, old = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    if old.in_channels == in_channels and stride is None:
        return
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, stride or old.stride, old.padding,
                    old.dilation, old.groups, old.bias is not None, old.padding_mode,
                    device=old.weight.device, dtype=old.weight.dtype)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new)


def _torchvision(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """A torchvision classifier without weights, first conv adapted, wrapped to resize if needed."""
    patch = _regnet_params_on_cpu() if name.startswith("regnet") else contextlib.nullcontext()
    with patch:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes,
                                             **_EXTRA_KWARGS.get(name, {}))
    _replace_first_conv(model, in_channels)
    exact = _by_prefix(_EXACT_SIZE, name)
    if exact is not None:
        return _ResizeInput(model, getattr(model, "image_size", exact), exact=True)
    minimum = _by_prefix(_MIN_SIZE, name)
    return model if minimum is None else _ResizeInput(model, minimum, exact=False)


# ---------------------------------------------------------------- registry


def _torchvision_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def _registry() -> dict[str, _Builder]:
    small: dict[str, _Builder] = {f"resnet{d}": partial(_cifar_resnet, d) for d in (8, 14, 20, 32, 44, 56, 110)}
    small |= {f"resnet{d}x4": partial(_cifar_resnet, d, width=4) for d in (8, 32)}
    small |= {f"wrn_{d}_{k}": partial(_wrn, d, k) for d in (16, 40) for k in (1, 2)}
    small |= {"mobilenetv2_x0_25": partial(_small_mobilenetv2, 0.25),
              "mobilenetv2_x0_5": partial(_small_mobilenetv2, 0.5),
              "cnn_tiny": _cnn_tiny, "cnn_small": _cnn_small}
    tv = {n: partial(_torchvision, n) for n in _torchvision_names()}
    assert not small.keys() & tv.keys(), "a small-family name shadows a torchvision model"
    return small | tv


_MODELS = _registry()


def list_models() -> list[str]:
    """Sorted names of every registered model (the families' names come after their prefix: `FAMILIES`)."""
    return sorted(_MODELS)


def _pretrained_torchvision(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """torchvision's classifier as it is (the architecture its weights are for); another channel count swaps
    the first conv."""
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **_EXTRA_KWARGS.get(name, {}))
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


@functools.cache
def _timm_names() -> list[str]:
    import timm

    return timm.list_models(pretrained=False) + timm.list_models(pretrained=True)


def _timm(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """timm's model: no weights are fetched; `pretrained_cfg` (its preprocessing) comes with it."""
    import timm

    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)


@dataclass(frozen=True)
class Family:
    """Models named `<prefix>:NAME`: every NAME `names()` lists, built by `build(NAME, in_channels, num_classes)`."""

    names: Callable[[], list[str]]
    build: Callable[[str, int, int], nn.Module]


FAMILIES: dict[str, Family] = {"torchvision": Family(_torchvision_names, _pretrained_torchvision),
                               "timm": Family(_timm_names, _timm)}


def check_model(name: str) -> str:
    """`name` if the registry builds it; else UnknownModelError, one line with close matches."""
    family, sep, member = name.partition(":")
    if sep and family in FAMILIES:
        known = FAMILIES[family].names()
        if member in known:
            return name
        close = [f"{family}:{m}" for m in difflib.get_close_matches(member, known, n=3)]
        where = f"{family}:NAME takes one of {family}'s {len(known)} model names"
    elif name in _MODELS:
        return name
    else:
        close = difflib.get_close_matches(name, _MODELS, n=3)
        where = f"`logitcache models` lists the {len(_MODELS)} names and the families " + \
                ", ".join(f"{f}:NAME" for f in FAMILIES)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UnknownModelError(f"unknown model '{name}'{hint}; {where}")


def build_model(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """A freshly initialised (no pretrained weights) model; deterministic given torch's seed."""
    check_model(name)
    family, sep, member = name.partition(":")
    if not sep:
        return _MODELS[name](in_channels, num_classes)
    model = FAMILIES[family].build(member, in_channels, num_classes)
    model.logitcache_name = name  # for errors that name the model
    return model


class ClassMap(nn.Module):
    """A teacher trained on a larger label space, seen through the data set's classes: its logits at `indices`
    (data class i -> teacher output indices[i]). Part of the model, so every stage that runs it agrees."""

    def __init__(self, net: nn.Module, indices: list[int]):
        super().__init__()
        self.net = net
        self.register_buffer("indices", torch.tensor(indices, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).index_select(1, self.indices)


def model_from_info(info: dict) -> nn.Module:
    """The (untrained) model a checkpoint's model_info describes: its architecture at the teacher's own class
    count, seen through its class map when it has one."""
    model = build_model(info["model"], info["in_channels"], info.get("source_classes") or info["num_classes"])
    return ClassMap(model, info["class_map"]) if info.get("class_map") else model


_CHANNEL_ATTRS = ("in_channels", "out_channels", "groups", "num_features", "in_features", "out_features")


def layer_channels(model: nn.Module) -> dict[str, dict[str, int]]:
    """Channel counts of every conv, norm and linear layer: the plain data that rebuilds a pruned model."""
    return {name: {a: getattr(m, a) for a in _CHANNEL_ATTRS if hasattr(m, a)}
            for name, m in model.named_modules() if any(hasattr(m, a) for a in _CHANNEL_ATTRS)}


def resize_layers(model: nn.Module, channels: dict[str, dict[str, int]], state_dict: dict) -> nn.Module:
    """Give a freshly built model a pruned model's channel counts and tensor shapes; load_state_dict comes next."""
    for name, attrs in channels.items():
        module = model.get_submodule(name)
        for attr, value in attrs.items():
            setattr(module, attr, value)
        for key, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            saved = state_dict.get(f"{name}.{key}" if name else key)
            if saved is not None and saved.shape != tensor.shape:
                empty = torch.empty(saved.shape, dtype=tensor.dtype)
                setattr(module, key, nn.Parameter(empty) if isinstance(tensor, nn.Parameter) else empty)
    return model


def feature_nodes(model: nn.Module) -> list[str]:
    """Feature layer names for create_feature_extractor, in graph order; the last is the output.

    These are get_graph_node_names' eval-mode nodes (input 'x' left out), each named by the
    outermost module it finishes: 'layer1' rather than 'layer1.2.relu_1'. One name per node,
    because torchvision resolves a module name to its last node, and two requested names for
    one node make it silently return an earlier node's tensor for one of them.
    """
    _, eval_nodes = _traced(model, lambda: _fx(model)[0](model))
    nodes = [n for n in eval_nodes if n != "x"]
    last = {module: i for i, node in enumerate(nodes) for module in _modules_of(node)}
    return [next((m for m in _modules_of(node) if last[m] == i), node) for i, node in enumerate(nodes)]


def _modules_of(node: str) -> list[str]:
    """Enclosing module names of a node, outermost first: 'layer1.0.conv1' -> ['layer1', 'layer1.0']."""
    parts = node.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]


def feature_extractor(model: nn.Module, return_nodes: dict[str, str]) -> torch.fx.GraphModule:
    """torchvision's create_feature_extractor (timm's, with its leaf modules, for a model built of timm parts)."""
    return _traced(model, lambda: _fx(model)[1](model, return_nodes))


def _fx(model: nn.Module):
    """(get_graph_node_names, create_feature_extractor): timm's wrappers of torchvision's for a model with timm
    modules, which tell FX the modules and functions it must not trace into; torchvision's otherwise."""
    if any(type(m).__module__.startswith("timm.") for m in model.modules()):
        from timm.layers import create_feature_extractor, get_graph_node_names
    else:
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    return get_graph_node_names, create_feature_extractor


def _traced(model: nn.Module, trace: Callable):
    """`trace()`, or one line naming the model when torch.fx cannot trace it (data-dependent control flow)."""
    try:
        return trace()
    except LogitcacheError:
        raise
    except Exception as e:
        name = getattr(model, "logitcache_name", type(model).__name__)
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise LogitcacheError(f"model {name} cannot be traced by torch.fx ({detail}), which reading its layers and "
                              "logits needs; choose another model") from None
