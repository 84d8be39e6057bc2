"""Reading a class-per-folder image tree: Caltech-256's layout or any ImageFolder-style root.

Scanning looks at names only (the real set has 30k images); undecodable files are found when
they are loaded (the dataset skips them) or by `data check --verify`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from cnnbench.common.errors import InputError, MissingFileError

CALTECH_SUBDIR = "256_ObjectCategories"
CLUTTER_CLASS = "257.clutter"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MASK_SUFFIX = ".mask.png"  # object masks of the synthetic set: not samples, not strays
_CALTECH_CLASS = re.compile(r"^\d{3}\.")


@dataclass(frozen=True)
class Sample:
    path: str  # absolute
    label: int


@dataclass
class FolderIndex:
    root: str
    classes: list[str]
    samples: list[Sample]
    skipped: list[tuple[str, str]]  # (absolute path, reason)
    layout: str = "imagefolder"  # "caltech256" | "imagefolder"

    def counts(self) -> dict[str, int]:
        """Number of samples per class name, in label order."""
        per_label = [0] * len(self.classes)
        for sample in self.samples:
            per_label[sample.label] += 1
        return dict(zip(self.classes, per_label))


def is_image_name(name: str) -> bool:
    lower = name.lower()
    return lower.endswith(IMAGE_EXTENSIONS) and not lower.endswith(MASK_SUFFIX)


def scan_folder(root) -> FolderIndex:
    """Index a data folder: classes in sorted folder-name order, strays skipped with a reason.

    Caltech-256 layout (used when `root/256_ObjectCategories` exists or sub-folders are named
    NNN.name): only NNN.name folders are classes and 257.clutter is dropped. Otherwise every
    sub-folder is a class. Class folders without any image are dropped and reported.
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.exists(root):
        raise MissingFileError(f"data folder not found: {root}")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"data path is not a folder: {root}")
    if os.path.isdir(os.path.join(root, CALTECH_SUBDIR)):
        root = os.path.join(root, CALTECH_SUBDIR)

    entries = sorted(os.scandir(root), key=lambda e: e.name)
    dirs = [e for e in entries if e.is_dir()]
    caltech = any(_CALTECH_CLASS.match(e.name) for e in dirs)
    skipped: list[tuple[str, str]] = []
    class_dirs = []
    for entry in entries:
        if not entry.is_dir():
            skipped.append((entry.path, "stray file at the top level (not inside a class folder)"))
        elif caltech and entry.name == CLUTTER_CLASS:
            skipped.append((entry.path, "clutter class dropped"))
        elif caltech and not _CALTECH_CLASS.match(entry.name):
            skipped.append((entry.path, "not a class folder (Caltech-256 class folders are named NNN.name)"))
        elif entry.name.startswith("."):
            skipped.append((entry.path, "hidden folder ignored"))
        else:
            class_dirs.append(entry)

    classes: list[str] = []
    samples: list[Sample] = []
    for class_dir in class_dirs:
        images = _scan_class_dir(class_dir.path, skipped)
        if not images:
            skipped.append((class_dir.path, "class folder has no images: class dropped"))
            continue
        label = len(classes)
        classes.append(class_dir.name)
        samples.extend(Sample(path, label) for path in images)

    if not classes:
        raise InputError(
            f"{root}: no class folders with images found (expected Caltech-256 NNN.name folders "
            "or one sub-folder of images per class)"
        )
    return FolderIndex(root, classes, samples, skipped, "caltech256" if caltech else "imagefolder")


def _scan_class_dir(path: str, skipped: list[tuple[str, str]]) -> list[str]:
    images = []
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.is_dir():
            inside = sum(len(files) for _, _, files in os.walk(entry.path))
            skipped.append((entry.path, f"nested folder inside a class folder ignored ({inside} files inside)"))
        elif not entry.is_file():
            skipped.append((entry.path, "broken link or special file"))
        elif entry.name.lower().endswith(MASK_SUFFIX):
            continue
        elif is_image_name(entry.name):
            images.append(entry.path)
        else:
            extension = os.path.splitext(entry.name)[1] or "none"
            skipped.append((entry.path, f"not an image file (extension: {extension})"))
    return images
