"""The Ray Data pipeline: image files -> crop-averaged logits, batch by batch, in input order.

    paths --from_items--> decode tasks (CPU) --map_batches--> model actors (one per GPU, or CPU actors)
          --iter_batches--> the driver (writes results as they come)

Decode tasks do exactly what local predict's host preprocessing does (data.images.load_rgb, then
data.transforms.resize_uint8, through runtime.pipeline's own dataset), so a bad file becomes a row
with the same error text. Model actors load the model once with runtime.load (any backend,
precision and crop mode the local path has) and return logits; the driver turns them into top-k
results with the same code as local predict.

Failures: a dead actor is restarted and its unfinished batches retried (MAX_RESTARTS,
MAX_TASK_RETRIES); a dead decode task is retried (MAX_TASK_RETRIES). Bounded, so a model that kills
its process every time (out of memory) ends the run with Ray's error instead of looping forever.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from cnnbench.common.device import DeviceError, user_threads
from cnnbench.common.errors import InputError, UserError
from cnnbench.data.spec import PreprocessSpec
from cnnbench.runtime.loader import load
from cnnbench.runtime.pipeline import BatchResult, FileDataset

MAX_RESTARTS = 3
MAX_TASK_RETRIES = 3
# Predictor attribute -> its key in a run's summary.
PREDICTOR_FIELDS = {"name": "predictor", "backend": "backend", "device": "device", "precision": "precision"}


@dataclass(frozen=True)
class ActorPlan:
    """How many model actors, on what, with which Ray resources each."""

    actors: int
    device: str  # what each actor passes to runtime.load: "cuda" (its one GPU) or "cpu"
    threads: int | None  # CPU actors: intra-op threads each; None on a GPU
    resources: dict  # Ray resources reserved per actor

    def to_dict(self) -> dict:
        return {"actors": self.actors, "device": self.device, "threads": self.threads, "per_actor": self.resources}


def plan_actors(device: str, actors: int | None, threads: int | None) -> ActorPlan:
    """One actor per GPU of the cluster (device auto or cuda); else CPU actors (default one), each using
    its node's cores shared among the actors there.

    A CPU actor reserves one of Ray's logical CPUs whatever threads it runs, so that the decode tasks,
    which need the others, can always be scheduled (its threads overlap them, as local predict's model
    threads overlap its decoding workers).
    """
    import ray

    if actors is not None and actors < 1:
        raise InputError(f"actors must be at least 1, got {actors}")
    if threads is not None and threads < 1:
        raise InputError(f"threads must be at least 1, got {threads}")
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 0))
    if device.startswith("cuda") and gpus == 0:
        raise DeviceError(f"device {device!r} asked for, but the Ray cluster has no GPU")
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise InputError(f"unknown device {device!r}; expected auto, cpu or cuda")
    if device != "cpu" and gpus > 0:
        return ActorPlan(actors or gpus, "cuda", None, {"num_gpus": 1, "num_cpus": 1})
    actors = actors or 1
    if actors >= cpus:
        raise InputError(f"{actors} CPU model actor(s) on a Ray cluster of {cpus} CPUs leave none to decode images: "
                         f"ask for at most {max(cpus - 1, 1)} (--actors)")
    # Nodes without CPUs (a head started with --num-cpus 0) take no actor.
    node_cpus = [c for c in (int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")) if c > 0]
    per_node = -(-actors // len(node_cpus))  # actors on the busiest node, spread evenly
    threads = threads or user_threads() or max(1, min(node_cpus) // per_node)
    return ActorPlan(actors, "cpu", threads, {"num_cpus": 1})


def decode_batch(batch: dict, spec: PreprocessSpec) -> dict:
    """{"position", "path"} -> {"position", "ok", "error", "pixels" uint8 [B,3,R,R]} (zeros where not ok)."""
    dataset = FileDataset([str(p) for p in batch["path"]], spec, resize=True, raw_jpegs=False)
    items = [dataset[i] for i in range(len(dataset))]
    pixels = np.zeros((len(items), 3, spec.resize, spec.resize), dtype=np.uint8)
    for i, item in enumerate(items):
        if item.error is None:
            pixels[i] = item.pixels.numpy()
    return {"position": batch["position"], "ok": np.array([item.error is None for item in items], dtype=bool),
            "error": np.array([item.error or "" for item in items], dtype=object), "pixels": pixels}


class ModelError(UserError):
    """A model actor cannot run the model as asked (the message is the local path's: a backend that does not
    fit the model, a precision or crop mode it lacks)."""


class ModelActor:
    """One model on one device (a GPU, or a CPU's share of threads): decoded batches -> logits.

    A UserError is answered in the batch's "problem" column instead of raised: Ray would report a failed
    actor as its own traceback, and restart it to fail again; the driver raises it as one line (ModelError).
    """

    def __init__(self, model_path: str, backend: str, device: str, precision: str, crops, threads: int | None):
        self.crops = crops
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.problem = ""
        self.described = ""
        try:
            self.predictor = load(model_path, backend=backend, device=device, precision=precision, threads=threads)
            self.described = json.dumps({key: getattr(self.predictor, key) for key in PREDICTOR_FIELDS})
        except UserError as e:
            self.problem = str(e)

    def __call__(self, batch: dict) -> dict:
        ok = np.asarray(batch["ok"], dtype=bool)
        count = len(ok)
        logits = None
        if not self.problem:
            try:
                logits = self._logits(batch, ok)
            except UserError as e:
                self.problem = str(e)
        return {"position": batch["position"], "ok": ok, "error": batch["error"],
                "logits": logits if logits is not None else np.zeros((count, 0), dtype=np.float32),
                "worker": np.array([self.worker] * count, dtype=object),
                "predictor": np.array([self.described] * count, dtype=object),
                "problem": np.array([self.problem] * count, dtype=object)}

    def _logits(self, batch: dict, ok: np.ndarray) -> np.ndarray:
        logits = np.zeros((len(ok), len(self.predictor.classes)), dtype=np.float32)
        if ok.any():
            images = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
            logits[ok] = self.predictor.logits_from_images(images, self.crops).numpy()
        return logits


@dataclass
class RayBatch:
    """One batch back at the driver: its results, the images each actor (host:pid) computed, and the
    predictors that computed them (ModelActor.described)."""

    result: BatchResult
    workers: Counter
    predictors: set[str]


def describe_predictors(described: set[str]) -> dict:
    """{"predictor", "backend", "device", "precision"} of the actors, as a local run's summary has them
    (values joined with ", " where actors differ, e.g. GPU and CPU nodes)."""
    seen = [json.loads(d) for d in sorted(described)]
    return {key: ", ".join(sorted({d[attribute] for d in seen})) or None for attribute, key in PREDICTOR_FIELDS.items()}


def logits_on_ray(model_path: str, paths: list[str], spec: PreprocessSpec, plan: ActorPlan, *, backend: str,
                  precision: str, crops, batch: int) -> Iterator[RayBatch]:
    """Crop-averaged logits of ``paths``, one RayBatch per model batch, in path order (Ray Data
    preserve_order). Positions index ``paths``. Ray must be connected (session.ray_session); on a cluster
    every node must see the model and the images at the same absolute paths."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    if batch < 1:
        raise InputError(f"batch must be at least 1, got {batch}")
    if not paths:
        return
    context = DataContext.get_current()
    with _data_context(context, preserve_order=True, progress_bars=False):
        with warnings.catch_warnings():
            # Ray Data 2.60 takes retry settings only as "ray_remote_args", deprecated for a replacement
            # due in 2.64 (pyproject pins 2.60.*). Distinct remote args also keep Ray Data from fusing the
            # decode tasks into the actors, which would then decode and compute in turn in one process.
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
            # Absolute paths: a worker elsewhere does not run in this process's folder (rows keep them as given).
            items = [{"position": i, "path": os.path.abspath(p)} for i, p in enumerate(paths)]
            dataset = ray.data.from_items(items, override_num_blocks=-(-len(items) // batch))
            decoded = dataset.map_batches(decode_batch, fn_kwargs={"spec": spec}, batch_size=batch,
                                          batch_format="numpy", num_cpus=1, max_retries=MAX_TASK_RETRIES)
            scored = decoded.map_batches(
                ModelActor, fn_constructor_kwargs={"model_path": os.path.abspath(model_path), "backend": backend,
                                                   "device": plan.device,
                                                   "precision": precision, "crops": crops, "threads": plan.threads},
                compute=ActorPoolStrategy(size=plan.actors), batch_size=batch, batch_format="numpy",
                max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES, **plan.resources)
        for part in scored.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
            problem = next((str(p) for p in part["problem"] if p), None)
            if problem is not None:
                raise ModelError(problem)
            yield _batch_result(part)


def _batch_result(part: dict) -> RayBatch:
    ok = np.asarray(part["ok"], dtype=bool)
    positions = np.asarray(part["position"], dtype=np.int64)
    failures = [(int(p), str(e)) for p, e in zip(positions[~ok], part["error"][~ok])]
    result = BatchResult(torch.from_numpy(np.ascontiguousarray(part["logits"][ok], dtype=np.float32)),
                         positions[ok].tolist(), failures)
    return RayBatch(result, Counter(str(w) for w in part["worker"]), {str(p) for p in part["predictor"]})


@contextlib.contextmanager
def _data_context(context, preserve_order: bool, progress_bars: bool):
    """Ray Data's process-wide settings for one run, restored afterwards."""
    saved = (context.execution_options.preserve_order, context.enable_progress_bars)
    context.execution_options.preserve_order = preserve_order
    context.enable_progress_bars = progress_bars
    try:
        yield
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved
