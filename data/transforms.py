"""Train and test transforms. Test time = square resize to uint8, then the shared crop geometry."""
from __future__ import annotations

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor

from data.geometry import center_crop_box, ten_crop
from data.spec import PreprocessSpec

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
        raise ValueError(f"unknown augmentation {augment!r}: use one of {', '.join(AUGMENTATIONS)}")
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
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return (x.to(torch.float32) / 255.0 - mean) / std


class EvalTransform:
    """Resize to uint8, then the centre crop (crops=1) or the ten crops (crops=10), normalised.

    A class rather than a closure so DataLoader worker processes can pickle it.
    """

    def __init__(self, spec: PreprocessSpec, crops: int):
        if crops not in (1, 10):
            raise ValueError(f"crops must be 1 or 10, got {crops}")
        self.spec = spec
        self.crops = crops

    def __call__(self, img: Image.Image) -> Tensor:
        x = resize_uint8(img, self.spec)
        if self.crops == 10:
            x = ten_crop(x.unsqueeze(0), self.spec.crop)[0]
        else:
            box = center_crop_box(self.spec.resize, self.spec.crop)
            x = x[:, box.top:box.top + box.size, box.left:box.left + box.size]
        return normalize(x, self.spec)

    def __repr__(self) -> str:
        return f"EvalTransform(spec={self.spec}, crops={self.crops})"


def eval_transform(spec: PreprocessSpec, crops: int) -> EvalTransform:
    """crops=1: [3, crop, crop]; crops=10: [10, 3, crop, crop] (TenCrop order), normalised float32."""
    return EvalTransform(spec, crops)
