"""The held-out images every row of a model is measured and scored on.

Each image is decoded once; its resized uint8 tensor is made once per preprocessing spec, so the
compute-mode rows time the model only and every backend sees exactly the same pixels.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from cnnbench.common.errors import InputError
from cnnbench.data.heldout import HeldOut, SplitFileMissing, SplitNotRecorded, held_out
from cnnbench.data.images import ImageError, load_rgb
from cnnbench.data.spec import PreprocessSpec
from cnnbench.data.transforms import resize_uint8
from cnnbench.models.checkpoint import recorded_split_files

SYNTHETIC_IMAGES = 64  # timing-only stand-in when a model has no test split and no --data


class EvalSet:
    """Test images with labels (``classes`` order), or seeded random pixels when there are none."""

    def __init__(self, description: str, paths: list[str], labels: Optional[list[int]],
                 classes: Optional[list[str]], total: int):
        self.description = description
        self.classes = classes
        self.total = total            # test images available before any cap
        self.skipped: list[tuple[str, str]] = []
        self._paths = list(paths)
        self._labels = labels
        self._decoded = None
        self._resized: dict[tuple, Tensor] = {}

    @classmethod
    def synthetic(cls, reason: str) -> "EvalSet":
        return cls(f"random pixels ({reason})", [], None, None, 0)

    @property
    def has_files(self) -> bool:
        return bool(self._paths)

    @property
    def paths(self) -> list[str]:
        """The readable image files (after decoding, the unreadable ones are moved to ``skipped``)."""
        self._decode()
        return self._paths

    def labels_for(self, model_classes: list[str]) -> Optional[np.ndarray]:
        """Labels as indices into ``model_classes`` (matched by class name), or None when they do not fit."""
        if self._labels is None or self.classes is None:
            return None
        self._decode()
        if self.classes == list(model_classes):
            return np.asarray(self._labels, dtype=np.int64)
        index = {name: i for i, name in enumerate(model_classes)}
        if not all(name in index for name in self.classes):
            return None
        return np.asarray([index[self.classes[label]] for label in self._labels], dtype=np.int64)

    def images(self, spec: PreprocessSpec) -> Tensor:
        """uint8 [N,3,R,R] on the CPU, resized once per spec with the reference resize (data.transforms)."""
        key = (spec.resize, spec.interpolation)
        if key not in self._resized:
            if not self._paths:
                generator = torch.Generator().manual_seed(0)
                self._resized[key] = torch.randint(0, 256, (SYNTHETIC_IMAGES, 3, spec.resize, spec.resize),
                                                   dtype=torch.uint8, generator=generator)
            else:
                self._decode()
                self._resized[key] = torch.stack([resize_uint8(img, spec) for img in self._decoded])
        return self._resized[key]

    def _decode(self) -> None:
        if self._decoded is not None or not self._paths:
            return
        decoded, paths, labels = [], [], []
        for i, path in enumerate(self._paths):
            try:
                decoded.append(load_rgb(path))
            except ImageError as exc:
                self.skipped.append((path, exc.reason))
                continue
            paths.append(path)
            if self._labels is not None:
                labels.append(self._labels[i])
        if not decoded:
            raise InputError(f"none of the {len(self._paths)} test images of {self.description} could be read "
                             f"(first: {self.skipped[0][0]}: {self.skipped[0][1]})")
        self._decoded, self._paths = decoded, paths
        if self._labels is not None:
            self._labels = labels


def find_held_out(model, data) -> tuple[Optional[HeldOut], str]:
    """A bench target's held-out split (data.heldout.held_out over what its run recorded), or None and
    why when there is none (the rows then time random pixels)."""
    try:
        return held_out(data, recorded_split_files(checkpoints=model.sources, manifest=model.manifest),
                        owner=model.name), ""
    except (SplitNotRecorded, SplitFileMissing) as exc:
        return None, str(exc)


def load_evalset(held: Optional[HeldOut], why_none: str, limit: Optional[int]) -> EvalSet:
    """The test images of a held-out split, at most ``limit`` spread evenly over the classes; random
    pixels (timing only) without a split."""
    if held is None:
        return EvalSet.synthetic(why_none)
    samples = held.samples("test", limit)
    return EvalSet(held.describe(), [s.path for s in samples], [s.label for s in samples], list(held.split.classes),
                   len(held.split.test))
