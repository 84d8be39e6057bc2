"""`bench --server`: a served model under load from Triton's own perf_analyzer, beside the in-process rate.

perf_analyzer (the binary shipped in the tritonclient wheel) sends random uint8 images to the
batched model at each concurrency of a bounded range, for a bounded number of fixed-length
measurement windows, and writes a CSV: throughput and p50/p90/p99 latency per concurrency. The
same model is timed in this process (bench.harness.measure on runtime.load's Predictor, same
batch and crop mode) so the server's overhead is one number. The server's own statistics count
failed requests during the run. Load goes to loopback only.
"""
from __future__ import annotations

import csv
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from cnnbench.common.errors import InputError, UserError
from cnnbench.serve.client import TritonClient, parse_server

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
DEFAULT_CONCURRENCY = "1:8"
DEFAULT_WINDOW_SECONDS = 5.0
MIN_TRIALS = 3  # perf_analyzer's stability test compares the last 3 windows: fewer can never pass it
DEFAULT_TRIALS = 4  # windows per concurrency at most: perf_analyzer stops once 3 agree within STABILITY_PERCENT
STABILITY_PERCENT = 25  # a shared 2-core machine never holds 10 % (perf_analyzer's default) for long
_CUDART = "libcudart.so.12"  # perf_analyzer links it even for CPU-only servers (CUDA shared memory support)


class PerfAnalyzerError(UserError, RuntimeError):
    """perf_analyzer is missing, cannot start, or failed."""


def bench_server(server: str, model_path: str | None = None, *, served_model: str | None = None, batch: int = 1,
                 concurrency: str = DEFAULT_CONCURRENCY, window_seconds: float = DEFAULT_WINDOW_SECONDS,
                 trials: int = DEFAULT_TRIALS, crops=10, backend: str = "auto", device: str = "auto",
                 precision: str = "fp32", threads: int | None = None, progress: bool = True) -> dict:
    """Rows {concurrency, images_per_s, p50_ms, p90_ms, p99_ms, vs_in_process} for the served model,
    plus the in-process rate of `model_path` (the export or checkpoint the server runs) when given."""
    protocol, address = parse_server(server)
    host = address.rsplit(":", 1)[0]
    if host not in LOOPBACK:
        raise InputError(f"load tests aim at this machine only (127.0.0.1); {server} is elsewhere")
    if batch < 1 or trials < MIN_TRIALS or window_seconds <= 0:
        raise InputError(f"batch must be at least 1, trials at least {MIN_TRIALS} (perf_analyzer calls a measurement "
                         "stable when its last 3 windows agree) and the window longer than 0 s")
    levels = concurrency_levels(concurrency)
    predictor = None
    if model_path is not None:
        from cnnbench import runtime
        from cnnbench.serve.server import served_name

        predictor = runtime.load(model_path, backend=backend, device=device, precision=precision, threads=threads)
        served_model = served_model or served_name(model_path, predictor)
    if not served_model:
        raise InputError("name the served model (--served-model) or the export it serves (MODEL)")
    client = TritonClient(server)
    in_process = None
    if predictor is not None:
        _check_same_answers(client, served_model, predictor, crops)
        in_process = _in_process_rate(predictor, batch, crops, window_seconds)
    before = _request_counts(client, served_model)
    rows, seconds = _perf_analyzer(protocol, address, served_model, batch, concurrency, levels, window_seconds, trials,
                                   progress)
    after = _request_counts(client, served_model)
    failed = after["fail"] - before["fail"]
    for row in rows:
        row["vs_in_process"] = row["images_per_s"] / in_process["images_per_s"] if in_process else None
    return {"server": server, "model": served_model, "source": model_path, "batch": batch, "crops": crops,
            "concurrency": concurrency, "window_s": window_seconds, "trials": trials, "seconds": seconds,
            "requests": after["success"] - before["success"], "failed_requests": failed, "ok": failed == 0,
            "in_process": in_process, "rows": rows, "tool": "perf_analyzer (tritonclient " +
            importlib.metadata.version("tritonclient") + ")"}


def concurrency_levels(text: str) -> list[int]:
    """'1:8' -> [1..8], '1:8:2' -> [1, 3, 5, 7], '4' -> [4]: perf_analyzer's --concurrency-range."""
    try:
        parts = [int(p) for p in text.split(":")]
    except ValueError:
        parts = []
    start = parts[0] if parts else 0
    end = parts[1] if len(parts) > 1 else start
    step = parts[2] if len(parts) > 2 else 1
    if not 1 <= len(parts) <= 3 or start < 1 or end < start or step < 1:
        raise InputError(f"concurrency must be START[:END[:STEP]] with 1 <= START <= END, got {text!r}")
    return list(range(start, end + 1, step))


def find_perf_analyzer() -> tuple[str, dict]:
    """(path of the tritonclient wheel's perf_analyzer, the environment it runs in); a PerfAnalyzerError
    naming what to install when it cannot start."""
    path = shutil.which("perf_analyzer") or os.path.join(os.path.dirname(sys.executable), "perf_analyzer")
    if not os.path.isfile(path):
        raise PerfAnalyzerError("perf_analyzer not found: it comes with tritonclient (pip install -e '.[serve]')")
    env = dict(os.environ)
    cudart = _pip_cudart_folder()
    if cudart:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (cudart, env.get("LD_LIBRARY_PATH", "")) if p)
    missing = _missing_libraries(path, env)
    if missing:
        fixes = {"libb64.so.0d": "apt-get install libb64-0d",
                 _CUDART: "pip install nvidia-cuda-runtime-cu12 (the [serve] extra)"}
        raise PerfAnalyzerError(f"{path} cannot start: missing {', '.join(missing)}; install: "
                                + "; ".join(fixes.get(m, m) for m in missing))
    return path, env


def _pip_cudart_folder() -> str | None:
    try:
        files = importlib.metadata.distribution("nvidia-cuda-runtime-cu12").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == _CUDART:
            return os.path.dirname(str(f.locate()))
    return None


def _missing_libraries(path: str, env: dict) -> list[str]:
    if not shutil.which("ldd"):
        return []
    out = subprocess.run(["ldd", path], capture_output=True, text=True, env=env).stdout
    return [line.split()[0] for line in out.splitlines() if "not found" in line]


def _perf_analyzer(protocol: str, address: str, model: str, batch: int, concurrency: str, levels: list[int],
                   window_seconds: float, trials: int, progress: bool) -> tuple[list[dict], float]:
    path, env = find_perf_analyzer()
    window_ms = int(round(window_seconds * 1000))
    with tempfile.TemporaryDirectory(prefix="cnnbench-perf-") as folder:
        report = os.path.join(folder, "perf.csv")
        command = [path, "-m", model, "-u", address, "-i", protocol, "-b", str(batch),
                   "--concurrency-range", concurrency, "--measurement-mode", "time_windows", "-p", str(window_ms),
                   "-r", str(trials), "-s", str(STABILITY_PERCENT), "--input-data", "random", "-f", report]
        # Bounded: every level runs at most `trials` windows; twice that, plus start-up, before it is stopped.
        limit = 2 * len(levels) * trials * window_seconds + 60
        start = time.monotonic()
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            raise PerfAnalyzerError(f"perf_analyzer ran past {limit:.0f} s and was stopped") from None
        seconds = time.monotonic() - start
        if progress:
            print(done.stdout, file=sys.stderr, flush=True)
        if done.returncode != 0 or not os.path.isfile(report):
            tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-3:]
            raise PerfAnalyzerError(f"perf_analyzer failed (exit {done.returncode}): {' | '.join(tail)}; an unstable "
                                    "measurement needs longer windows or more trials (or a quieter machine)")
        with open(report, newline="") as f:
            rows = sorted((_row(r, batch) for r in csv.DictReader(f)), key=lambda row: row["concurrency"])
    return rows, seconds


def _row(r: dict, batch: int) -> dict:
    """One perf_analyzer CSV row (latencies in microseconds per request of `batch` images)."""
    return {"concurrency": int(r["Concurrency"]), "images_per_s": float(r["Inferences/Second"]),
            "p50_ms": int(r["p50 latency"]) / 1e3, "p90_ms": int(r["p90 latency"]) / 1e3,
            "p99_ms": int(r["p99 latency"]) / 1e3, "server_queue_ms": int(r["Server Queue"]) / 1e3,
            "server_compute_ms": int(r["Server Compute Infer"]) / 1e3}


def _request_counts(client: TritonClient, model: str) -> dict:
    stats = client.statistics(model)["inference_stats"]
    return {"success": int(stats["success"].get("count", 0)), "fail": int(stats["fail"].get("count", 0))}


def _check_same_answers(client: TritonClient, model: str, predictor, crops) -> None:
    """The server runs this model with this crop mode: one batch's logits agree (else the comparison is void)."""
    images = np.random.default_rng(0).integers(0, 256, (2, 3, predictor.spec.resize, predictor.spec.resize),
                                               dtype=np.uint8)
    served = client.infer_images(model, images)[0]
    local = predictor.logits_from_images(torch.from_numpy(images), crops).numpy()
    if served.shape != local.shape or not np.allclose(served, local, atol=1e-3):
        raise InputError(f"the served {model!r} does not answer as {predictor.source} with crops {crops} does "
                         "(another model, backend precision or --crops on the server?)")


def _in_process_rate(predictor, batch: int, crops, window_seconds: float) -> dict:
    from cnnbench.bench.harness import measure

    side = predictor.spec.resize
    images = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8)
    timing = measure(lambda: predictor.logits_from_images(images, crops), seconds=window_seconds,
                     device=predictor.device).summary()
    return {"predictor": predictor.name, "batch": batch, "images_per_s": batch * 1e3 / timing["mean_ms"],
            "p50_ms": timing["p50_ms"], "p99_ms": timing["p99_ms"]}
