"""`python tests/ddp_launch.py ARGS` (or under torchrun) = `logitcache ARGS`, with one extra model registered.

`cnn_tiny_no_bn` is `cnn_tiny` with its BatchNorm layers replaced by identities. Under DDP each rank
normalises by its own batch's statistics, so a BatchNorm model cannot take the same step on 2 processes
as on 1; without BatchNorm one DDP step must equal one single-process step of the same global batch.
"""

from torch import nn

from logitcache.core import models

NAME = "cnn_tiny_no_bn"


def cnn_tiny_no_bn(in_channels: int, num_classes: int) -> nn.Module:
    net = models.build_model("cnn_tiny", in_channels, num_classes)
    for block in (net.block1, net.block2, net.block3):
        block[1] = nn.Identity()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    return net


def register(registry: dict) -> None:
    registry[NAME] = cnn_tiny_no_bn


if __name__ == "__main__":
    register(models._MODELS)
    from logitcache.cli import main

    main()
