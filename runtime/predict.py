"""`runtime.predict_files`: top-k classes for image files and folders, every file accounted for."""
from __future__ import annotations

import csv as csv_format
import io
import os

import torch

from common import atomic_write, topk_indices
from common.errors import InputError
from common.runs import newest_runs
from data.folder import is_image_name
from runtime.loader import load
from runtime.pipeline import run_files

def predict_files(model_path, paths, *, backend: str = "auto", device: str = "auto", precision: str = "fp32",
                  batch: int = 64, crops: int = 10, topk: int = 5, csv=None, workers: int | None = None,
                  progress: bool = True) -> dict:
    """Predict files and folders (searched recursively for image files).

    Each result is {"path", "top": [{"class", "prob"}]} (softmax of the crop-averaged logits, best
    first) or {"path", "error"}. "ok" is False when any file failed. model_path None: the newest
    best.pt of the newest trained runs (common.runs). `csv`: also write the results there (atomically).
    """
    if topk < 1:
        raise InputError(f"topk must be at least 1, got {topk}")
    model_path = newest_checkpoint() if model_path is None else os.fspath(model_path)
    files, unlistable = expand_paths(paths)
    predictor = load(model_path, backend=backend, device=device, precision=precision)
    run = run_files(predictor, files, crops=crops, batch=batch, workers=workers, progress=progress)

    probs = torch.softmax(run.logits.double(), dim=1).numpy()
    best = topk_indices(run.logits.numpy(), topk)
    results: list[dict] = [{"path": path} for path in files]
    for row, position in enumerate(run.positions):
        results[position]["top"] = [{"class": predictor.classes[c], "prob": float(probs[row, c])} for c in best[row]]
    for position, reason in run.failures:
        results[position]["error"] = reason
    results += [{"path": folder, "error": reason} for folder, reason in unlistable]
    failed = len(run.failures) + len(unlistable)

    summary = {
        "model": model_path,
        "predictor": predictor.name,
        "backend": predictor.backend,
        "device": predictor.device,
        "crops": crops,
        "topk": min(topk, len(predictor.classes)),
        "images": len(results),
        "succeeded": len(run.positions),
        "failed": failed,
        "ok": failed == 0,
        "seconds": run.seconds,
        "results": results,
    }
    if csv is not None:
        summary["csv"] = os.fspath(csv)
        atomic_write(csv, results_csv(results, summary["topk"]))
    return summary


def expand_paths(paths) -> tuple[list[str], list[tuple[str, str]]]:
    """(files, unlistable folders with the reason).

    Files are kept as given (each gets a result, even a missing one); folders contribute the image
    files under them, sorted.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[str] = []
    unlistable: list[tuple[str, str]] = []

    def record(error: OSError) -> None:
        unlistable.append((error.filename, f"cannot list folder ({error.strerror})"))

    for path in map(os.fspath, paths):
        if not os.path.isdir(path):
            files.append(path)
            continue
        for folder, dirs, names in os.walk(path, onerror=record):
            dirs.sort()
            files.extend(os.path.join(folder, n) for n in sorted(names) if is_image_name(n))
    if not files and not unlistable:
        raise InputError(f"no image files found in {', '.join(map(os.fspath, paths)) or 'the given paths'}")
    return files, unlistable


def newest_checkpoint() -> str:
    """The newest best.pt of the newest trained runs (runs/train or e.g. runs/demo/train)."""
    return newest_runs("train").newest


def results_csv(results: list[dict], topk: int) -> str:
    """One row per file: path, status, class_1, prob_1, ... class_k, prob_k, error."""
    out = io.StringIO()
    writer = csv_format.writer(out, lineterminator="\n")
    writer.writerow(["path", "status"] + [f"{name}_{i}" for i in range(1, topk + 1) for name in ("class", "prob")]
                    + ["error"])
    for result in results:
        if "error" in result:
            writer.writerow([result["path"], "error"] + [""] * (2 * topk) + [result["error"]])
        else:
            cells = [v for t in result["top"] for v in (t["class"], f"{t['prob']:.6f}")]
            writer.writerow([result["path"], "ok"] + cells + [""] * (2 * topk - len(cells)) + [""])
    return out.getvalue()
