"""The two things a row can time: the model alone (compute) and files to top-k (end-to-end)."""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from cnnbench.bench.harness import Budget, Measurement, measure_batch, synchronizer
from cnnbench.data.crops import TEN, crop_mode
from cnnbench.data.images import ImageError, load_rgb
from cnnbench.data.transforms import resize_uint8
from cnnbench.runtime import Predictor, run_files

MAX_PIPELINE_BATCHES = 5000  # cap on the file list fed to the pipeline in --seconds mode


def cycled(images: Tensor, count: int) -> Tensor:
    """The first ``count`` images, repeating the set when it has fewer (a timing batch is always full)."""
    repeats = math.ceil(count / images.shape[0])
    return images.repeat(repeats, 1, 1, 1)[:count] if repeats > 1 else images[:count]


def compute_step_factory(predictor: Predictor, images: Tensor, crops=TEN.name) -> Callable[[int], Callable[[], object]]:
    """batch -> one model call on inputs already on the predictor's device.

    A graph with its crop mode inside, and dense ten crops (which read the whole image), take the
    resized uint8 images; any other predictor takes the normalised crops of the mode, cut here once,
    so only the model is timed.
    """
    spec = predictor.spec
    mode = crop_mode(crops)

    def make_step(batch: int) -> Callable[[], object]:
        x = cycled(images, batch).to(predictor.device)
        if predictor.ten_crop_in_graph or not mode.cuts_crops:
            return lambda: predictor.device_logits_from_images(x, mode.name)
        cut = mode.cut(x, spec).flatten(0, 1)
        return lambda: predictor.logits_from_crops(cut)

    return make_step


def measure_compute(predictor: Predictor, images: Tensor, batch: int, crops=TEN.name, **timing) -> Measurement:
    return measure_batch(compute_step_factory(predictor, images, crops), batch, device=predictor.device, **timing)


def eval_logits(predictor: Predictor, images: Tensor, batch: int, crops=TEN.name) -> np.ndarray:
    """Crop-averaged logits of every image in crop mode ``crops``, ``batch`` images per call (untimed)."""
    return torch.cat([predictor.logits_from_images(chunk, crops) for chunk in torch.split(images, batch)]).numpy()


class _EnoughBatches(Exception):
    """Raised inside the pipeline once the timing budget is met, to stop it early."""


class _PipelineTimer:
    """Stands in for the predictor inside runtime.run_files and times each batch handed to the model.

    An iteration is the interval between two batches' logits being ready (synchronised), so input
    work that overlaps the model costs nothing and input work that does not shows up; the part of
    each interval spent inside the model call is recorded to split the two.
    """

    def __init__(self, predictor: Predictor, budget: Budget, warmup: int, clock: Callable[[], float]):
        self._predictor = predictor
        self._sync = synchronizer(predictor.device)
        self._budget = budget
        self._warmup = warmup
        self._clock = clock
        self._last = clock()
        self.intervals: list[float] = []
        self.model_s: list[float] = []

    def __getattr__(self, name):
        return getattr(self._predictor, name)

    def device_logits_from_images(self, images: Tensor, crops: int = 10) -> Tensor:
        began = self._clock()
        logits = self._predictor.device_logits_from_images(images, crops)
        self._sync()
        ended = self._clock()
        self.intervals.append(ended - self._last)
        self.model_s.append(ended - began)
        self._last = ended
        if self._budget.done(self.intervals[self._warmup:]):
            raise _EnoughBatches
        return logits


def measure_end_to_end(predictor: Predictor, paths: list[str], batch: int, *, crops=TEN.name, iters: Optional[int],
                       seconds: Optional[float], warmup: int, batch_estimate_s: float,
                       workers: Optional[int] = None, clock: Callable[[], float] = time.perf_counter) -> Measurement:
    """Time runtime.run_files (decode, resize, crops, transfer, model) over ``paths``, cycled.

    ``batch_estimate_s`` sizes the file list in --seconds mode (generously: the run stops as soon as
    the budget is met). ``extra`` of the result holds the per-batch model and input-wait times.
    """
    budget = Budget(iters, seconds)
    if iters is not None:
        batches = warmup + iters
    else:
        batches = warmup + max(budget.min_iters, math.ceil(4 * budget.seconds / max(batch_estimate_s, 1e-4)))
        batches = min(batches, MAX_PIPELINE_BATCHES)
    files = [paths[i % len(paths)] for i in range(batches * batch)]
    timer = _PipelineTimer(predictor, budget, warmup, clock)
    try:
        run_files(timer, files, crops=crops, batch=batch, workers=workers, progress=False)
    except _EnoughBatches:
        pass
    times = timer.intervals[warmup:]
    if not times:
        raise RuntimeError(f"the pipeline produced {len(timer.intervals)} batch(es), none after {warmup} warm-up")
    model = timer.model_s[warmup:]
    waits = [t - m for t, m in zip(times, model)]
    return Measurement(times, warmup, extra={"stage_model_ms": 1e3 * float(np.mean(model)),
                                             "stage_input_wait_ms": 1e3 * float(np.mean(waits))})


def host_preprocess_cost(paths: list[str], spec, batch: int,
                         clock: Callable[[], float] = time.perf_counter) -> dict:
    """CPU time of decoding and resizing one batch of files in this process (the pipeline's input work)."""
    decode = resize = 0.0
    for path in (paths[i % len(paths)] for i in range(batch)):
        began = clock()
        try:
            img = load_rgb(path)
        except ImageError:
            continue
        decoded = clock()
        resize_uint8(img, spec)
        resize += clock() - decoded
        decode += decoded - began
    return {"stage_decode_ms": 1e3 * decode, "stage_resize_ms": 1e3 * resize}
