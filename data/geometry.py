"""Ten-crop geometry: the single definition shared by evaluation, the in-graph crop and Grad-CAM.

It reproduces `torchvision.transforms.TenCrop` exactly: the four corners and the centre
(`int(round((side - crop) / 2))`, Python's round-half-to-even, as torchvision's `center_crop`),
then the same five crops taken from the horizontally flipped image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class CropBox:
    """A square crop of the resized image.

    top/left are in the coordinates of the UNflipped image; `flipped` means the crop is mirrored
    left-right after cutting, so a map computed on the crop is un-mirrored, then pasted at (top, left).
    """

    top: int
    left: int
    size: int
    flipped: bool


def _check_sizes(height: int, width: int, crop: int) -> None:
    if crop <= 0:
        raise ValueError(f"crop size must be positive, got {crop}")
    if crop > height or crop > width:
        raise ValueError(f"crop size {crop} is larger than the image ({height}x{width})")


def _centre_offset(side: int, crop: int) -> int:
    return int(round((side - crop) / 2.0))


def _five_boxes(height: int, width: int, crop: int) -> list[tuple[int, int]]:
    """(top, left) of TL, TR, BL, BR, centre, as torchvision's five_crop takes them."""
    bottom, right = height - crop, width - crop
    return [(0, 0), (0, right), (bottom, 0), (bottom, right),
            (_centre_offset(height, crop), _centre_offset(width, crop))]


def _ten_crop_boxes_hw(height: int, width: int, crop: int) -> list[CropBox]:
    _check_sizes(height, width, crop)
    five = _five_boxes(height, width, crop)
    unflipped = [CropBox(top, left, crop, False) for top, left in five]
    # A crop at `left` in the mirrored image covers columns [width - left - crop, width - left)
    # of the original image; with odd margins the mirrored centre is not the original centre.
    flipped = [CropBox(top, width - left - crop, crop, True) for top, left in five]
    return unflipped + flipped


def ten_crop_boxes(resize: int, crop: int) -> list[CropBox]:
    """Boxes of the ten crops of a resize x resize image, in TenCrop's order."""
    return _ten_crop_boxes_hw(resize, resize, crop)


def center_crop_box(resize: int, crop: int) -> CropBox:
    _check_sizes(resize, resize, crop)
    offset = _centre_offset(resize, crop)
    return CropBox(offset, offset, crop, False)


def cut_boxes(x: Tensor, boxes: list[CropBox]) -> Tensor:
    """[B, C, H, W] (any dtype) -> [B, len(boxes), C, s, s]: each box sliced, mirrored when ``flipped``.

    Only slicing and a last-dimension flip, so it traces into ONNX with a dynamic batch.
    """
    if x.dim() != 4:
        raise ValueError(f"expected a [B, C, H, W] tensor, got shape {tuple(x.shape)}")
    crops = []
    for box in boxes:
        patch = x[:, :, box.top:box.top + box.size, box.left:box.left + box.size]
        crops.append(torch.flip(patch, dims=[-1]) if box.flipped else patch)
    return torch.stack(crops, dim=1)


def ten_crop(x: Tensor, crop: int) -> Tensor:
    """[B, C, H, W] (any dtype) -> [B, 10, C, crop, crop], equal to TenCrop on each image."""
    if x.dim() != 4:
        raise ValueError(f"ten_crop expects a [B, C, H, W] tensor, got shape {tuple(x.shape)}")
    return cut_boxes(x, _ten_crop_boxes_hw(int(x.shape[-2]), int(x.shape[-1]), crop))
