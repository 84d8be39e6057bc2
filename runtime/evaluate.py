"""`runtime.evaluate`: accuracy of any checkpoint or export, through any backend, on the test split."""
from __future__ import annotations

import os

import numpy as np

from common import accuracy_report
from data.folder import scan_folder
from data.split import Split, load_split, make_split
from models.checkpoint import CheckpointError, read_checkpoint_meta
from runtime.loader import load
from runtime.pipeline import run_files


def evaluate(model_path, *, data=None, backend: str = "auto", device: str = "auto", precision: str = "fp32",
             crops: int = 10, batch: int = 64, workers: int | None = None, progress: bool = True,
             preprocess: str = "auto") -> dict:
    """Top-1/top-5/mean-per-class accuracy on the test part of the model's saved split.

    `data` evaluates on another folder instead: its seed-0 stratified split is made on the fly.
    Unreadable test images are listed under "failures" and left out of the accuracy.
    """
    predictor = load(model_path, backend=backend, device=device, precision=precision)
    split, split_source = held_out_split(predictor, data)
    if split.classes != predictor.classes:
        raise ValueError(f"the model's {len(predictor.classes)} classes differ from the split's "
                         f"{len(split.classes)} classes ({split_source}); evaluate on the data it was trained on")
    if not split.test:
        raise ValueError(f"the test split is empty ({split_source})")
    paths = [s.path for s in split.test]
    run = run_files(predictor, paths, crops=crops, batch=batch, workers=workers, progress=progress,
                    preprocess=preprocess)
    labels = np.array([split.test[p].label for p in run.positions], dtype=np.int64)
    report = accuracy_report(run.logits.numpy(), labels, num_classes=len(predictor.classes))
    return {
        "model": os.fspath(model_path),
        "predictor": predictor.name,
        "backend": predictor.backend,
        "device": predictor.device,
        "precision": predictor.precision,
        "crops": crops,
        "preprocess": run.preprocess,
        "split": split_source,
        "data": split.root,
        "test_images": len(paths),
        **report,
        "failed": len(run.failures),
        "failures": [{"path": paths[p], "error": reason} for p, reason in run.failures],
        "seconds": run.seconds,
        "images_per_s": len(paths) / run.seconds if run.seconds > 0 else None,
    }


def held_out_split(predictor, data) -> tuple[Split, str]:
    """The split to evaluate on and a description of where it came from."""
    if data is not None:
        root = os.fspath(data)
        return make_split(scan_folder(root), seed=0), f"seed-0 split of {root}"
    split_path = predictor.record.get("split") or _export_split_path(predictor.manifest)
    if not split_path:
        raise ValueError(f"{predictor.source}: no split recorded with this model; pass data=<folder> (--data)")
    if not os.path.isfile(split_path):
        raise FileNotFoundError(f"split file {split_path} recorded with {predictor.source} is missing; "
                                "pass data=<folder> (--data) to evaluate on a fresh split")
    return load_split(split_path), split_path


def _export_split_path(manifest: dict | None) -> str | None:
    """An export's split: the one its (first) source checkpoint was trained with, as that checkpoint's
    record names it, else the test split its parity check read."""
    if manifest is None:
        return None
    sources = manifest.get("sources") or [{}]
    checkpoint = sources[0].get("path")
    if checkpoint and os.path.isfile(checkpoint):
        try:
            split_path = read_checkpoint_meta(checkpoint)["record"].get("split")
        except CheckpointError:
            split_path = None
        if split_path:
            return split_path
    parity_images = manifest.get("parity", {}).get("images", {})
    return parity_images.get("path") if parity_images.get("source") == "test split" else None
