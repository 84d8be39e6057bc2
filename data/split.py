"""Stratified, seeded train/test split, saved beside a run so every later stage reuses it."""
from __future__ import annotations

import os
import random
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from cnnbench.common import atomic_write_json, read_json
from cnnbench.common.errors import InputError, MissingFileError
from cnnbench.data.folder import FolderIndex, Sample

SPLIT_FORMAT = "cnnbench-split"
SPLIT_VERSION = 1
_KEYS = ("format", "version", "root", "classes", "seed", "test_fraction", "train", "test")


@dataclass
class Split:
    root: str
    classes: list[str]
    train: list[Sample]
    test: list[Sample]
    seed: int
    test_fraction: float


def spread_evenly(items: list, count: int | None) -> list:
    """At most ``count`` items picked evenly over the list (None: all). A split's lists are sorted by
    class, so a subset picked this way still covers every class."""
    if count is not None and count < 1:
        raise InputError(f"count must be at least 1, got {count}")
    if count is None or len(items) <= count:
        return list(items)
    picks = np.unique(np.linspace(0, len(items) - 1, count).round().astype(int))
    return [items[i] for i in picks]


def make_split(index: FolderIndex, test_fraction: float = 0.2, seed: int = 0) -> Split:
    """Hold out `test_fraction` of every class (at least one image of each class with two or more).

    Each class is shuffled by its own generator seeded from (seed, class name), so adding or
    removing a class leaves the other classes' splits unchanged.
    """
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    by_label: dict[int, list[Sample]] = defaultdict(list)
    for sample in index.samples:
        by_label[sample.label].append(sample)

    test_paths: set[str] = set()
    for label, samples in by_label.items():
        ordered = sorted(samples, key=lambda s: s.path)
        random.Random(f"{seed}/{index.classes[label]}").shuffle(ordered)
        test_paths.update(s.path for s in ordered[:_test_count(len(ordered), test_fraction)])

    train = [s for s in index.samples if s.path not in test_paths]
    test = [s for s in index.samples if s.path in test_paths]
    return Split(index.root, list(index.classes), train, test, seed, test_fraction)


def _test_count(n: int, test_fraction: float) -> int:
    if n < 2:
        return 0  # a lone image is more useful for training than as a one-image test class
    return min(max(1, round(n * test_fraction)), n - 1)


def save_split(split: Split, path) -> None:
    """Write the split as JSON with paths relative to its root (atomic)."""
    atomic_write_json(path, {
        "format": SPLIT_FORMAT,
        "version": SPLIT_VERSION,
        "root": split.root,
        "classes": split.classes,
        "seed": split.seed,
        "test_fraction": split.test_fraction,
        "train": [_entry(split.root, s) for s in split.train],
        "test": [_entry(split.root, s) for s in split.test],
    })


def _entry(root: str, sample: Sample) -> list:
    return [os.path.relpath(sample.path, root).replace(os.sep, "/"), sample.label]


def load_split(path, root=None) -> Split:
    """Read a split file; `root` (optional) replaces the saved data root, e.g. after moving the data.

    Files are not checked for existence here: the dataset reports missing images when it loads them.
    """
    path = os.fspath(path)
    try:
        raw = read_json(path)
    except FileNotFoundError:
        raise MissingFileError(f"split file not found: {path}") from None
    except ValueError as e:
        raise InputError(f"{path}: not a valid JSON split file ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != SPLIT_FORMAT:
        raise InputError(f"{path}: not a split file (missing format '{SPLIT_FORMAT}')")
    missing = [k for k in _KEYS if k not in raw]
    if missing:
        raise InputError(f"{path}: split file is missing key(s): {', '.join(missing)}")
    if raw["version"] != SPLIT_VERSION:
        raise InputError(f"{path}: split format version {raw['version']} is not supported (expected {SPLIT_VERSION})")
    data_root = os.path.abspath(os.fspath(root)) if root is not None else raw["root"]
    classes = list(raw["classes"])
    return Split(
        root=data_root,
        classes=classes,
        train=_samples(path, data_root, raw["train"], len(classes)),
        test=_samples(path, data_root, raw["test"], len(classes)),
        seed=int(raw["seed"]),
        test_fraction=float(raw["test_fraction"]),
    )


def _samples(path: str, root: str, entries: list, num_classes: int) -> list[Sample]:
    samples = []
    for entry in entries:
        try:
            relative, label = entry
        except (TypeError, ValueError):
            raise InputError(f"{path}: bad split entry {entry!r} (expected [relative path, label])") from None
        if not isinstance(label, int) or not 0 <= label < num_classes:
            raise InputError(f"{path}: label {label!r} of {relative} is not a class index (0..{num_classes - 1})")
        samples.append(Sample(os.path.join(root, *relative.split("/")), label))
    return samples
