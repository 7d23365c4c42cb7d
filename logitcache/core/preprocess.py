"""A teacher's input preprocessing: how a uint8 view becomes the tensor the teacher was made for.

A teacher logitcache trained takes the data as it is, normalised with the data set's statistics; an imported
one brings its own (an ImageNet model: resize the shorter side to 256, center-crop 224, ImageNet mean and std).
The teacher's checkpoint and every cache made from it record it; dump-teacher, `inspect --verify` and
`train-student --online` all render the teacher's input with `TeacherInput`, so they agree on every logit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from logitcache.core.errors import LogitcacheError
from logitcache.core.views import EVAL_SEED, RESIZED_CROP, BoxRenderer, Normalizer, ViewSpec, center_box

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
    def of_data(cls, channels: int, image_size: tuple[int, int] | None, mean, std) -> "Preprocess":
        """A teacher logitcache trained: the data at its own size, with the data set's statistics (no size: images
        of many sizes, whose input size the user sets with teacher.preprocess)."""
        side = min(image_size) if image_size and image_size[0] == image_size[1] else None
        return cls(side, side, "bilinear", tuple(mean), tuple(std), channels)

    @classmethod
    def of_checkpoint(cls, info: dict) -> "Preprocess | None":
        """What a checkpoint's model_info records; None for one written before it was recorded (the data as it is)."""
        return cls.from_json(info["preprocess"]) if "preprocess" in info else None

    def at_size(self) -> "Preprocess":
        """The same normalisation for views already rendered at the model's size (box views): no resize, no crop."""
        return replace(self, resize=None, crop=None)

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


@dataclass(frozen=True)
class BoxInput:
    """A model that takes boxes of the original images resized to its own side (random_resized_crop views, image
    folders): `size` (None: the image's own size), the interpolation, and the evaluation view's region
    (`resize`, `crop`: the box that resizing the shorter side to resize and centre-cropping crop keeps)."""

    size: int | None
    interpolation: str
    resize: int | None
    crop: int | None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "BoxInput":
        return cls(data["size"], data["interpolation"], data["resize"], data["crop"])

    @classmethod
    def of_teacher(cls, pre: Preprocess) -> "BoxInput":
        return cls(pre.crop, pre.interpolation, pre.resize, pre.crop)


class EvalBox:
    """uint8 (C, H, W) original -> its evaluation view at the model's size: the centre box, rendered by the
    `BoxRenderer` of every cached box view, so a test cache's view and a model's scored input agree."""

    def __init__(self, box_input: BoxInput):
        self.box_input = box_input
        self.renderer = BoxRenderer(ViewSpec(0, False, kind=RESIZED_CROP), box_input.size, box_input.interpolation)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        b = self.box_input
        h, w = image.shape[-2:]
        box = center_box(np.array([h]), np.array([w]), b.resize, b.crop)[0]
        return self.renderer(image, [EVAL_SEED, *box, 0])


def _identity(image: torch.Tensor) -> torch.Tensor:
    return image


@dataclass
class ModelInput:
    """How a model sees a split unaugmented: `render` turns one original uint8 image into the model's uint8 view
    (in the loader: decoding and resizing happen in its workers), `prepare` a batch of views into the model's input
    (on the device)."""

    render: Callable[[torch.Tensor], torch.Tensor]
    prepare: Callable[[torch.Tensor], torch.Tensor]

    @property
    def batch(self) -> int:
        """Images per scoring batch: 512, fewer for large inputs (about 4 M input pixels a batch), so that the
        activations of a 224-pixel model stay within a few GB."""
        size = getattr(self.render, "box_input", None)
        side = size.size if size is not None and size.size else None
        return 512 if side is None else max(8, min(512, 2**22 // (side * side)))

    def views(self, split, rows) -> torch.Tensor:
        """The uint8 views of these rows of `split`, stacked."""
        if self.render is _identity and not split.is_files:
            return split.images[torch.as_tensor(np.asarray(rows, dtype=np.int64))]
        return torch.stack([self.render(split.read(int(i))) for i in rows])

    def inputs(self, split, rows) -> torch.Tensor:
        """The model's input for these rows (on the CPU)."""
        return self.prepare(self.views(split, rows))


def model_input(info: dict, split) -> ModelInput:
    """How a checkpoint's model takes a split's images. A model that records a box input (a student of
    random_resized_crop views), or any model on an image folder, sees the centre box at its size; otherwise the
    images as they are, through a teacher's recorded preprocessing, or (a student, or a checkpoint that records
    none) the data's normalisation."""
    pre = Preprocess.of_checkpoint(info)
    normalize = info.get("normalize", {"mean": split.mean, "std": split.std})
    if "box_input" in info:
        return ModelInput(EvalBox(BoxInput.from_json(info["box_input"])), Normalizer(normalize["mean"], normalize["std"]))
    if split.is_files:
        if pre is None or pre.crop is None:
            raise LogitcacheError(f"model {info.get('model')} records no input size; an image folder's images differ "
                                  "in size: import the teacher with its preprocessing (import-teacher --crop)")
        return ModelInput(EvalBox(BoxInput.of_teacher(pre)), TeacherInput(pre.at_size(), split.channels))
    if pre:
        return ModelInput(_identity, TeacherInput(pre, split.channels))
    return ModelInput(_identity, Normalizer(normalize["mean"], normalize["std"]))


def data_input(split) -> ModelInput:
    """A model that takes the data as it is, normalised with the data set's statistics."""
    return model_input({}, split)


def preprocess_input(pre: Preprocess, split) -> ModelInput:
    """A teacher of this preprocessing on this split."""
    return model_input({"preprocess": pre.to_json()}, split)
