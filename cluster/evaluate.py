"""`cluster.evaluate_on_ray`: runtime.evaluate's accuracy report, the logits computed on a Ray cluster."""
from __future__ import annotations

import os
import time
from collections import Counter

import numpy as np
import torch
from tqdm import tqdm

from cnnbench.cluster.pipeline import describe_predictors, logits_on_ray, plan_actors
from cnnbench.cluster.predict import model_info
from cnnbench.cluster.session import DEFAULT_RAY_DIR, LOCAL, ray_session
from cnnbench.common import accuracy_report
from cnnbench.runtime.evaluate import held_out_split


def evaluate_on_ray(model_path, *, data=None, address: str = LOCAL, ray_dir=DEFAULT_RAY_DIR, backend: str = "auto",
                    device: str = "auto", precision: str = "fp32", crops: int | str = 10, batch: int = 64,
                    actors: int | None = None, threads: int | None = None, progress: bool = True) -> dict:
    """Top-1/top-5/mean-per-class accuracy on the same held-out images as runtime.evaluate (its
    held_out_split), the same report keys plus "ray". Images are decoded and resized on CPU tasks:
    the numbers are local eval's with host preprocessing (its CPU default)."""
    model_path = os.fspath(model_path)
    model = model_info(model_path)
    split, split_source = held_out_split(model, data)
    paths = [s.path for s in split.test]
    logits, positions, failures = [], [], []
    workers: Counter = Counter()
    predictors: set[str] = set()
    start = time.perf_counter()
    with ray_session(address, ray_dir) as cluster:
        plan = plan_actors(device, actors, threads)
        with tqdm(total=len(paths), unit="img", disable=not progress, leave=False) as bar:
            for part in logits_on_ray(model_path, paths, model.spec, plan, backend=backend, precision=precision,
                                      crops=crops, batch=batch):
                logits.append(part.result.logits)
                positions.extend(part.result.positions)
                failures.extend(part.result.failures)
                workers.update(part.workers)
                predictors.update(part.predictors)
                bar.update(len(part.result.positions) + len(part.result.failures))
    seconds = time.perf_counter() - start
    all_logits = torch.cat(logits).numpy() if logits else np.empty((0, len(model.classes)), dtype=np.float32)
    labels = np.array([split.test[p].label for p in positions], dtype=np.int64)
    report = accuracy_report(all_logits, labels, num_classes=len(model.classes))
    return {
        "model": model_path,
        **describe_predictors(predictors),
        "crops": crops,
        "preprocess": "host",
        "split": split_source,
        "data": split.root,
        "test_images": len(paths),
        **report,
        "failed": len(failures),
        "failures": [{"path": paths[p], "error": reason} for p, reason in sorted(failures)],
        "seconds": seconds,
        "images_per_s": len(paths) / seconds if seconds > 0 else None,
        "ray": {**cluster, **plan.to_dict(), "images_per_actor": dict(workers)},
    }
