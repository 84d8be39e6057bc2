"""The preprocessing spec: the one record of how pixels become model input.

It is stored in every checkpoint and copied into every export manifest, so nothing downstream
hard-codes a crop size or normalisation constants.
"""
from __future__ import annotations

from dataclasses import dataclass

from cnnbench.common.errors import InputError


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

INTERPOLATIONS = ("bilinear", "bicubic")
_NORMS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "half": (HALF, HALF)}
_KEYS = ("resize", "crop", "mean", "std", "interpolation")


@dataclass(frozen=True)
class PreprocessSpec:
    """Test-time geometry and normalisation.

    resize: side of the square the image is resized to before cropping (256 for 224 crops).
    crop: side of the square crop the model sees.
    mean, std: per-channel normalisation of values scaled to [0, 1].
    interpolation: torchvision InterpolationMode name in lower case.
    """

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        for key in ("resize", "crop"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InputError(f"PreprocessSpec.{key} must be a positive integer, got {value!r}")
        if self.crop > self.resize:
            raise InputError(f"PreprocessSpec.crop ({self.crop}) is larger than resize ({self.resize})")
        # Frozen dataclass: normalise lists (e.g. from JSON) into tuples of floats in place.
        object.__setattr__(self, "mean", _triple("mean", self.mean))
        object.__setattr__(self, "std", _triple("std", self.std))
        if any(s <= 0 for s in self.std):
            raise InputError(f"PreprocessSpec.std must be positive, got {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise InputError(
                f"PreprocessSpec.interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}"
            )

    def to_dict(self) -> dict:
        return {
            "resize": self.resize,
            "crop": self.crop,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        """Build a spec from `to_dict` output; a ValueError names the missing, unknown or bad key."""
        if not isinstance(d, dict):
            raise InputError(f"preprocessing spec must be a dict, got {type(d).__name__}")
        missing = [k for k in _KEYS if k not in d and k != "interpolation"]
        if missing:
            raise InputError(f"preprocessing spec is missing key(s): {', '.join(missing)}")
        unknown = sorted(set(d) - set(_KEYS))
        if unknown:
            raise InputError(f"preprocessing spec has unknown key(s): {', '.join(unknown)}")
        return cls(**d)


def _triple(name: str, value) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"PreprocessSpec.{name} must be three numbers, got {value!r}") from None
    if len(values) != 3:
        raise InputError(f"PreprocessSpec.{name} must have 3 values (one per RGB channel), got {len(values)}")
    return values


def spec_for_crop(crop: int, norm: str = "imagenet") -> PreprocessSpec:
    """The standard spec for a crop size: resize keeps ImageNet's 224/256 ratio (256 for 224)."""
    if norm not in _NORMS:
        raise InputError(f"unknown normalisation {norm!r}; expected one of {sorted(_NORMS)}")
    mean, std = _NORMS[norm]
    return PreprocessSpec(resize=round(crop * 256 / 224), crop=crop, mean=mean, std=std)
