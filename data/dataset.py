"""A dataset over (path, label) samples where one unreadable image never sinks a batch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from cnnbench.data.folder import Sample
from cnnbench.data.images import ImageError, load_rgb


@dataclass(frozen=True)
class BadImage:
    """Stands in for an image that could not be loaded; collate_skip_bad drops and records it."""

    path: str
    reason: str
    index: int


class ImageDataset(Dataset):
    """Item i is (transform(image), label, i), or a BadImage when the file cannot be decoded."""

    def __init__(self, samples: Sequence[Sample], transform: Callable):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        try:
            img = load_rgb(sample.path)
        except ImageError as e:
            return BadImage(e.path, e.reason, index)
        return self.transform(img), sample.label, index


def collate_skip_bad(batch):
    """-> (images, labels, indices, [(path, reason), ...]) with bad images left out.

    When every item is bad, images is None (callers skip the batch) and labels/indices are empty.
    """
    good = [item for item in batch if not isinstance(item, BadImage)]
    bad = [(item.path, item.reason) for item in batch if isinstance(item, BadImage)]
    if not good:
        return None, torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64), bad
    images = torch.stack([item[0] for item in good])
    labels = torch.tensor([item[1] for item in good], dtype=torch.int64)
    indices = torch.tensor([item[2] for item in good], dtype=torch.int64)
    return images, labels, indices, bad
