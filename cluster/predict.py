"""`cluster.predict_on_ray`: local predict's results and output files, computed on a Ray cluster.

The driver lists the files, skips those an existing output file already holds (runtime.predict's
PredictionSink resumes it), and writes each batch's rows as Ray hands them back, in input order.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from tqdm import tqdm

from cnnbench.cluster.pipeline import describe_predictors, logits_on_ray, plan_actors
from cnnbench.cluster.session import DEFAULT_RAY_DIR, LOCAL, ray_session
from cnnbench.common.errors import InputError
from cnnbench.data.spec import PreprocessSpec
from cnnbench.runtime.predict import PredictionSink, batch_results, expand_paths, newest_checkpoint


def predict_on_ray(model_path, paths, *, address: str = LOCAL, ray_dir=DEFAULT_RAY_DIR, backend: str = "auto",
                   device: str = "auto", precision: str = "fp32", batch: int = 64, crops: int | str = 10, topk: int = 5,
                   csv=None, jsonl=None, actors: int | None = None, threads: int | None = None, progress: bool = True,
                   on_result: Callable[[dict], None] | None = None) -> dict:
    """runtime.predict_files on Ray: the same results, rows, resume and summary, plus a "ray" entry
    (the cluster, the actor plan, and the images each actor computed).

    ``address``: session.ray_session's. ``actors``/``threads``: pipeline.plan_actors's (default one
    actor per GPU, else one CPU actor using its node's cores). Images are always decoded and resized on
    CPU tasks (local predict's host preprocessing), also for GPU actors.
    """
    if topk < 1:
        raise InputError(f"topk must be at least 1, got {topk}")
    sink = PredictionSink(csv, jsonl, on_result)
    model_path = newest_checkpoint() if model_path is None else os.fspath(model_path)
    model = model_info(model_path)
    classes = model.classes
    files, unlistable = expand_paths(paths)
    topk = min(topk, len(classes))
    workers: Counter = Counter()
    predictors: set[str] = set()
    start = time.perf_counter()
    first_batch = None
    ray_info = None  # no Ray started when a resumed file already has every row
    with sink.open(topk):
        todo = [path for path in files if not sink.already_written(path)]
        if todo:
            with ray_session(address, ray_dir) as cluster:
                plan = plan_actors(device, actors, threads)
                ray_info = {**cluster, **plan.to_dict()}
                with tqdm(total=len(todo), unit="img", disable=not progress, leave=False) as bar:
                    for part in logits_on_ray(model_path, todo, model.spec, plan, backend=backend,
                                              precision=precision, crops=crops, batch=batch):
                        first_batch = first_batch or time.perf_counter() - start
                        sink.hand_out(batch_results(part.result, todo, classes, topk))
                        workers.update(part.workers)
                        predictors.update(part.predictors)
                        bar.update(len(part.result.positions) + len(part.result.failures))
        sink.hand_out_unlistable(unlistable)
    seconds = time.perf_counter() - start

    return {"model": model_path, **describe_predictors(predictors), "crops": crops, "topk": topk,
            "images": len(files) + len(unlistable), **sink.summary(), "seconds": seconds,
            "images_per_s": len(todo) / seconds if todo and seconds > 0 else None,
            "ray": ray_info and {**ray_info, "first_batch_seconds": first_batch, "images_per_actor": dict(workers)}}


@dataclass(frozen=True)
class ModelInfo:
    """What the driver needs of a model without loading it (the actors load it, on their own devices):
    the decode tasks' resize, the class names, and (for eval) what its run recorded. The attribute names
    are a Predictor's, so runtime.evaluate.held_out_split takes it."""

    source: str
    spec: PreprocessSpec
    classes: list[str]
    record: dict = field(default_factory=dict)
    manifest: dict | None = None


def model_info(model_path: str) -> ModelInfo:
    if os.path.isdir(model_path) or model_path.endswith(".json"):  # an export, as runtime.load tells them apart
        from cnnbench.export.manifest import load_manifest

        manifest = load_manifest(model_path)
        return ModelInfo(model_path, PreprocessSpec.from_dict(manifest["spec"]), list(manifest["classes"]),
                         manifest=manifest)
    from cnnbench.models.checkpoint import read_checkpoint_meta

    meta = read_checkpoint_meta(model_path)
    return ModelInfo(model_path, PreprocessSpec.from_dict(meta["spec"]), list(meta["classes"]), record=meta["record"])
