"""`run_mlperf`: the bench's targets under MLPerf LoadGen's Offline, Server, SingleStream and MultiStream
scenarios, in performance and accuracy mode, with LoadGen's own verdict (VALID/INVALID and why).

The jobs, one module each: the QSL and the batching SUT (bench.mlperf_sut), the scenarios' settings and
the Server search (bench.mlperf_scenarios), reading LoadGen's logs (bench.mlperf_logs), the tables
(bench.mlperf_report). The targets and their rows are the bench's (bench.targets), so every backend
the bench plans is run here too.
"""
from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import replace
from typing import Optional

import numpy as np
import torch

from cnnbench import runtime
from cnnbench.bench.harness import measure, release_memory
from cnnbench.bench.machine import machine_info
from cnnbench.bench.mlperf_logs import performance_result, read_accuracy_log, read_detail
from cnnbench.bench.mlperf_scenarios import (DEFAULT_SECONDS, SCENARIOS, SERVER_DURATION_BOUNDS, SERVER_EDGE,
                                             SERVER_TRIALS, TEST_MODES, Calibration, RunOptions, minimum_queries,
                                             recalibrated, scenario, search_server, simulated_server_edge,
                                             loadgen_settings)
from cnnbench.bench.mlperf_sut import BatchingSUT, Inference, SampleLibrary, loadgen, run_test
from cnnbench.bench.modes import cycled, measure_compute
from cnnbench.bench.targets import RowPlan, find_targets, load_row, plan_rows
from cnnbench.common import accuracy_report, atomic_write_json
from cnnbench.common.device import resolve_device
from cnnbench.common.errors import InputError
from cnnbench.data.heldout import held_out
from cnnbench.models.checkpoint import recorded_split_files

DEFAULT_BATCH = 8            # Offline/Server batch: small, since in Server a batch is what a query waits for
CALIBRATION_SECONDS = 0.5    # per probe of the SUT step (1 image, a MultiStream query)
CALIBRATION_WARMUP = 2


def run_mlperf(models: Optional[list[str]] = None, *, scenarios: Optional[list[str]] = None,
               modes: Optional[list[str]] = None, backends: Optional[list[str]] = None,
               precisions: Optional[list[str]] = None, crops: Optional[list] = None, device: str = "auto",
               batch: int = DEFAULT_BATCH, seconds: Optional[float] = None, min_queries: Optional[int] = None,
               official: bool = False, latency_ms: Optional[float] = None, max_wait_ms: Optional[float] = None,
               server_trials: int = SERVER_TRIALS, data=None, images: Optional[int] = None,
               threads: Optional[int] = None, out: Optional[str] = None, train_dir="runs/train",
               export_dir="runs/export", progress: bool = True) -> dict:
    """Run every planned target (checkpoints and exports, as `bench` plans them) under LoadGen.

    ``scenarios``: offline, server, singlestream, multistream (default all); ``modes``: performance,
    accuracy (default both). The QSL is the held-out test images (``images``: at most that many, spread
    over the classes), decoded and resized once. Offline and Server run batches of at most ``batch``
    images; Server's batcher waits at most ``max_wait_ms`` to fill one. Each run lasts ``seconds``
    (default 1 s) and at least ``min_queries`` queries (default: what LoadGen's early stopping needs);
    ``official``: MLPerf's own minimums (10 minutes per run). Server finds the highest VALID rate under
    ``latency_ms`` (default per device and crop mode) in at most ``server_trials`` runs. Accuracy mode's
    top-1 is checked against the eval pipeline on the same images. LoadGen's logs go under ``out``
    (default runs/mlperf/mlperf-<time>/), beside mlperf.json. Returns the report (``ok``: no errors,
    every run VALID, every accuracy equal to eval's).
    """
    asked = {scenario(s).name for s in (scenarios or SCENARIOS)}
    chosen = [name for name in SCENARIOS if name in asked]  # Offline first: Server's search starts from its rate
    run_modes = _check_modes(modes)
    options = _check_options(batch, seconds, min_queries, official, latency_ms, max_wait_ms, server_trials, images)
    loadgen()  # a missing package is one clear line before any model loads
    resolved = resolve_device(device)
    found = find_targets(models, os.fspath(train_dir), os.fspath(export_dir))
    plans, skipped = plan_rows(found, resolved, backends=backends, precisions=precisions, crops=crops)
    if not plans:
        raise InputError("no row to run with these filters on " + resolved
                         + (": " + "; ".join(skipped) if skipped else ""))
    folder = os.path.abspath(out or os.path.join("runs", "mlperf", time.strftime("mlperf-%Y%m%d-%H%M%S")))
    os.makedirs(folder, exist_ok=True)
    session = _Session(resolved, options, chosen, run_modes, server_trials, data, images, threads, folder, progress)
    session.log(f"{len(plans)} target row(s) x {len(chosen)} scenario(s) ({', '.join(run_modes)}) on {resolved}; "
                f"logs under {folder}")
    rows = [row for plan in plans for row in session.run(plan)]
    result = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "ok": all(_row_ok(r) for r in rows),
        "device": resolved,
        "machine": machine_info(torch.device(resolved)),
        "loadgen_version": _loadgen_version(),
        "scenarios": chosen,
        "modes": run_modes,
        "settings": {"batch": batch, "seconds": None if official else options.seconds,
                     "min_queries": None if official else {  # Offline: None, the samples --seconds takes
                         s: options.min_queries or (None if s == "offline" else minimum_queries(SCENARIOS[s]))
                         for s in chosen},
                     "official": official, "latency_ms": latency_ms, "max_wait_ms": max_wait_ms,
                     "server_trials": server_trials, "images": images},
        "rows": rows,
        "skipped": skipped,
        "out": folder,
    }
    result["json"] = str(atomic_write_json(os.path.join(folder, "mlperf.json"), result))
    return result


def _check_modes(modes) -> list[str]:
    modes = list(modes or TEST_MODES)
    unknown = [m for m in modes if m not in TEST_MODES]
    if unknown:
        raise InputError(f"unknown mode(s) {', '.join(map(str, unknown))}; choose from {', '.join(TEST_MODES)}")
    return [m for m in TEST_MODES if m in modes]


def _check_options(batch, seconds, min_queries, official, latency_ms, max_wait_ms, server_trials, images) -> RunOptions:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InputError(f"batch must be a positive number of images, got {batch!r}")
    if official and (seconds is not None or min_queries is not None):
        raise InputError("--official uses MLPerf's own durations and query counts; drop --seconds/--min-queries")
    if seconds is not None and not seconds > 0:
        raise InputError(f"seconds must be > 0, got {seconds}")
    if min_queries is not None and min_queries < 1:
        raise InputError(f"min_queries must be >= 1, got {min_queries}")
    if latency_ms is not None and not latency_ms > 0:
        raise InputError(f"latency_ms (the Server bound) must be > 0, got {latency_ms}")
    if max_wait_ms is not None and max_wait_ms < 0:
        raise InputError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
    if server_trials < 1:
        raise InputError(f"server_trials must be >= 1, got {server_trials}")
    if images is not None and images < 1:
        raise InputError(f"images must be >= 1 (or None for the whole test split), got {images}")
    return RunOptions(seconds=DEFAULT_SECONDS if seconds is None else seconds, min_queries=min_queries,
                      official=official, batch=batch, latency_ms=latency_ms, max_wait_ms=max_wait_ms)


def _row_ok(row: dict) -> bool:
    accuracy = row.get("accuracy")
    return (not row.get("error") and row.get("validity") in (None, "VALID")
            and (accuracy is None or bool(accuracy.get("matches_eval"))))


def _loadgen_version() -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlcommons-loadgen")
    except PackageNotFoundError:
        return None


class _Session:
    """One mlperf command: per target row, its QSL, eval pass, calibration and LoadGen runs."""

    def __init__(self, device, options: RunOptions, scenarios, modes, server_trials, data, images, threads,
                 folder, progress):
        self.device, self.options, self.scenarios, self.modes = device, options, scenarios, modes
        self.server_trials, self.data, self.images, self.threads = server_trials, data, images, threads
        self.folder, self.progress = folder, progress

    def log(self, message: str) -> None:
        if self.progress:
            print(f"[mlperf] {message}", file=sys.stderr, flush=True)

    def run(self, plan: RowPlan) -> list[dict]:
        label = f"{plan.target.name} {plan.backend} {plan.precision} {plan.variant}"
        base = _row_base(plan, self.device, self.options.batch)
        target = None
        try:
            target = _Target(plan, load_row(plan, self.device, self.threads), self.data, self.images, self.options.batch)
            if "accuracy" in self.modes:
                self.log(f"{label}: eval pipeline on the same {target.library.total} images ...")
                target.run_eval()
            self.log(f"{label}: calibrating ...")
            calibration, closed_loop = target.calibrate(self.options.seconds)
        except Exception as exc:  # noqa: BLE001 - one target that cannot load or run must not sink the others
            self.log(f"{label}: FAILED: {exc}")
            target = None  # its model's memory, before the next row loads
            release_memory(self.device)
            return [{**base, "scenario": s, "error": f"{type(exc).__name__}: {exc}"} for s in self.scenarios]
        self.log(f"{label}: closed loop {closed_loop:.2f} img/s (SUT step {calibration.batch_images_per_s:.2f}) at "
                 f"batch {self.options.batch}; one image {1e3 * calibration.single_s:.1f} ms; a MultiStream query "
                 f"{1e3 * calibration.multi_s:.1f} ms")
        logs = os.path.join(self.folder, _slug(label))
        base["calibration"] = {"one_image_ms": 1e3 * calibration.single_s,
                               "multistream_query_ms": 1e3 * calibration.multi_s,
                               "sut_step_images_per_s": calibration.batch_images_per_s,
                               "closed_loop_images_per_s": closed_loop}
        rows = []
        for name in self.scenarios:
            row = {**base, "scenario": name, "error": None}
            try:
                row.update(self._scenario(target, SCENARIOS[name], calibration, closed_loop, os.path.join(logs, name),
                                          label))
            except Exception as exc:  # noqa: BLE001 - recorded in the row, the run goes on
                row["error"] = f"{type(exc).__name__}: {exc}"
                self.log(f"{label} {name}: FAILED: {row['error']}")
            if name == "offline" and row.get("validity") == "VALID":
                # What the SUT sustained under LoadGen: the Server search's simulated start uses it.
                calibration = replace(calibration, batch_images_per_s=row["samples_per_s"])
            rows.append(row)
        del target
        release_memory(self.device)
        return rows

    def _scenario(self, target: "_Target", sc, calibration: Calibration, closed_loop: float, logs: str,
                  label: str) -> dict:
        options = self.options
        bound = options.bound_ms(self.device, target.plan.crops)
        fields: dict = {}
        if "performance" in self.modes:
            if sc.name == "server":
                wait_ms = options.wait_ms(self.device, target.plan.crops)
                fields.update(self._server(target, sc, calibration, bound, wait_ms, logs))
            else:
                fields.update(self._performance(target, sc, calibration, os.path.join(logs, "performance"), bound,
                                                label))
                if sc.name == "offline" and fields.get("samples_per_s"):
                    fields["closed_loop_images_per_s"] = closed_loop
                    fields["loadgen_to_closed_loop"] = fields["samples_per_s"] / closed_loop
            self.log(f"{label} {sc.name}: {_summary(sc.name, fields)}")
        if "accuracy" in self.modes:
            # Server's accuracy run arrives at the closed-loop rate: latency is not judged there, and a slow rate
            # (the search's, or its start on a machine too slow for the bound) only makes every image wait.
            fields["accuracy"] = target.accuracy(sc, options, calibration, os.path.join(logs, "accuracy"),
                                                 bound_ms=bound, server_qps=calibration.batch_images_per_s)
            a = fields["accuracy"]
            self.log(f"{label} {sc.name} accuracy: top-1 {a['top1']:.2f}% (eval {a['eval_top1']:.2f}%, "
                     f"{'equal' if a['matches_eval'] else 'DIFFERENT'})")
        return fields

    def _performance(self, target: "_Target", sc, calibration: Calibration, folder: str, bound: float,
                     label: str) -> dict:
        """One performance run; once more, with the speed it reached as the expectation, when the SUT outpaced
        the calibration so that LoadGen ran out of generated queries (a busy machine during calibration)."""
        result = target.performance(sc, self.options, calibration, folder, bound_ms=bound)
        result["logs"] = folder
        if result["validity"] != "VALID" and result["min_duration_met"] is False:
            self.log(f"{label} {sc.name}: ran faster than calibrated ({result['invalid_reason']}); once more with "
                     "the speed it reached")
            again = recalibrated(sc, calibration, result)
            rerun = target.performance(sc, self.options, again, folder + "-rerun", bound_ms=bound)
            rerun.update(logs=folder + "-rerun",
                         first_run={k: result[k] for k in ("validity", "invalid_reason", "logs")})
            result = rerun
        return result

    def _server(self, target: "_Target", sc, calibration: Calibration, bound: float, wait_ms: float,
                logs: str) -> dict:
        def trial(qps: float) -> dict:
            folder = os.path.join(logs, f"performance-{qps:.4g}qps")
            result = target.performance(sc, self.options, calibration, folder, bound_ms=bound, server_qps=qps,
                                        max_wait_s=wait_ms / 1e3)
            result["logs"] = folder
            return result

        min_queries = self.options.min_queries or minimum_queries(sc)
        seconds = 600.0 if self.options.official else max(self.options.seconds, SERVER_DURATION_BOUNDS * bound / 1e3)
        start = simulated_server_edge(calibration, self.options.batch, bound_s=bound / 1e3, wait_s=wait_ms / 1e3,
                                      percentile=sc.percentile)
        self.log(f"server: searching from {start:.4g} QPS (the calibrated SUT's simulated edge under {bound:g} ms)")
        best, trials, proof = search_server(trial, start, trials=self.server_trials, min_queries=min_queries,
                                            seconds=seconds, log=self.log)
        shown = best or min(trials, key=lambda t: t["target_qps"])
        invalid = [t["target_qps"] for t in trials if t["validity"] != "VALID" and (
            best is None or t["target_qps"] > best["target_qps"])]
        fields = {k: v for k, v in shown.items() if k not in ("target_qps", "wall_s")}
        fields["server"] = {
            "latency_bound_ms": bound, "max_wait_ms": wait_ms, "start_qps": start,
            "target_qps": shown["target_qps"] if best else None,
            "lowest_invalid_qps_above": min(invalid) if invalid else None,
            # MLPerf's proof that the search found the edge: the run at 1.2x the reported QPS (None: not run).
            "edge_proof": None if proof is None else {
                "factor": SERVER_EDGE, "target_qps": proof["target_qps"], "validity": proof["validity"],
                "invalid_reason": proof["invalid_reason"]},
            "trials": [{"target_qps": t["target_qps"], "validity": t["validity"], "invalid_reason": t["invalid_reason"],
                        "p99_ms": t["latency_ms"].get("99.00"), "samples_per_s": t["samples_per_s"],
                        "queries": t["queries"], "wall_s": t["wall_s"], "logs": t["logs"]} for t in trials],
            "search_s": sum(t["wall_s"] for t in trials),
        }
        return fields


class _Target:
    """One target row's predictor, its QSL of held-out images and the eval pipeline's answer on them."""

    def __init__(self, plan: RowPlan, predictor, data, images: Optional[int], batch: int):
        self.plan = plan
        self.predictor = predictor
        held = held_out(data, recorded_split_files(checkpoints=plan.target.sources, manifest=plan.target.manifest),
                        classes=predictor.classes, owner=plan.target.name)
        samples = held.samples("test", images)
        self.held_out = held.describe()
        self.labels = np.asarray([s.label for s in samples], dtype=np.int64)
        self.library = SampleLibrary([s.path for s in samples], predictor.spec)
        self.inference = Inference(predictor, plan.crops, batch)
        self.batch = batch
        self.eval: Optional[dict] = None

    def run_eval(self) -> None:
        """The project's eval pipeline (runtime.run_files, host preprocessing: the pixels the QSL holds) on
        the QSL's images: the logits accuracy mode must reproduce."""
        run = runtime.run_files(self.predictor, self.library.paths, crops=self.plan.crops, batch=self.batch,
                                workers=0, preprocess="host")
        self.eval = {"logits": run.logits.numpy(), "positions": list(run.positions)}

    def calibrate(self, seconds: float) -> tuple[Calibration, float]:
        """The SUT step (crops cut, model, logits to the host) timed for one image, a MultiStream query and a
        batch, and the bench's closed-loop compute-mode rate at the batch (bench.modes.measure_compute: the
        model alone on pre-cut crops, the number Offline is compared with)."""
        count = min(self.library.total, max(self.batch, SCENARIOS["multistream"].samples_per_query))
        indices = list(range(count))
        self.library.load(indices)
        images = self.library.batch(indices)
        self.library.unload(indices)
        step_s = {}
        for n in sorted({1, SCENARIOS["multistream"].samples_per_query, self.batch}):
            x = cycled(images, n)
            timing = measure(lambda x=x: self.inference.logits(x), seconds=CALIBRATION_SECONDS,
                             warmup=CALIBRATION_WARMUP, device=self.predictor.device)
            step_s[n] = timing.summary()["p50_ms"] / 1e3
        compute = measure_compute(self.predictor, images, self.batch, self.plan.crops, seconds=seconds,
                                  warmup=CALIBRATION_WARMUP).summary()
        closed_loop = self.batch / (compute["mean_ms"] / 1e3)
        return Calibration(single_s=step_s[1], multi_s=step_s[SCENARIOS["multistream"].samples_per_query],
                           batch_images_per_s=self.batch / step_s[self.batch]), closed_loop

    def performance(self, sc, options: RunOptions, calibration: Calibration, folder: str, *, bound_ms: float,
                    server_qps: Optional[float] = None, max_wait_s: float = 0.0) -> dict:
        settings = loadgen_settings(sc, "performance", options, calibration, bound_ms=bound_ms, server_qps=server_qps)
        sut = BatchingSUT(self.inference, self.library, max_wait_s=max_wait_s)
        run_test(sut, self.library, settings, folder)
        result = performance_result(*read_detail(folder))
        result["batches"] = sut.batches
        return result

    def accuracy(self, sc, options: RunOptions, calibration: Calibration, folder: str, *, bound_ms: float,
                 server_qps: float) -> dict:
        """Accuracy mode: every QSL image once; top-1/top-5 from LoadGen's accuracy log (the logits the SUT
        answered), checked against the eval pipeline's on the same images."""
        settings = loadgen_settings(sc, "accuracy", options, calibration, bound_ms=bound_ms, server_qps=server_qps)
        run_test(BatchingSUT(self.inference, self.library), self.library, settings, folder)
        logits, missing = read_accuracy_log(folder, self.library.total)
        failed = set(self.library.failures)
        scored = [i for i in range(self.library.total) if i not in failed and i not in set(missing)]
        classes = len(self.predictor.classes)
        report = accuracy_report(logits[scored], self.labels[scored], num_classes=classes)
        positions = self.eval["positions"]
        reference = accuracy_report(self.eval["logits"], self.labels[positions], num_classes=classes)
        eval_top1 = dict(zip(positions, np.argmax(self.eval["logits"], axis=1)))
        common = [i for i in scored if i in eval_top1]
        differ = int(sum(int(np.argmax(logits[i])) != int(eval_top1[i]) for i in common))
        return {
            "images": len(scored), "top1": report["top1"], "top5": report["top5"],
            "eval_images": len(positions), "eval_top1": reference["top1"], "eval_top5": reference["top5"],
            "predictions_differ": differ,
            "matches_eval": scored == sorted(positions) and report["top1"] == reference["top1"] and differ == 0,
            "not_logged": missing, "unreadable": [{"path": self.library.paths[i], "error": e}
                                                  for i, e in sorted(self.library.failures.items())],
            "held_out": self.held_out, "logs": folder,
        }


def _row_base(plan: RowPlan, device: str, batch: int) -> dict:
    target = plan.target
    return {"target": target.name, "kind": target.kind, "source": target.path, "backend": plan.backend,
            "precision": plan.precision, "variant": plan.variant, "device": device, "crops": plan.crops,
            "batch": batch}


def _summary(name: str, fields: dict) -> str:
    verdict = fields.get("validity", "?")
    if name == "offline":
        what = f"{fields.get('samples_per_s') or 0:.2f} samples/s"
        if fields.get("loadgen_to_closed_loop"):
            what += (f" ({fields['loadgen_to_closed_loop']:.2f}x the closed loop's "
                     f"{fields['closed_loop_images_per_s']:.2f} img/s at the same batch)")
    elif name == "server":
        qps = fields["server"]["target_qps"]
        proof = fields["server"]["edge_proof"]
        what = (f"{qps:.4g} QPS under {fields['server']['latency_bound_ms']:g} ms; 1.2x "
                + (f"({proof['target_qps']:.4g} QPS) {proof['validity']}" if proof else "not run")) if qps else \
            "no VALID rate"
    elif name == "singlestream":
        what = f"p90 {fields['latency_ms'].get('90.00', float('nan')):.2f} ms"
    else:
        what = f"p99 per query {fields['query_latency_ms'].get('99.00', float('nan')):.2f} ms"
    reason = f" ({fields['invalid_reason']})" if fields.get("invalid_reason") else ""
    return f"{verdict} {what}{reason}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")
