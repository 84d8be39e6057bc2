"""Classification metrics shared by training, evaluation, export parity and the benchmark."""
from __future__ import annotations

import numpy as np


def topk_indices(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest logits per row, best first. [N,K] -> [N,min(k,K)]."""
    k = min(k, logits.shape[1])
    part = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(logits, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def accuracy_report(logits: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> dict:
    """Top-1, top-5 and mean per-class accuracy (the Caltech-256 literature's metric), in percent."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    n = len(labels)
    if n == 0:
        return {"images": 0, "top1": float("nan"), "top5": float("nan"), "mean_per_class": float("nan")}
    top = topk_indices(logits, 5)
    hit1 = top[:, 0] == labels
    hit5 = (top == labels[:, None]).any(axis=1)
    classes = np.unique(labels) if num_classes is None else [c for c in range(num_classes) if (labels == c).any()]
    per_class = [hit1[labels == c].mean() for c in classes]
    return {
        "images": int(n),
        "top1": float(100 * hit1.mean()),
        "top5": float(100 * hit5.mean()),
        "mean_per_class": float(100 * np.mean(per_class)),
    }
