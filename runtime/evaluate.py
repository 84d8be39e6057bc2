"""`runtime.evaluate`: accuracy of any checkpoint or export, through any backend, on the test split."""
from __future__ import annotations

import os

import numpy as np

from cnnbench.common import accuracy_report
from cnnbench.data.heldout import FROM_RUN, held_out
from cnnbench.data.split import Split
from cnnbench.models.checkpoint import recorded_split_files
from cnnbench.runtime.loader import load
from cnnbench.runtime.pipeline import run_files


def evaluate(model_path, *, data=None, backend: str = "auto", device: str = "auto", precision: str = "fp32",
             crops: int = 10, batch: int = 64, workers: int | None = None, progress: bool = True,
             preprocess: str = "auto") -> dict:
    """Top-1/top-5/mean-per-class accuracy on the test part of the model's saved split.

    `data` evaluates on another folder instead: the test part of its seed-0 split (data.heldout).
    Unreadable test images are listed under "failures" and left out of the accuracy.
    """
    predictor = load(model_path, backend=backend, device=device, precision=precision)
    split, split_source = held_out_split(predictor, data)
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
    """A loaded model's held-out split (data.heldout.held_out over what its run recorded) and where it came from."""
    held = held_out(data, recorded_split_files(predictor.record, manifest=predictor.manifest), classes=predictor.classes,
                    owner=predictor.source)
    held.samples("test")  # an empty test part is an error here, before any model runs
    return held.split, held.path if held.source == FROM_RUN else f"seed-0 split of {held.path}"
