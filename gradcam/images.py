"""What every gradcam command shares: the held-out images, reading them in groups, panel names.

Each command returns a JSON-serialisable dict with ``ok``; a problem with the inputs as a whole
(no model, unknown class) gives ``ok: False`` and ``error`` (INPUT_ERRORS); a bad image gets its own
named error and the other images go on.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from cnnbench.common import topk_indices
from cnnbench.common.errors import InputError, UserError
from cnnbench.data.folder import Sample
from cnnbench.data.heldout import held_out
from cnnbench.data.images import ImageError, load_rgb
from cnnbench.data.spec import PreprocessSpec
from cnnbench.data.transforms import resize_uint8
from cnnbench.models.checkpoint import recorded_split_files

DEFAULT_OUT = os.path.join("runs", "gradcam")
IMAGES_PER_PASS = 8  # images explained together (times the number of crops)
TOP_K = 5
INPUT_ERRORS = (UserError,)


@dataclass
class LoadedImage:
    path: str
    width: int
    height: int
    resized: Tensor  # uint8 [3, R, R]
    label: int | None = None


def log(progress: bool, message: str) -> None:
    if progress:
        print(f"[gradcam] {message}", file=sys.stderr, flush=True)


def load_image(sample: Sample | str, spec: PreprocessSpec) -> LoadedImage:
    """Decode and resize one file; raises ImageError."""
    path, label = (sample.path, sample.label) if isinstance(sample, Sample) else (os.fspath(sample), None)
    img = load_rgb(path)
    return LoadedImage(path, img.width, img.height, resize_uint8(img, spec), label)


def image_groups(samples: list, spec: PreprocessSpec, failures: list[dict], progress: bool, desc: str):
    """Groups of up to IMAGES_PER_PASS readable images with their stacked uint8 tensor, loaded as
    they are needed; unreadable files are appended to ``failures`` as {"path", "error"}."""
    bar = tqdm(total=len(samples), desc=desc, unit="img", disable=not progress, file=sys.stderr)
    for start in range(0, len(samples), IMAGES_PER_PASS):
        group = []
        for sample in samples[start:start + IMAGES_PER_PASS]:
            try:
                group.append(load_image(sample, spec))
            except ImageError as exc:
                failures.append({"path": exc.path, "error": exc.reason})
        bar.update(len(samples[start:start + IMAGES_PER_PASS]))
        if group:
            yield group, torch.stack([g.resized for g in group])
    bar.close()


def held_out_samples(data, classes: list[str], record: dict | None = None, manifest: dict | None = None,
                 limit: int | None = None) -> tuple[list[Sample], dict]:
    """At most ``limit`` held-out images (data.heldout) and their origin {"source", "path"}."""
    held = held_out(data, recorded_split_files(record, manifest=manifest), classes=classes)
    return held.samples("test", limit), held.origin()


def top_classes(logits: Tensor, classes: list[str]) -> list[dict]:
    """Top-5 of one image's [K] logits: softmax probabilities, best first."""
    probs = torch.softmax(logits.double(), dim=0).numpy()
    return [{"class": classes[c], "prob": float(probs[c])} for c in topk_indices(logits.numpy()[None], TOP_K)[0]]


def class_index(classes: list[str], class_name: str | None) -> int | None:
    if class_name is None:
        return None
    if class_name in classes:
        return classes.index(class_name)
    shown = ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else "")
    raise InputError(f"unknown class {class_name!r}; the model's classes are: {shown}")


def panel_name(path: str, used: set[str], suffix: str = "") -> str:
    """File name for an image's panel: its stem, made unique when two inputs share one."""
    stem = os.path.splitext(os.path.basename(path))[0] + suffix
    name, n = f"{stem}.png", 1
    while name in used:
        n += 1
        name = f"{stem}-{n}.png"
    used.add(name)
    return name


def check_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise InputError(f"{name} must be at least 1, got {value}")
