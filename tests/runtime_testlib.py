"""Shared by the runtime tests: one tiny checkpoint with a saved split, built once per session.

Training even a tiny network takes minutes on a shared 2-core machine, so the model is made the
cheap way: a width-0.25 ResNet-18 with its batch-norm statistics measured on the training images
and its classifier fitted (L-BFGS) on their pooled features. Its logits have clear margins on real
images, which is what backend agreement needs (random weights give near-ties).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import torchvision.transforms as T
from torch import nn

from cnnbench.data.folder import scan_folder
from cnnbench.data.images import load_rgb
from cnnbench.data.spec import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec, spec_for_crop
from cnnbench.data.split import load_split, make_split, save_split
from cnnbench.data.synth import synthesize
from cnnbench.data.crops import eval_transform
from cnnbench.models import create_model, load_checkpoint, save_checkpoint

CROP = 32
CLASSES = 4


# Dense ten crops need resize - crop to be a multiple of the trunk's stride (32): 96/64 aligns.
DENSE_SPEC = PreprocessSpec(resize=96, crop=64, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def tiny_run(base_dir, spec: PreprocessSpec | None = None) -> dict:
    """{"checkpoint", "data", "split"}: built under base_dir on first use, reused afterwards.

    ``spec``: the checkpoint's preprocessing (default: the standard spec of CROP, whose geometry has
    no dense ten crops); each spec gets its own run folder."""
    spec = spec or spec_for_crop(CROP)
    name = "runtime-tiny" if spec == spec_for_crop(CROP) else f"runtime-tiny-{spec.resize}-{spec.crop}"
    folder = os.path.join(os.fspath(base_dir), name)
    checkpoint = os.path.join(folder, "best.pt")
    data_root = os.path.join(folder, "synth")
    split_path = os.path.join(folder, "split.json")
    if not os.path.isfile(checkpoint):
        synthesize(data_root, classes=CLASSES, per_class=16, size=48, seed=0, progress=False)
        split = make_split(scan_folder(data_root), test_fraction=0.25, seed=0)
        save_split(split, split_path)
        model = _fitted_model(split, spec)
        save_checkpoint(checkpoint, model, arch="resnet18", classes=split.classes, spec=spec,
                        record={"data": data_root, "split": split_path})
    return {"checkpoint": checkpoint, "data": data_root, "split": split_path}


def _fitted_model(split, spec) -> nn.Module:
    torch.manual_seed(0)
    model = create_model("resnet18", len(split.classes), width_mult=0.25)
    transform = eval_transform(spec, crops=10)
    crops = torch.cat([transform(load_rgb(s.path)) for s in split.train])
    labels = torch.tensor([s.label for s in split.train]).repeat_interleave(10)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the one pass below
    with torch.no_grad():
        model.train()(crops)
        pooled = model.eval().forward_features(crops).mean(dim=(2, 3))
    head = model.classifier
    optimiser = torch.optim.LBFGS(head.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def loss():
        optimiser.zero_grad()
        value = nn.functional.cross_entropy(head(pooled), labels) + 1e-4 * head.weight.pow(2).sum()
        value.backward()
        return value

    optimiser.step(loss)
    return model.eval()


def torchvision_ten_crop_logits(checkpoint: str, paths: list[str], crops: int = 10) -> torch.Tensor:
    """The independent reference: torchvision's Resize + TenCrop/CenterCrop on PIL images, fp32 eager model."""
    model, meta = load_checkpoint(checkpoint)
    spec = meta["spec"]
    modes = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}
    resize = T.Resize((spec["resize"], spec["resize"]), interpolation=modes[spec["interpolation"]], antialias=True)
    to_input = T.Compose([T.ToTensor(), T.Normalize(spec["mean"], spec["std"])])
    cut = T.TenCrop(spec["crop"]) if crops == 10 else T.Compose([T.CenterCrop(spec["crop"]), lambda c: [c]])
    rows = []
    with torch.no_grad():
        for path in paths:
            batch = torch.stack([to_input(c) for c in cut(resize(load_rgb(path)))])
            rows.append(model(batch).mean(dim=0))
    return torch.stack(rows)


def held_out_images(run: dict) -> tuple[list[str], list[int]]:
    split = load_split(run["split"])
    return [s.path for s in split.test], [s.label for s in split.test]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained checkpoint with its split (shared by the runtime test modules; one per module)."""
    torch.manual_seed(0)
    return tiny_run(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def reference(run):
    """The held-out images, their labels and torchvision's ten-crop logits for them."""
    paths, labels = held_out_images(run)
    return paths, labels, torchvision_ten_crop_logits(run["checkpoint"], paths)


def tampered_copy(export_dir, graph_name: str, folder) -> tuple[Path, bytes]:
    """A copy of ``export_dir`` in ``folder`` whose graph ``graph_name`` has one byte flipped, and those bytes."""
    copy = Path(folder) / "tampered"
    shutil.copytree(export_dir, copy)
    graph = copy / graph_name
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    return copy, bytes(data)
