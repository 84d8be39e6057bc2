"""MLPerf LoadGen's two callbacks objects over the project's Predictor: the query sample library (QSL)
of held-out images and the system under test (SUT) that batches and answers queries.

LoadGen's rules this module keeps:
- preprocessing is not timed: each image is decoded and resized (data.images, data.transforms, the
  reference path) once, the first time LoadGen asks for it in ``LoadSamplesToRam``; queries read the
  resized uint8 tensors from memory;
- ``issue_queries`` runs on a LoadGen thread and only hands the samples to the SUT's worker thread
  (doing the work inline delays LoadGen's next query: Server p99 rose from 0.2 to 6.6 ms in issue 22's try);
- each response points into a logits buffer that stays referenced until ``QuerySamplesComplete``
  has returned (LoadGen copies the bytes it logs inside that call);
- a worker that fails still completes its samples (empty responses), so LoadGen never waits forever,
  and the error is raised once the test has returned.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from cnnbench.common.errors import UserError
from cnnbench.data.images import ImageError, load_rgb
from cnnbench.data.spec import PreprocessSpec
from cnnbench.data.transforms import resize_uint8

PERFORMANCE_SAMPLES = 1024   # MLPerf ResNet-50's performance sample count: at most this many images held in RAM
LOGS_KEPT = ("mlperf_log_summary.txt", "mlperf_log_detail.txt", "mlperf_log_accuracy.json")


class LoadGenMissing(UserError, ImportError):
    """The mlcommons-loadgen package is not installed."""


def loadgen():
    """The mlperf_loadgen module, or a one-line error naming the package to install."""
    try:
        import mlperf_loadgen
    except ImportError as exc:
        raise LoadGenMissing("MLPerf scenarios need MLCommons LoadGen: pip install mlcommons-loadgen "
                             f"(or pip install -e '.[mlperf]'); import failed: {exc}") from exc
    return mlperf_loadgen


class SampleLibrary:
    """The held-out images as LoadGen's QSL: index i is ``paths[i]``.

    ``load``/``unload`` are LoadGen's LoadSamplesToRam/UnloadSamplesFromRam. An image that cannot be
    read is recorded in ``failures`` (index -> reason) and served as black pixels, so the test goes on;
    accuracy leaves it out, as eval does.
    """

    def __init__(self, paths: list[str], spec: PreprocessSpec):
        self.paths = list(paths)
        self.spec = spec
        self.failures: dict[int, str] = {}
        # Decoded + resized once and kept across tests (MLPerf's preprocessed data set) while the whole set fits
        # in one performance set; a larger one is decoded on each load and freed on unload.
        self._resized: dict[int, Tensor] = {}
        self._loaded: dict[int, Tensor] = {}    # what LoadGen has loaded for the current test

    @property
    def total(self) -> int:
        return len(self.paths)

    @property
    def performance_count(self) -> int:
        return min(self.total, PERFORMANCE_SAMPLES)

    def load(self, indices) -> None:
        for index in indices:
            self._loaded[index] = self._resized.get(index)
            if self._loaded[index] is None:
                self._loaded[index] = self._resized[index] = self._read(index)

    def unload(self, indices) -> None:
        for index in indices:
            self._loaded.pop(index, None)
            if self.total > PERFORMANCE_SAMPLES:  # a larger set is never held whole: decode it again next time
                self._resized.pop(index, None)

    def batch(self, indices: list[int]) -> Tensor:
        """uint8 [B,3,R,R] of loaded samples (a sample LoadGen did not load is a KeyError: a harness bug)."""
        return torch.stack([self._loaded[i] for i in indices])

    def _read(self, index: int) -> Tensor:
        try:
            return resize_uint8(load_rgb(self.paths[index]), self.spec)
        except ImageError as exc:
            self.failures[index] = exc.reason
            return torch.zeros(3, self.spec.resize, self.spec.resize, dtype=torch.uint8)


class Inference:
    """Crop-averaged float32 logits of a batch of resized images, at most ``max_batch`` per model call."""

    def __init__(self, predictor, crops: str, max_batch: int):
        self.predictor = predictor
        self.crops = crops
        self.max_batch = max_batch

    def logits(self, images: Tensor) -> np.ndarray:
        parts = [self.predictor.logits_from_images(chunk, self.crops) for chunk in torch.split(images, self.max_batch)]
        return np.ascontiguousarray(torch.cat(parts).numpy(), dtype=np.float32)


class BatchingSUT:
    """LoadGen's SUT: queries go to one worker thread, which runs them in batches of at most
    ``inference.max_batch`` samples. ``max_wait_s`` > 0 (Server): a batch that is not full waits at
    most that long after its oldest sample arrived for more samples; 0: whatever is queued runs now
    (while the model runs, arrivals queue up and form the next batch)."""

    def __init__(self, inference: Inference, library: SampleLibrary, max_wait_s: float = 0.0):
        self.inference = inference
        self.library = library
        self.max_wait_s = max_wait_s
        self.batches = 0
        self.error: Optional[BaseException] = None
        self._queue: queue.Queue = queue.Queue()
        self._flushed = threading.Event()
        self._worker: Optional[threading.Thread] = None

    # --- LoadGen's callbacks (LoadGen threads) ----------------------------------------------------
    def issue_queries(self, query_samples) -> None:
        arrived = time.perf_counter()
        self._queue.put([(sample.id, sample.index, arrived) for sample in query_samples])

    def flush_queries(self) -> None:
        self._flushed.set()

    # --- the worker ----------------------------------------------------------------------------------
    def __enter__(self) -> "BatchingSUT":
        self._worker = threading.Thread(target=self._serve, name="mlperf-sut", daemon=True)
        self._worker.start()
        return self

    def __exit__(self, *exc) -> None:
        self._queue.put(None)
        self._worker.join()

    def _serve(self) -> None:
        pending: deque = deque()
        while True:
            if not pending:
                item = self._queue.get()
                if item is None:
                    return
                pending.extend(item)
            stop = self._gather(pending)
            while pending:
                batch = [pending.popleft() for _ in range(min(len(pending), self.inference.max_batch))]
                self._answer(batch)
                if self.max_wait_s > 0 and not stop and len(pending) < self.inference.max_batch:
                    break  # a partial batch waits for company again
            if stop:
                return

    def _gather(self, pending: deque) -> bool:
        """Move queued samples into ``pending``, waiting up to max_wait_s for a full batch; True at the end."""
        deadline = pending[0][2] + self.max_wait_s
        while True:
            try:
                wait = deadline - time.perf_counter()
                if len(pending) >= self.inference.max_batch or wait <= 0 or self._flushed.is_set():
                    item = self._queue.get_nowait()
                else:
                    item = self._queue.get(timeout=wait)
            except queue.Empty:
                return False
            if item is None:
                return True
            pending.extend(item)

    def _answer(self, batch: list[tuple]) -> None:
        lg = loadgen()
        logits = None
        if self.error is None:
            try:
                logits = self.inference.logits(self.library.batch([index for _, index, _ in batch]))
            except BaseException as exc:  # noqa: BLE001 - LoadGen must still get its answers; re-raised after the test
                self.error = exc
        if logits is None:
            responses = [lg.QuerySampleResponse(sample_id, 0, 0) for sample_id, _, _ in batch]
        else:
            responses = [lg.QuerySampleResponse(sample_id, row.ctypes.data, row.nbytes)
                         for (sample_id, _, _), row in zip(batch, logits)]
        lg.QuerySamplesComplete(responses)  # ``logits`` is referenced until this returns
        self.batches += 1


def run_test(sut: BatchingSUT, library: SampleLibrary, settings, folder: str) -> None:
    """One LoadGen test (StartTest) of ``sut`` over ``library``, its logs written to ``folder``.

    The trace is switched off and its empty file removed; an audit.config in the working folder is never
    read (LoadGen's default looks for one there and would silently change the test).
    """
    lg = loadgen()
    os.makedirs(folder, exist_ok=True)
    log_settings = lg.LogSettings()
    log_settings.log_output.outdir = folder
    log_settings.log_output.copy_summary_to_stdout = False
    log_settings.enable_trace = False
    sut_handle = lg.ConstructSUT(sut.issue_queries, sut.flush_queries)
    qsl_handle = lg.ConstructQSL(library.total, library.performance_count, library.load, library.unload)
    try:
        with sut:
            lg.StartTestWithLogSettings(sut_handle, qsl_handle, settings, log_settings,
                                        os.path.join(folder, "no-audit.config"))
    finally:
        lg.DestroyQSL(qsl_handle)
        lg.DestroySUT(sut_handle)
    trace = os.path.join(folder, "mlperf_log_trace.json")
    if os.path.exists(trace):
        os.remove(trace)
    if sut.error is not None:
        raise sut.error
