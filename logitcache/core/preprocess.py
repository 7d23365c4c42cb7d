"""A teacher's input preprocessing: how a uint8 view becomes the tensor the teacher was made for.

A teacher logitcache trained takes the data as it is, normalised with the data set's statistics; an imported
one brings its own (an ImageNet model: resize the shorter side to 256, center-crop 224, ImageNet mean and std).
The teacher's checkpoint and every cache made from it record it; dump-teacher, `inspect --verify` and
`train-student --online` all render the teacher's input with `TeacherInput`, so they agree on every logit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from logitcache.core.errors import LogitcacheError
from logitcache.core.views import Normalizer

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to `resize`, center-crop to `crop` (None: the view's own size), then
    scale to [0, 1] and normalise with `mean` and `std`; `channels` is what the teacher's first layer takes."""

    resize: int | None
    crop: int | None
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int

    def to_json(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, data: dict) -> "Preprocess":
        return cls(data["resize"], data["crop"], data["interpolation"], tuple(data["mean"]), tuple(data["std"]),
                   data["channels"])

    @classmethod
    def of_data(cls, channels: int, image_size: tuple[int, int], mean, std) -> "Preprocess":
        """A teacher logitcache trained: the data at its own size, with the data set's statistics."""
        side = min(image_size) if image_size[0] == image_size[1] else None
        return cls(side, side, "bilinear", tuple(mean), tuple(std), channels)

    @classmethod
    def of_checkpoint(cls, info: dict) -> "Preprocess | None":
        """What a checkpoint's model_info records; None for one written before it was recorded (the data as it is)."""
        return cls.from_json(info["preprocess"]) if "preprocess" in info else None

    def override(self, **given) -> "Preprocess":
        """These fields replaced where a value is given (None keeps the field), checked."""
        changed = replace(self, **{k: (tuple(v) if k in ("mean", "std") else v) for k, v in given.items()
                                   if v is not None})
        if changed.interpolation not in INTERPOLATIONS:
            raise LogitcacheError(f"preprocess interpolation {changed.interpolation!r} is not one of "
                                  f"{', '.join(INTERPOLATIONS)}")
        if len(changed.mean) != changed.channels or len(changed.std) != changed.channels:
            raise LogitcacheError(f"preprocess mean {list(changed.mean)} and std {list(changed.std)} need one value "
                                  f"per teacher input channel ({changed.channels})")
        if changed.crop is not None and changed.resize is not None and changed.crop > changed.resize:
            raise LogitcacheError(f"preprocess crop {changed.crop} is larger than resize {changed.resize}; "
                                  "crop at most the resized size")
        return changed


class TeacherInput:
    """uint8 (B, C, H, W) views -> the teacher's float input: grey repeated to 3 channels (as torchvision's
    Grayscale(3)), the shorter side resized and the center cropped where the teacher's size differs, then
    ToDtype(scale) and Normalize. A view already at the teacher's size only goes through `Normalizer`."""

    def __init__(self, pre: Preprocess, data_channels: int):
        if data_channels != pre.channels and (data_channels, pre.channels) != (1, 3):
            raise LogitcacheError(f"the teacher takes {pre.channels}-channel images, the data has {data_channels} "
                                  "channel(s); only grey-scale data for a 3-channel teacher is converted "
                                  "(the grey channel repeated): use a teacher made for this data")
        self.pre = pre
        self.repeat = pre.channels if data_channels != pre.channels else 0
        self.interpolation = InterpolationMode(pre.interpolation)
        self.normalize = Normalizer(pre.mean, pre.std)

    def resized(self, images: torch.Tensor) -> torch.Tensor:
        """The uint8 views at the teacher's size (unchanged when they have it)."""
        h, w = images.shape[-2:]
        pre = self.pre
        if pre.resize is not None and min(h, w) != pre.resize:
            images = TF.resize(images, [pre.resize], interpolation=self.interpolation, antialias=True)
        if pre.crop is not None and tuple(images.shape[-2:]) != (pre.crop, pre.crop):
            images = TF.center_crop(images, [pre.crop, pre.crop])
        return images

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = self.resized(images)
        if self.repeat:
            images = images.expand(-1, self.repeat, -1, -1)
        return self.normalize(images)


def model_input(info: dict, split) -> "TeacherInput | Normalizer":
    """How a checkpoint's model takes a split's uint8 images: a teacher's recorded preprocessing, or (a student, or
    a checkpoint that records none) the data's normalisation."""
    pre = Preprocess.of_checkpoint(info)
    return TeacherInput(pre, split.channels) if pre else Normalizer(split.mean, split.std)
