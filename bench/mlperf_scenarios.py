"""The four MLPerf scenarios: what each measures, the LoadGen settings of a run, and the Server search.

LoadGen generates its queries up front from the *expected* speed it is told, and a run that outpaces
them ends INVALID ("ran out of generated queries"); so every expectation here comes from a short
calibration of the same SUT step, stated as MLPerf's rules want it to be, with slack for a faster run.
"""
from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

from cnnbench.bench.mlperf_sut import loadgen
from cnnbench.common.errors import InputError
from cnnbench.data.crops import CENTRE


@dataclass(frozen=True)
class Scenario:
    """``name``: the CLI's; ``loadgen``: LoadGen's TestScenario; ``percentile``: the latency percentile
    MLPerf reads (SingleStream, MultiStream: the result; Server: the bound's); ``samples_per_query``."""

    name: str
    loadgen: str
    percentile: Optional[float]
    samples_per_query: Optional[int]
    measures: str


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("offline", "Offline", None, None, "samples/s with every sample issued at once"),
    Scenario("server", "Server", 0.99, 1, "the highest Poisson rate whose p99 latency stays under the bound"),
    Scenario("singlestream", "SingleStream", 0.90, 1, "p90 latency of one sample at a time"),
    Scenario("multistream", "MultiStream", 0.99, 8, "p99 latency of queries of 8 samples, one at a time"),
)}
TEST_MODES = {"performance": "PerformanceOnly", "accuracy": "AccuracyOnly"}

# The image-classification benchmark whose rules --official takes from LoadGen's built-in mlperf.conf
# (minimum durations of 10 minutes, query and sample counts, RNG seeds).
OFFICIAL_MODEL = "resnet50"
DEFAULT_SECONDS = 1.0           # LoadGen min_duration of a short run (MLPerf's own: 600 s, --official)
# How much faster than calibrated a run may go before LoadGen runs out of generated queries. Offline
# issues every generated sample, so its slack lengthens the run; SingleStream and MultiStream stop
# issuing once the duration and count are met, so their spare queries cost nothing.
OFFLINE_SLACK = 1.5
STREAM_SLACK = 4.0
# Server latency bounds when --latency-ms is not given: MLPerf ResNet-50's 15 ms for one crop on a GPU;
# ten crops (or dense ten crops) are one batch of ten there, so a little over three times that. A CPU
# runs each crop in turn, so its bounds are wider (a 2-core CPU runs the demo's ResNet26 at 96 px in
# 35-90 ms per image with ten crops, and a batch of 8 in 0.3-0.6 s).
DEFAULT_LATENCY_MS = {("cuda", CENTRE.name): 15.0, ("cuda", "other"): 50.0,
                      ("cpu", CENTRE.name): 100.0, ("cpu", "other"): 500.0}
SERVER_WAIT_SHARE = 0.05        # the batcher's default maximum wait: 5 % of the latency bound
# The Server search tries rates on a grid of half-steps of the edge factor from its start: two rates a
# half-step apart (9.5 %) bracket the edge to within 10 %, and the rate two half-steps above the best
# VALID one is the proof MLPerf's practice asks for (1.2x the reported QPS is INVALID).
SERVER_EDGE = 1.2
SERVER_HALF_STEP = math.sqrt(SERVER_EDGE)
SERVER_DOWN_STEPS = 4           # no VALID rate yet: 1.44x lower (the start is an ideal machine's edge: optimistic)
SERVER_TRIALS = 8                # a start within 1.5x of the edge takes 3-5
SERVER_SIMULATED_QUERIES = 2000  # Poisson arrivals in the simulation that picks the search's start
# A Server run lasts at least this many latency bounds, so that a rate 10 % above what the SUT sustains
# builds a backlog past the bound before the run ends (a short overloaded run can still look VALID).
SERVER_DURATION_BOUNDS = 10
SERVER_TRIAL_CAP_S = 120.0      # a slower trial (a low rate x the queries early stopping needs) is not run


def scenario(name: str) -> Scenario:
    if name not in SCENARIOS:
        raise InputError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    return SCENARIOS[name]


def default_latency_ms(device: str, crops: str) -> float:
    return DEFAULT_LATENCY_MS[("cuda" if device.startswith("cuda") else "cpu", crops if crops == CENTRE.name else "other")]


def early_stopping_queries(percentile: float, overlatency: int) -> int:
    """The fewest queries with which LoadGen's early stopping can pass at ``percentile`` when
    ``overlatency`` of them are slower than the estimate (loadgen/early_stopping.cc: 99 % confidence
    that at most 1 - percentile of queries exceed it; SingleStream and MultiStream need one over, Server
    none). SingleStream p90: 64; MultiStream p99: 662; Server p99: 459."""
    n = overlatency + 1
    while _binomial_cdf(overlatency, n, 1 - percentile) > 0.01:
        n += 1
    return n


def _binomial_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))


def minimum_queries(sc: Scenario) -> int:
    """Queries a short run issues at least: what early stopping needs (Offline: one query)."""
    if sc.name == "offline":
        return 1
    return early_stopping_queries(sc.percentile, 0 if sc.name == "server" else 1)


@dataclass(frozen=True)
class RunOptions:
    """What every LoadGen run of one mlperf command shares."""

    seconds: float
    min_queries: Optional[int]      # None: minimum_queries of the scenario
    official: bool
    batch: int
    latency_ms: Optional[float]     # None: default_latency_ms
    max_wait_ms: Optional[float]    # None: SERVER_WAIT_SHARE of the bound

    def bound_ms(self, device: str, crops: str) -> float:
        return self.latency_ms if self.latency_ms is not None else default_latency_ms(device, crops)

    def wait_ms(self, device: str, crops: str) -> float:
        return self.max_wait_ms if self.max_wait_ms is not None else SERVER_WAIT_SHARE * self.bound_ms(device, crops)


@dataclass(frozen=True)
class Calibration:
    """The same SUT step timed in a closed loop: seconds for one call of 1 image, of a MultiStream
    query's images, and images/s at the Offline/Server batch."""

    single_s: float
    multi_s: float
    batch_images_per_s: float


def loadgen_settings(sc: Scenario, mode: str, options: RunOptions, calibration: Calibration, *,
                  bound_ms: float, server_qps: Optional[float] = None):
    """LoadGen TestSettings of one run. Short runs: ``options.seconds`` and the queries early stopping
    needs (or --min-queries); --official: MLPerf's own values for ResNet-50, except the performance sample
    count (all held-out images) and the Server bound (``bound_ms``)."""
    lg = loadgen()
    settings = lg.TestSettings()
    if options.official:
        if settings.FromConfig("", OFFICIAL_MODEL, sc.loadgen, 0) != 0:  # 0: LoadGen's built-in mlperf.conf only
            raise RuntimeError(f"LoadGen could not read its built-in mlperf.conf for {OFFICIAL_MODEL} {sc.loadgen}")
        settings.performance_sample_count_override = 0
    else:
        settings.min_duration_ms = int(round(1000 * options.seconds))
        settings.min_query_count = options.min_queries if options.min_queries is not None else minimum_queries(sc)
    settings.scenario = getattr(lg.TestScenario, sc.loadgen)
    settings.mode = getattr(lg.TestMode, TEST_MODES[mode])
    if sc.name == "offline":
        qps = OFFLINE_SLACK * calibration.batch_images_per_s
        settings.offline_expected_qps = qps
        if not options.official and options.min_queries is None:
            # LoadGen issues max(min_query_count, 1.1 x duration x expected QPS) samples: a whole number of batches.
            samples = 1.1 * settings.min_duration_ms / 1000 * qps
            settings.min_query_count = options.batch * math.ceil(samples / options.batch)
    elif sc.name == "singlestream":
        settings.single_stream_expected_latency_ns = max(1, int(1e9 * calibration.single_s / STREAM_SLACK))
        settings.single_stream_target_latency_percentile = sc.percentile
    elif sc.name == "multistream":
        settings.multi_stream_expected_latency_ns = max(1, int(1e9 * calibration.multi_s / STREAM_SLACK))
        settings.multi_stream_target_latency_percentile = sc.percentile
        settings.multi_stream_samples_per_query = sc.samples_per_query
    else:
        if not options.official:
            settings.min_duration_ms = max(settings.min_duration_ms, int(round(SERVER_DURATION_BOUNDS * bound_ms)))
        settings.server_target_qps = server_qps
        settings.server_target_latency_ns = int(round(1e6 * bound_ms))
        settings.server_target_latency_percentile = sc.percentile
    return settings


def recalibrated(sc: Scenario, calibration: Calibration, result: dict) -> Calibration:
    """The calibration with the speed a performance run of ``sc`` actually reached (for a run that ran out
    of generated queries because the SUT went faster than calibrated)."""
    if sc.name == "offline" and result.get("samples_per_s"):
        return replace(calibration, batch_images_per_s=result["samples_per_s"])
    if sc.name == "singlestream" and result["latency_ms"].get("50.00"):
        return replace(calibration, single_s=min(calibration.single_s, result["latency_ms"]["50.00"] / 1e3))
    if sc.name == "multistream" and result["query_latency_ms"].get("50.00"):
        return replace(calibration, multi_s=min(calibration.multi_s, result["query_latency_ms"]["50.00"] / 1e3))
    return calibration


def simulated_server_edge(calibration: Calibration, batch: int, *, bound_s: float, wait_s: float,
                          percentile: float = 0.99) -> float:
    """The Server search's start: the highest Poisson rate at which BatchingSUT's batching (a batch starts when
    the model is free and the batch is full or its oldest sample has waited ``wait_s``), with the calibrated
    step times (linear between one image and a full batch), keeps the ``percentile`` latency under
    ``bound_s``. An ideal machine's answer (no scheduling noise), so the search steps down from it faster
    than up. When not even one image at a time fits the bound, the closed-loop rate: every rate will be
    INVALID and the runs say why."""
    capacity = calibration.batch_images_per_s
    full_s = batch / capacity
    per_image_s = (full_s - calibration.single_s) / (batch - 1) if batch > 1 else 0.0

    def step_s(n: int) -> float:
        return calibration.single_s + (n - 1) * per_image_s

    draws = random.Random(0)  # the same arrivals at every rate, scaled: the verdict is monotone in the rate
    gaps = [draws.expovariate(1.0) for _ in range(SERVER_SIMULATED_QUERIES)]

    def fits(rate: float) -> bool:
        arrivals = list(itertools.accumulate(gap / rate for gap in gaps))
        latencies, free, i, n = [], 0.0, 0, len(arrivals)
        while i < n:
            full = arrivals[i + batch - 1] if i + batch - 1 < n else math.inf
            start = max(free, min(arrivals[i] + wait_s, full))
            j = i
            while j < n and j - i < batch and arrivals[j] <= start:
                j += 1
            free = start + step_s(j - i)
            latencies += [free - a for a in arrivals[i:j]]
            i = j
        return sorted(latencies)[int(percentile * n)] <= bound_s

    low, high = capacity / 1000, capacity
    if not fits(low):
        return capacity
    for _ in range(20):
        middle = math.sqrt(low * high)
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def next_server_step(verdicts: dict[int, bool]) -> Optional[int]:
    """The Server search's next grid step (rate = start x SERVER_HALF_STEP ** step) from the verdicts so far
    (step -> VALID), or None when done: the best VALID step has its neighbour above INVALID (within 10 %)
    and the step two above it (1.2x) was run. No VALID yet: SERVER_DOWN_STEPS lower, then galloping; no
    INVALID above the best yet: 1.2x higher (which is also the proof), then galloping; else bisect. With
    noise a VALID rate may sit above an INVALID one: the highest VALID rate counts, as in a submitter's
    search."""
    valid = [step for step, ok in verdicts.items() if ok]
    span = max(verdicts) - min(verdicts)  # galloping: each step away from the start is as far as all before
    if not valid:
        return min(verdicts) - max(SERVER_DOWN_STEPS, span)
    best = max(valid)
    above = [step for step, ok in verdicts.items() if not ok and step > best]
    if not above:
        return best + max(2, span)
    if min(above) - best > 1:
        return (best + min(above)) // 2
    return None if best + 2 in verdicts else best + 2


def search_server(trial: Callable[[float], dict], start_qps: float, *, trials: int, min_queries: int,
                  seconds: float, log: Callable[[str], None]) -> tuple[Optional[dict], list[dict], Optional[dict]]:
    """The highest target QPS whose Server run is VALID, and the proof that 1.2x it is INVALID.

    ``trial(qps)`` runs LoadGen's Server at that rate and returns its result (``validity``). Rates are
    ``start_qps`` x SERVER_HALF_STEP ** step, the steps chosen by next_server_step. At most ``trials``
    runs, none expected to take longer than SERVER_TRIAL_CAP_S (or ``seconds``): a Server run lasts at
    least the queries early stopping needs (``min_queries``) at its rate, so a slower start is raised to
    the slowest rate within it. Returns (the best VALID trial or
    None, every trial in the order run, the trial at SERVER_EDGE x the best or None when it was not run).
    """
    done: list[dict] = []
    verdicts: dict[int, bool] = {}
    by_step: dict[int, dict] = {}
    step: Optional[int] = 0
    slowest_qps = min_queries / max(SERVER_TRIAL_CAP_S, seconds)
    if start_qps < slowest_qps:
        log(f"server: starting at {slowest_qps:.3g} QPS, not {start_qps:.3g}: a slower run would take over "
            f"{max(SERVER_TRIAL_CAP_S, seconds):.0f} s")
        start_qps = slowest_qps
    while step is not None and len(done) < trials:
        qps = start_qps * SERVER_HALF_STEP ** step
        expected_s = max(seconds, min_queries / qps)
        if qps < slowest_qps * (1 - 1e-9):
            log(f"server: stopping the search: a run at {qps:.3g} QPS would take ~{expected_s:.0f} s")
            break
        began = time.perf_counter()
        result = trial(qps)
        result["target_qps"] = qps
        result["wall_s"] = time.perf_counter() - began
        done.append(result)
        by_step[step] = result
        verdicts[step] = result["validity"] == "VALID"
        log(f"server: {qps:.4g} QPS -> {result['validity']} in {result['wall_s']:.1f} s"
            + (f" ({result['invalid_reason']})" if result["invalid_reason"] else ""))
        step = next_server_step(verdicts)
    valid = [s for s, ok in verdicts.items() if ok]
    if not valid:
        return None, done, None
    best = max(valid)
    return by_step[best], done, by_step.get(best + 2)
