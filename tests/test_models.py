"""The model registry: small families forward real tensors; every model forwards on the meta device."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.models.resnet import BasicBlock

from logitcache.core.models import UnknownModelError, build_model, feature_nodes, list_models

SMALL = [
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4", "resnet32x4",
    "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "mobilenetv2_x0_25", "mobilenetv2_x0_5", "cnn_tiny", "cnn_small",
]
SHAPES = [((2, 1, 28, 28), 10), ((2, 3, 32, 32), 100)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Batch-2 forwards are too small to gain from threads, and on a busy 2-core machine
    OpenMP's thread sync made them up to 100x slower (resnet110: 6 s instead of 0.05 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_is_small_families_plus_torchvision_classifiers():
    torchvision_names = torchvision.models.list_models(module=torchvision.models)
    assert list_models() == sorted(SMALL + torchvision_names)


@pytest.mark.parametrize("shape, classes", SHAPES)
@pytest.mark.parametrize("name", SMALL)
def test_small_model_forwards_real_tensors(name, shape, classes):
    torch.manual_seed(0)
    model = build_model(name, shape[1], classes)
    assert model(torch.randn(shape)).shape == (shape[0], classes)


def meta_forward(name: str, shape: tuple[int, ...], classes: int, train: bool) -> torch.Tensor:
    with torch.device("meta"):
        model = build_model(name, shape[1], classes).train(train)
        with torch.no_grad():
            return model(torch.empty(shape, device="meta"))


@pytest.mark.parametrize("shape, classes", SHAPES)
@pytest.mark.parametrize("name", list_models())
def test_every_model_forwards_on_meta(name, shape, classes):
    """Shapes only, no compute: catches first-conv and minimum-size mistakes in all models quickly.

    Eval mode, which is about a third faster on meta than train mode's batch-norm updates.
    """
    assert meta_forward(name, shape, classes, train=False).shape == (shape[0], classes)


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_aux_logit_models_return_plain_logits_in_train_mode(name):
    """The only torchvision classifiers whose train-mode output differs (aux logits, turned off)."""
    out = meta_forward(name, (2, 1, 28, 28), 10, train=True)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)


@pytest.mark.parametrize("name, low, high", [
    ("cnn_tiny", 7_000, 12_000), ("cnn_small", 70_000, 150_000), ("resnet20", 260_000, 285_000)])
def test_parameter_counts(name, low, high):
    assert low <= n_params(build_model(name, 1, 10)) <= high


def test_cifar_resnets_use_torchvision_basic_block():
    model = build_model("resnet20", 1, 10)
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3) for b in layer]
    assert len(blocks) == 9 and all(isinstance(b, BasicBlock) for b in blocks)


def test_build_is_deterministic_given_seed():
    torch.manual_seed(1)
    first = build_model("resnet8", 3, 10).state_dict()
    torch.manual_seed(1)
    second = build_model("resnet8", 3, 10).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_feature_nodes_name_stages_and_end_with_logits():
    nodes = feature_nodes(build_model("resnet20", 1, 10))
    assert {"layer1", "layer2", "layer3", "avgpool", "fc"} <= set(nodes)
    assert "x" not in nodes and nodes[-1] == "fc" and len(set(nodes)) == len(nodes)


@pytest.mark.parametrize("name, layer", [("resnet20", "layer2"), ("cnn_tiny", "block2"), ("alexnet", "net.features")])
def test_feature_nodes_work_with_create_feature_extractor(name, layer):
    """Includes a resized torchvision model: the resize must not break FX tracing."""
    model = build_model(name, 1, 10).eval()
    nodes = feature_nodes(model)
    assert layer in nodes
    extractor = create_feature_extractor(model, {layer: layer, nodes[-1]: "logits"})
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        out = extractor(x)
        assert torch.allclose(out["logits"], model(x))
    assert out[layer].shape[0] == 2


def test_unknown_model_is_one_line_with_suggestions():
    with pytest.raises(UnknownModelError) as info:
        build_model("resnet21", 1, 10)
    message = str(info.value)
    assert "\n" not in message and "unknown model 'resnet21'" in message and "resnet20" in message
    assert isinstance(info.value, ValueError)
