"""Timing harness: warm-up, a fixed number of iterations or seconds, percentiles and stability.

Every timed iteration ends with the device synchronised, so asynchronous CUDA work is inside the
time it belongs to. Out of memory is never answered by quietly running a smaller batch: the
harness finds the largest halved batch that fits and raises an error naming it.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from cnnbench.common.errors import InputError, UserError


DEFAULT_SECONDS = 5.0
MIN_ITERS = 3                 # enough for a spread when the budget is given in seconds
CV_WARN = 0.05                # a coefficient of variation above 5 % makes the row suspect

# Messages that out-of-memory failures carry across PyTorch (CPU and CUDA) and ONNX Runtime.
_OOM_MARKERS = ("out of memory", "failed to allocate memory", "cannot allocate memory",
                "cudaerrormemoryallocation", "cuda_error_out_of_memory")


class BatchTooLargeError(UserError, RuntimeError):
    """The requested batch does not fit in memory; ``fits`` is the largest halved batch that did (or None)."""

    def __init__(self, batch: int, fits: Optional[int], device: str, cause: BaseException):
        self.batch, self.fits, self.device = batch, fits, device
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        if fits:
            advice = f"batch {fits} fits: pass --batch {fits}"
        else:
            advice = "not even batch 1 fits"
        super().__init__(f"batch {batch} does not fit in {device} memory ({reason}); {advice}")


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return any(marker in str(exc).lower() for marker in _OOM_MARKERS)


def synchronizer(device: str | torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@dataclass
class Measurement:
    """Per-iteration wall times in seconds, warm-up excluded."""

    times_s: list[float]
    warmup: int
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {**summarize(self.times_s), "warmup": self.warmup}


def summarize(times_s: list[float]) -> dict:
    """Latency statistics in milliseconds; CV is stddev / mean (sample stddev, 0 for one iteration)."""
    times = np.asarray(times_s, dtype=np.float64)
    if times.size == 0:
        raise ValueError("no timed iterations to summarise")
    mean = float(times.mean())
    std = float(times.std(ddof=1)) if times.size > 1 else 0.0
    p50, p90, p99 = (float(v) for v in np.percentile(times, [50, 90, 99]))
    return {
        "iterations": int(times.size),
        "mean_ms": 1e3 * mean,
        "stddev_ms": 1e3 * std,
        "cv": std / mean if mean > 0 else float("nan"),
        "p50_ms": 1e3 * p50,
        "p90_ms": 1e3 * p90,
        "p99_ms": 1e3 * p99,
        "min_ms": 1e3 * float(times.min()),
        "max_ms": 1e3 * float(times.max()),
        "total_s": float(times.sum()),
    }


def measure(
    step: Callable[[], Any],
    *,
    iters: Optional[int] = None,
    seconds: Optional[float] = None,
    warmup: int = 3,
    device: str | torch.device = "cpu",
    clock: Callable[[], float] = time.perf_counter,
    min_iters: int = MIN_ITERS,
) -> Measurement:
    """Time ``step`` (one batch) after ``warmup`` untimed calls.

    ``iters`` runs exactly that many timed iterations; otherwise iterations continue until
    ``seconds`` (default 5 s) have been timed and at least ``min_iters`` ran. Each iteration is the
    interval between consecutive synchronised completions, so ``step`` may also be ``next`` of a
    pipelined iterator: then an iteration is the time between two batches leaving the pipeline.
    """
    check_warmup(warmup)
    budget = Budget(iters, seconds, min_iters)
    sync = synchronizer(device)
    for _ in range(warmup):
        step()
    sync()
    times: list[float] = []
    previous = clock()
    while not budget.done(times):
        step()
        sync()
        now = clock()
        times.append(now - previous)
        previous = now
    return Measurement(times, warmup)


def check_warmup(warmup: int) -> None:
    if warmup < 0:
        raise InputError(f"warmup must be >= 0, got {warmup}")


class Budget:
    """When to stop timing: after ``iters`` iterations, or once ``seconds`` (default 5 s) are timed
    and at least ``min_iters`` ran."""

    def __init__(self, iters: Optional[int] = None, seconds: Optional[float] = None, min_iters: int = MIN_ITERS):
        if iters is not None and seconds is not None:
            raise InputError("give either iters or seconds (--iters, --seconds), not both")
        if iters is not None and iters < 1:
            raise InputError(f"iters must be >= 1, got {iters}")
        if seconds is not None and seconds <= 0:
            raise InputError(f"seconds must be > 0, got {seconds}")
        self.iters = iters
        self.seconds = DEFAULT_SECONDS if iters is None and seconds is None else seconds
        self.min_iters = min_iters

    def done(self, times: list[float]) -> bool:
        if self.iters is not None:
            return len(times) >= self.iters
        return len(times) >= self.min_iters and sum(times) >= self.seconds


def measure_batch(
    make_step: Callable[[int], Callable[[], Any]],
    batch: int,
    *,
    device: str | torch.device = "cpu",
    **measure_kwargs,
) -> Measurement:
    """``measure(make_step(batch))``; out of memory raises BatchTooLargeError naming a batch that fits.

    The smaller batches are only tried once each to find one that fits; nothing is timed at them.
    """
    try:
        return measure(make_step(batch), device=device, **measure_kwargs)
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
        if not is_out_of_memory(exc):
            raise
        cause = exc
    release_memory(device)
    raise BatchTooLargeError(batch, largest_fitting_batch(make_step, batch, device), str(device), cause)


def largest_fitting_batch(make_step: Callable[[int], Callable[[], Any]], batch: int,
                          device: str | torch.device = "cpu") -> Optional[int]:
    """Halve ``batch`` until one untimed step runs without running out of memory; None if 1 fails."""
    candidate = batch // 2
    sync = synchronizer(device)
    while candidate >= 1:
        try:
            make_step(candidate)()
            sync()
            return candidate
        except Exception as exc:  # noqa: BLE001
            if not is_out_of_memory(exc):
                raise
        release_memory(device)
        candidate //= 2
    return None


def release_memory(device: str | torch.device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
