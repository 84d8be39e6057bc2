"""Crop modes: the one place that says how a resized image becomes crops, and its crops' logits the
image's logits.

A ``CropMode`` owns, for one value of ``--crops``:
- its crop boxes on the resized image (``data.geometry``: "10" is exactly torchvision's TenCrop,
  "1" its centre crop);
- cutting the normalised crops from a resized uint8 batch (``cut``): normalise the image once, then
  slice and mirror; only tensor ops, so the in-graph ten crop (models.tencrop) traces to ONNX;
- reducing per-crop logits to per-image logits (``reduce``: the mean over the crops).
Every stage (runtime, bench, Grad-CAM, export inputs, the DataLoader transform, the CLI's --crops
choices) asks ``crop_mode`` for its mode, so a new mode is one more entry in CROP_MODES (a
subclass when it does not cut crops: DENSE runs the trunk on the whole image and its mirror and reads
the ten crops off the feature map, models.dense; it has TenCrop's boxes and reduction, but nothing to cut).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from cnnbench.common.errors import InputError
from cnnbench.data.geometry import CropBox, center_crop_box, cut_boxes, ten_crop_boxes
from cnnbench.data.spec import PreprocessSpec
from cnnbench.data.transforms import normalize, resize_uint8


@dataclass(frozen=True)
class CropMode:
    """``name``: the --crops value; ``count``: crops per image; ``description`` for reports."""

    name: str
    count: int
    description: str
    cuts_crops = True  # False: the model sees the whole resized image (DenseCropMode)

    def boxes(self, spec: PreprocessSpec) -> list[CropBox]:
        """The crops' boxes on the resized image, in the order ``cut`` returns them."""
        if self.count == 10:
            return ten_crop_boxes(spec.resize, spec.crop)
        return [center_crop_box(spec.resize, spec.crop)]

    def cut(self, images: Tensor, spec: PreprocessSpec) -> Tensor:
        """Resized images [B, 3, R, R] (uint8, or float holding 0..255) -> normalised float32 crops
        [B, n, 3, c, c] in ``boxes`` order (normalising the image once is cheaper than n overlapping crops)."""
        side = spec.resize
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, side, side):
            raise ValueError(f"expected resized images [B, 3, {side}, {side}], got {tuple(images.shape)}")
        return cut_boxes(normalize(images, spec), self.boxes(spec))

    def reduce(self, logits: Tensor) -> Tensor:
        """Per-crop logits [B*n, K] (image-major) -> per-image logits [B, K], the mean over the crops."""
        return logits.reshape(-1, self.count, logits.shape[-1]).mean(dim=1)

    def per_image(self, rows: Tensor) -> Tensor:
        """Per-crop rows [B*n, ...] -> [B, n, ...]."""
        return rows.reshape(-1, self.count, *rows.shape[1:])


@dataclass(frozen=True)
class DenseCropMode(CropMode):
    """Dense ten crops (models.dense.DenseTenCropModel): the trunk runs on the resized image and its
    mirror, and each of TenCrop's crops is a window of the feature map. Its boxes are TenCrop's (the
    windows stand for those crops); there is nothing to cut, the model takes the resized uint8 image."""

    cuts_crops = False

    def boxes(self, spec: PreprocessSpec) -> list[CropBox]:
        return ten_crop_boxes(spec.resize, spec.crop)

    def cut(self, images: Tensor, spec: PreprocessSpec) -> Tensor:
        raise ValueError("dense ten crops are read off the whole image's feature map, not cut as crops; "
                         "run models.dense.DenseTenCropModel on the resized images")


TEN = CropMode("10", 10, "ten crops (torchvision TenCrop), logits averaged")
CENTRE = CropMode("1", 1, "the centre crop")
DENSE = DenseCropMode("dense", 10, "dense ten crops: trunk on the image and its mirror, crops read as "
                                   "feature-map windows (an approximation of 10, for crops of 224 px and larger; "
                                   "on windows under 5 feature cells a side, e.g. 96 px crops, a poor one)")
CROP_MODES: dict[str, CropMode] = {mode.name: mode for mode in (TEN, CENTRE, DENSE)}
# Where an export makes its ten crops (export --ten-crop, manifest "ten_crop") -> the crop mode its graph
# computes from uint8 images; None: the graph takes normalised crops cut on the host.
TEN_CROP_PLACES: dict[str, str | None] = {"host": None, "graph": TEN.name, "dense": DENSE.name}


def crop_mode(crops) -> CropMode:
    """The mode for a --crops value (10, "10", 1, "1", ...); anything else is an InputError naming the choices."""
    mode = CROP_MODES.get(str(crops))
    if mode is None or isinstance(crops, bool):
        names = sorted(CROP_MODES, key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))
        choices = ", ".join(names[:-1]) + " or " + names[-1]
        raise InputError(f"crops must be {choices}, got {crops!r}")
    return mode


class EvalTransform:
    """PIL image -> the test-time crops: [3, c, c] for one crop, [n, 3, c, c] for more (normalised float32);
    for a mode that cuts no crops (dense), the resized uint8 image [3, R, R].

    A class rather than a closure so DataLoader worker processes can pickle it.
    """

    def __init__(self, spec: PreprocessSpec, crops):
        self.spec = spec
        self.mode = crop_mode(crops)

    def __call__(self, img: Image.Image) -> Tensor:
        if not self.mode.cuts_crops:  # dense: the model takes the resized image itself
            return resize_uint8(img, self.spec)
        crops = self.mode.cut(resize_uint8(img, self.spec).unsqueeze(0), self.spec)[0]
        return crops[0] if self.mode.count == 1 else crops

    def __repr__(self) -> str:
        return f"EvalTransform(spec={self.spec}, crops={self.mode.name})"


def eval_transform(spec: PreprocessSpec, crops) -> EvalTransform:
    """crops=1: [3, crop, crop]; crops=10: [10, 3, crop, crop] (TenCrop order), normalised float32."""
    return EvalTransform(spec, crops)
