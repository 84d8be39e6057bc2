"""The four MLPerf scenarios: what each measures, the LoadGen settings of a run, and the Server search.

LoadGen generates its queries up front from the *expected* speed it is told, and a run that outpaces
them ends INVALID ("ran out of generated queries"); so every expectation here comes from a short
calibration of the same SUT step, stated as MLPerf's rules want it to be, with slack for a faster run.
"""
from __future__ import annotations

import math
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
SERVER_START_SHARE = 0.8        # the search's first rate, as a share of the closed-loop throughput
SERVER_STEP_UP = 1.25           # no INVALID rate seen yet: the next rate is this much higher
SERVER_PRECISION = 1.1          # stop once the lowest INVALID rate is within 10 % of the highest VALID one
SERVER_TRIALS = 6
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


def search_server(trial: Callable[[float], dict], capacity_qps: float, *, trials: int, min_queries: int,
                  seconds: float, log: Callable[[str], None]) -> tuple[Optional[dict], list[dict]]:
    """The highest target QPS whose Server run is VALID, by a short bracketing search.

    ``trial(qps)`` runs LoadGen's Server at that rate and returns its result (``validity``). Starts at
    SERVER_START_SHARE of the closed-loop throughput ``capacity_qps``; steps up until a rate is INVALID,
    halves until one is VALID, then bisects (geometrically) until the lowest INVALID rate is within
    SERVER_PRECISION of the highest VALID one. At most ``trials`` runs, none expected to take longer
    than SERVER_TRIAL_CAP_S (or ``seconds``). Returns (the best VALID trial or None, every trial).
    """
    done: list[dict] = []
    best_valid: Optional[dict] = None
    lowest_invalid: Optional[dict] = None
    qps = SERVER_START_SHARE * capacity_qps
    for _ in range(trials):
        expected_s = max(seconds, min_queries / qps)
        if expected_s > max(SERVER_TRIAL_CAP_S, seconds):
            log(f"server: stopping the search: a run at {qps:.3g} QPS would take ~{expected_s:.0f} s")
            break
        began = time.perf_counter()
        result = trial(qps)
        result["target_qps"] = qps
        result["wall_s"] = time.perf_counter() - began
        done.append(result)
        log(f"server: {qps:.4g} QPS -> {result['validity']}" + (f" ({result['invalid_reason']})"
                                                                 if result["invalid_reason"] else ""))
        if result["validity"] == "VALID":
            if best_valid is None or qps > best_valid["target_qps"]:
                best_valid = result
        elif lowest_invalid is None or qps < lowest_invalid["target_qps"]:
            lowest_invalid = result
        if lowest_invalid is None:
            qps *= SERVER_STEP_UP
        elif best_valid is None:
            qps /= 2
        else:
            low, high = best_valid["target_qps"], lowest_invalid["target_qps"]
            if high <= low * SERVER_PRECISION:  # bracketed (or, with noise, crossed): done
                break
            qps = math.sqrt(low * high)
    return best_valid, done
