"""Where a map peaks, in the original image, and the pointing game against object masks.

A map lives on the resized (square) image; a pixel (x, y) there is mapped to the original image or
mask through its centre: column floor((x + 0.5) * W / R). The pointing game (Zhang et al., 2016)
counts an image as a hit when the peak of its map falls inside the object mask (mask > 127).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cnnbench.data.crops import crop_mode
from cnnbench.data.geometry import cut_boxes
from cnnbench.data.spec import PreprocessSpec
from cnnbench.data.synth import mask_path
from cnnbench.gradcam.core import upsample
from cnnbench.gradcam.tencrop import paste_back, peak


def to_original(x: int, y: int, resized: int, width: int, height: int) -> tuple[int, int]:
    """A pixel of the resized R x R image -> the pixel of a width x height image it falls in."""
    column = min(int((x + 0.5) * width / resized), width - 1)
    row = min(int((y + 0.5) * height / resized), height - 1)
    return column, row


def peak_location(x: int, y: int, resized: int, width: int, height: int) -> dict:
    """The JSON description of a map's peak: original-image pixel and fractions of the sides."""
    column, row = to_original(x, y, resized, width, height)
    return {"x": column, "y": row, "x_frac": (x + 0.5) / resized, "y_frac": (y + 0.5) / resized}


def load_mask(image_path) -> np.ndarray | None:
    """The object mask (bool [H, W]) beside an image of the embedded set, or None when there is none."""
    path = mask_path(image_path)
    if not os.path.isfile(path):
        return None
    with Image.open(path) as mask:
        return np.asarray(mask.convert("L")) > 127


def peak_in_mask(x: int, y: int, resized: int, mask: np.ndarray) -> bool:
    height, width = mask.shape
    column, row = to_original(x, y, resized, width, height)
    return bool(mask[row, column])


def pointing_summary(hits: list[bool]) -> dict:
    return {"images": len(hits), "hits": int(sum(hits)), "share": (sum(hits) / len(hits)) if hits else None}


def format_share(summary: dict) -> str:
    """'53.8% of 160' (hits among the images), or 'no images'."""
    if not summary["images"]:
        return "no images"
    return f"{100 * summary['share']:.1f}% of {summary['images']}"


def ideal_map_hit(mask: np.ndarray, spec: PreprocessSpec, crops, cells: int) -> bool:
    """The pointing game's ceiling on one image for a network whose last maps are ``cells`` x ``cells``:
    does the best such map - the object mask, resized like the image, averaged over each last-map cell
    of each crop - peak inside the object, through the Grad-CAM maps' own upsampling, paste-back and peak?
    """
    boxes = crop_mode(crops).boxes(spec)
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((spec.resize, spec.resize), Image.BILINEAR)
    frame = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)[None, None]
    pieces = cut_boxes(frame, boxes)[0]  # [n, 1, crop, crop], mirrored where the crop is
    cell_maps = F.adaptive_avg_pool2d(pieces, cells)[:, 0]
    x, y = peak(paste_back(upsample(cell_maps, spec.crop)[None], boxes, spec.resize))[0]
    return peak_in_mask(x, y, spec.resize, mask)
