"""The timing harness against known workloads: a sleep, a fixed-FLOP matmul, and a fake clock."""
import math
import time

import numpy as np
import pytest
import torch

from cnnbench.bench.harness import (Budget, BatchTooLargeError, is_out_of_memory, measure, measure_batch, summarize)
from cnnbench.bench.machine import PeakMemory, machine_info
from cnnbench.bench.peak import peak_flops
from cnnbench.runtime.openvino_backend import openvino_problem


class FakeClock:
    """A clock that only moves when a step says so: exact, known iteration times."""

    def __init__(self, durations):
        self.now = 100.0
        self.durations = list(durations)
        self.steps = 0

    def __call__(self):
        return self.now

    def step(self):
        self.now += self.durations[self.steps]
        self.steps += 1


def test_sleep_percentiles_match_the_sleep():
    timing = measure(lambda: time.sleep(0.02), iters=8, warmup=1)
    stats = timing.summary()
    assert stats["iterations"] == 8 and stats["warmup"] == 1 and len(timing.times_s) == 8
    # A sleep never returns early; a busy machine may return late, within reason.
    for key in ("p50_ms", "mean_ms", "min_ms"):
        assert 20.0 <= stats[key] <= 35.0, (key, stats)
    assert stats["min_ms"] <= stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]


def test_matmul_iterations_add_up_to_the_wall_time():
    torch.manual_seed(0)
    side = 256
    a, b = torch.randn(side, side), torch.randn(side, side)
    flops = 2 * side**3
    began = time.perf_counter()
    timing = measure(lambda: torch.mm(a, b), iters=20, warmup=0)
    wall = time.perf_counter() - began
    stats = timing.summary()
    # With no warm-up, the timed iterations are the whole call, less only the loop's own overhead.
    assert stats["total_s"] <= wall
    assert stats["total_s"] >= 0.9 * wall - 2e-3
    assert stats["mean_ms"] == pytest.approx(1e3 * stats["total_s"] / 20)
    rate = flops / (stats["mean_ms"] / 1e3)
    assert math.isfinite(rate) and rate > 0


def test_statistics_from_a_fake_clock_are_exact():
    # 10, 20, 30, 40 ms: mean 25, sample stddev sqrt(500/3) = 12.910 ms, CV 0.5164;
    # linear-interpolated percentiles: p50 25, p90 37, p99 39.7 ms.
    warm = [5.0, 5.0]  # slow warm-up calls must not count
    clock = FakeClock(warm + [0.010, 0.020, 0.030, 0.040])
    stats = measure(clock.step, iters=4, warmup=2, clock=clock).summary()
    assert clock.steps == 6
    assert stats["iterations"] == 4
    assert stats["mean_ms"] == pytest.approx(25.0)
    assert stats["stddev_ms"] == pytest.approx(math.sqrt(500 / 3), rel=1e-9)
    assert stats["cv"] == pytest.approx(math.sqrt(500 / 3) / 25.0, rel=1e-9)
    assert stats["p50_ms"] == pytest.approx(25.0)
    assert stats["p90_ms"] == pytest.approx(37.0)
    assert stats["p99_ms"] == pytest.approx(39.7)
    assert stats["min_ms"] == pytest.approx(10.0) and stats["max_ms"] == pytest.approx(40.0)


def test_constant_times_have_zero_cv_and_one_iteration_has_no_spread():
    assert summarize([0.05] * 5)["cv"] == pytest.approx(0.0, abs=1e-12)
    single = summarize([0.05])
    assert single["stddev_ms"] == 0.0 and single["p99_ms"] == pytest.approx(50.0)
    with pytest.raises(ValueError):
        summarize([])


@pytest.mark.parametrize("duration, seconds, expected", [(0.5, 1.0, 3), (0.125, 1.0, 8), (2.0, 1.0, 3)])
def test_seconds_budget_stops_after_the_budget_and_a_minimum(duration, seconds, expected):
    # Durations are binary fractions, so the fake clock adds them up exactly.
    clock = FakeClock([duration] * 50)
    timing = measure(clock.step, seconds=seconds, warmup=0, clock=clock)
    assert len(timing.times_s) == expected
    assert sum(timing.times_s) >= seconds


def test_budget_arguments_are_checked():
    with pytest.raises(ValueError):
        Budget(iters=3, seconds=1.0)
    with pytest.raises(ValueError):
        Budget(iters=0)
    with pytest.raises(ValueError):
        measure(lambda: None, iters=1, warmup=-1)
    assert Budget().seconds > 0  # neither given: a default number of seconds


def _oom_above(limit, error, calls):
    def make_step(batch):
        def step():
            calls.append(batch)
            if batch > limit:
                raise error
        return step
    return make_step


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes. out of memory"),
    RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer"),
])
def test_out_of_memory_names_a_batch_that_fits_without_timing_it(error):
    calls = []
    with pytest.raises(BatchTooLargeError) as caught:
        measure_batch(_oom_above(8, error, calls), 64, iters=5, warmup=2)
    assert caught.value.batch == 64 and caught.value.fits == 8
    assert "--batch 8" in str(caught.value) and "batch 64" in str(caught.value)
    # 64 failed in warm-up, 32 and 16 failed once each, 8 ran once to prove it fits: nothing was timed.
    assert calls == [64, 32, 16, 8]


def test_out_of_memory_even_at_batch_one():
    calls = []
    with pytest.raises(BatchTooLargeError) as caught:
        measure_batch(_oom_above(0, torch.cuda.OutOfMemoryError("out of memory"), calls), 4, iters=1, warmup=0)
    assert caught.value.fits is None and "not even batch 1" in str(caught.value)
    assert calls == [4, 2, 1]


def test_other_errors_are_not_mistaken_for_out_of_memory():
    with pytest.raises(ValueError, match="bad shape"):
        measure_batch(_oom_above(0, ValueError("bad shape"), []), 4, iters=1, warmup=0)
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert is_out_of_memory(MemoryError())


def test_measure_batch_passes_through_a_batch_that_fits():
    calls = []
    timing = measure_batch(_oom_above(64, RuntimeError("out of memory"), calls), 16, iters=3, warmup=1)
    assert len(timing.times_s) == 3 and calls == [16] * 4


def test_peak_memory_sees_an_allocation():
    with PeakMemory(torch.device("cpu")) as before:
        pass
    with PeakMemory(torch.device("cpu")) as during:
        block = np.ones(48 * 2**20 // 8)  # 48 MiB, touched
        del block
    assert during.result()["host_peak_rss_mib"] - before.result()["host_peak_rss_mib"] > 40
    assert during.result()["cuda_max_allocated_mib"] is None


def test_peak_flops_and_machine_info():
    fp32 = peak_flops("fp32", torch.device("cpu"))
    assert fp32["flops"] > 0 and math.isfinite(fp32["flops"])
    assert fp32["flops"] == max(fp32["candidates"].values()) and fp32["kernel"] in fp32["candidates"]
    assert {"torch.mm 1024x1024", "numpy.matmul 1024x1024"} <= set(fp32["candidates"])
    if openvino_problem("cpu") is None:  # the units the openvino backend computes with, compiled as it compiles
        assert "openvino MatMul (f32) 1024x1024" in fp32["candidates"]
    assert peak_flops("fp64", torch.device("cpu"))["flops"] is None
    info = machine_info(torch.device("cpu"))
    assert info["cpu_cores"] >= 1 and info["torch"] == torch.__version__ and info["gpu"] is None
