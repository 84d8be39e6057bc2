"""Train transform, the test-time resize and normalisation (the test-time crops: data.crops)."""
from __future__ import annotations

import functools

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor

from cnnbench.common.errors import InputError
from cnnbench.data.spec import PreprocessSpec

_MODES = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


def interpolation_mode(spec: PreprocessSpec) -> T.InterpolationMode:
    return _MODES[spec.interpolation]


AUGMENTATIONS = ("affine", "resized-crop")


def train_transform(spec: PreprocessSpec, augment: str = "affine", min_scale: float = 0.35) -> T.Compose:
    """Training augmentation ending in a normalised float [3, crop, crop]; flips are horizontal, never vertical.

    "affine": square resize, random affine (15 degrees, 10 % shift, 0.9-1.1 scale), random crop.
    "resized-crop": a random crop of ``min_scale``..1 of the image's area and 3/4..4/3 aspect, resized
    to the crop side (the ImageNet recipe's augmentation).
    """
    mode = interpolation_mode(spec)
    if augment == "affine":
        geometry = [
            T.Resize((spec.resize, spec.resize), interpolation=mode, antialias=True),
            T.RandomAffine(degrees=15, translate=(0.1, 0.1), scale=(0.9, 1.1), interpolation=mode),
            T.RandomCrop(spec.crop),
        ]
    elif augment == "resized-crop":
        geometry = [T.RandomResizedCrop(spec.crop, scale=(min_scale, 1.0), interpolation=mode, antialias=True)]
    else:
        raise InputError(f"unknown augmentation {augment!r}: use one of {', '.join(AUGMENTATIONS)}")
    return T.Compose(geometry + [T.RandomHorizontalFlip(p=0.5), T.ToTensor(), T.Normalize(spec.mean, spec.std)])


def resize_uint8(img: Image.Image, spec: PreprocessSpec) -> Tensor:
    """The test-time resize: RGB PIL image -> uint8 [3, resize, resize] (what the runtime feeds graphs)."""
    resized = TF.resize(img, [spec.resize, spec.resize], interpolation=interpolation_mode(spec), antialias=True)
    return TF.pil_to_tensor(resized)


def normalize(x: Tensor, spec: PreprocessSpec) -> Tensor:
    """Values in the 0..255 range (uint8, or float holding 0..255) -> float32 (x/255 - mean) / std.

    Broadcasts over [..., 3, H, W]; built from tensor ops only so it also runs inside exported graphs.
    """
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"normalize expects [..., 3, H, W], got shape {tuple(x.shape)}")
    if x.device.type != "cpu" and type(x) is Tensor and not torch.compiler.is_compiling():
        mean, std = _device_constants(tuple(spec.mean), tuple(spec.std), x.device)
    else:  # on the CPU they cost nothing; while tracing they must be the trace's own constants
        mean, std = _constants(spec.mean, spec.std, x.device)
    return (x.to(torch.float32) / 255.0 - mean) / std


def _constants(mean, std, device) -> tuple[Tensor, Tensor]:
    return (torch.tensor(mean, dtype=torch.float32, device=device).view(3, 1, 1),
            torch.tensor(std, dtype=torch.float32, device=device).view(3, 1, 1))


@functools.lru_cache(maxsize=16)
def _device_constants(mean: tuple, std: tuple, device: torch.device) -> tuple[Tensor, Tensor]:
    """The constants on a GPU, built once per device: a host-to-device copy per batch would stall the stream."""
    return _constants(mean, std, device)

