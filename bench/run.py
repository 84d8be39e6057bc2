"""`run_bench`: every target x backend x precision measured side by side, with accuracy and agreement.

The jobs, one module each: plan the rows (bench.targets), time them (bench.modes, bench.harness),
score accuracy and agreement (bench.scores), put speed in FLOPs (bench.costs), conclude and write
files (bench.summary). This module runs them in order and assembles each row.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from cnnbench import runtime
from cnnbench.bench import report
from cnnbench.bench.costs import Costs
from cnnbench.bench.evalset import EvalSet
from cnnbench.bench.harness import CV_WARN, DEFAULT_SECONDS, Budget, check_warmup, release_memory
from cnnbench.bench.machine import PeakMemory, load_average, machine_info
from cnnbench.bench.modes import cycled, eval_logits, host_preprocess_cost, measure_compute, measure_end_to_end
from cnnbench.bench.scores import Scores
from cnnbench.bench.summary import add_speedups, output_path, record_backend_choices, warnings, write_outputs
from cnnbench.bench.targets import RowPlan, find_targets, load_row, plan_rows
from cnnbench.common.device import resolve_device
from cnnbench.common.errors import InputError
from cnnbench.data.crops import TEN, crop_mode

MODES = ("compute", "end-to-end", "both")
CROPS = TEN.count
DEFAULT_EVAL_IMAGES = 1000


def run_bench(models: Optional[list[str]] = None, *, batch: int = 64, backends: Optional[list[str]] = None,
              precisions: Optional[list[str]] = None, device: str = "auto", mode: str = "compute",
              seconds: Optional[float] = None, iters: Optional[int] = None, warmup: int = 3, data=None,
              out: Optional[str] = None, compare: Optional[str] = None, train_dir="runs/train",
              export_dir="runs/export", progress: bool = True, compile: bool = False,
              eval_images: Optional[int] = DEFAULT_EVAL_IMAGES, threads: Optional[int] = None,
              workers: Optional[int] = None, crops: Optional[list] = None) -> dict:
    """Benchmark checkpoints (PyTorch) and exports (ONNX Runtime, OpenVINO, TensorRT) on one device.

    ``batch`` counts images, each ten crops. ``mode``: compute (pre-resized inputs on the device,
    model only), end-to-end (image files through runtime.run_files) or both. Timing: ``iters``
    iterations or ``seconds`` (default 5 s) after ``warmup``. Accuracy and agreement use at most
    ``eval_images`` test images (None: all) of each model's saved split, or of ``data`` (a split.json,
    or a data folder whose seed-0 split is used, as runtime.evaluate does). ``compile`` adds
    torch.compile rows (and CUDA graphs on a GPU); ``threads`` is passed to runtime.load, ``workers``
    (the end-to-end pipeline's decoding processes) to runtime.run_files. ``crops``: the crop modes to
    measure ("10", "1", "dense"; bench.targets.plan_rows says the default). Every row's agreement is
    against the exact ten-crop PyTorch fp32 reference, whatever its own crop mode.
    Every row with logits is checked against its precision's parity gates (bench.scores); on the CPU
    each export's fastest verified backend per precision is recorded beside its manifest for
    ``--backend auto`` (runtime.selection; ``backend_choices`` in the report).
    Writes ``out`` (default runs/bench/bench-<time>.json) plus .csv and .png beside it.
    Returns the report: rows, machine, measured peaks, skipped targets, warnings, comparison.
    """
    _check_arguments(batch, mode, seconds, iters, warmup, eval_images)
    resolved = resolve_device(device)
    old_report = report.load_report(os.fspath(compare)) if compare else None
    found = find_targets(models, os.fspath(train_dir), os.fspath(export_dir))
    plans, skipped = plan_rows(found, resolved, backends=backends, precisions=precisions, compile=compile, crops=crops)
    if not plans:
        raise InputError("no row to measure with these filters on " + resolved
                         + (": " + "; ".join(skipped) if skipped else ""))
    modes = ["compute", "end-to-end"] if mode == "both" else [mode]
    load_at_start = load_average()
    session = _Session(resolved, batch, dict(iters=iters, seconds=seconds, warmup=warmup), threads, workers, progress,
                       Scores(resolved, batch, data, eval_images, threads, progress), Costs(resolved, progress))
    session.log(f"{len(plans)} configuration(s) x {len(modes)} mode(s) on {resolved}, batch {batch} images x {CROPS} crops")
    measured = [(plan, row) for plan in plans for row in session.measure(plan, modes)]
    add_speedups(measured)
    rows = [row for _, row in measured]
    rows.sort(key=lambda r: modes.index(r["mode"]))  # stable: one block per mode, in plan order
    result = {
        "schema_version": report.SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "ok": all(not r.get("error") for r in rows),
        "device": resolved,
        "batch": batch,
        "crops_per_image": CROPS,
        "mode": mode,
        "iters": iters,
        "seconds": None if iters is not None else (seconds or DEFAULT_SECONDS),
        "warmup": warmup,
        "machine": {**machine_info(torch.device(resolved)), "load_average_1m_at_start": load_at_start},
        "peaks": session.costs.peaks,
        "eval_sets": session.scores.describe_eval_sets(),
        "eval_images_note": session.scores.eval_note(),
        "rows": rows,
        "skipped": skipped,
        "warnings": warnings(rows, load_at_start),
    }
    if old_report is not None:
        result["comparison"] = report.compare_rows(rows, old_report, os.fspath(compare))
    out = output_path(out)
    if resolved == "cpu":  # `--backend auto` on the CPU reads these records (runtime.selection)
        result["backend_choices"] = record_backend_choices(measured, resolved, out, threads)
    write_outputs(result, out, session.log)
    return result


def _check_arguments(batch, mode, seconds, iters, warmup, eval_images) -> None:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InputError(f"batch must be a positive number of images, got {batch!r}")
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    Budget(iters, seconds)  # checks them before any model loads
    check_warmup(warmup)
    if eval_images is not None and eval_images < 1:
        raise InputError(f"eval_images must be positive (or None for the whole test split), got {eval_images}")


@dataclass
class _Session:
    """One bench run: loads each planned predictor, times it in each mode and assembles its rows."""

    device: str
    batch: int
    timing: dict                     # iters, seconds, warmup for bench.harness
    threads: Optional[int]
    workers: Optional[int]
    progress: bool
    scores: Scores
    costs: Costs
    _compute_p50_s: dict = field(default_factory=dict)  # RowPlan -> its compute row's p50, sizes end-to-end runs

    def log(self, message: str) -> None:
        if self.progress:
            print(f"[bench] {message}", file=sys.stderr, flush=True)

    # --- one configuration -----------------------------------------------------------------------
    def measure(self, plan: RowPlan, modes: list[str]) -> list[dict]:
        label = f"{plan.target.name} {plan.backend} {plan.precision} {plan.variant}"
        try:
            predictor = load_row(plan, self.device, self.threads)
            evalset = self.scores.eval_set(plan.target)
        except Exception as exc:  # noqa: BLE001 - one target that cannot load must not sink the table
            self.log(f"{label}: cannot load: {exc}")
            return [self._row(plan, m, error=f"{type(exc).__name__}: {exc}") for m in modes]
        rows = []
        try:
            for mode in modes:
                self.log(f"{label}: {mode} ...")
                try:
                    row = (self._compute_row if mode == "compute" else self._end_to_end_row)(plan, predictor, evalset)
                except Exception as exc:  # noqa: BLE001 - recorded in the row, the run goes on
                    row = self._row(plan, mode, error=f"{type(exc).__name__}: {exc}")
                    self.log(f"{label} {mode}: FAILED: {row['error']}")
                else:
                    self.log(f"{label} {mode}: {row['images_per_s']:.2f} img/s, p50 {row['p50_ms']:.1f} ms, "
                             f"CV {100 * row['cv']:.1f}%, agreement {_fmt(row['agreement_top1'])}%")
                rows.append(row)
        finally:
            del predictor
            release_memory(self.device)
        return rows

    def _compute_row(self, plan: RowPlan, predictor, evalset: EvalSet) -> dict:
        images = evalset.images(predictor.spec)
        with PeakMemory(torch.device(self.device)) as memory:
            timing = measure_compute(predictor, images, self.batch, plan.crops, **self.timing)
        stats = timing.summary()
        self._compute_p50_s[plan] = stats["p50_ms"] / 1e3
        logits = eval_logits(predictor, images, self.batch, plan.crops) if evalset.has_files else None
        if logits is not None and plan.target.kind == "checkpoint" and plan.is_baseline:
            self.scores.remember_baseline(plan.target, evalset, logits)
        row = self._row(plan, "compute", stats=stats, memory=memory.result(), units=predictor.units_precision)
        row.update(self._split_calls_note(predictor, plan))
        row.update(self.scores.score(plan.target, predictor, evalset, logits, positions=None, crops=plan.crops,
                                     precision=plan.precision))
        return row

    def _end_to_end_row(self, plan: RowPlan, predictor, evalset: EvalSet) -> dict:
        if not evalset.has_files:
            raise InputError(f"end-to-end mode reads image files, and there are none: {evalset.description}; "
                             "pass --data FOLDER")
        paths = evalset.paths
        estimate = self._compute_p50_s.get(plan) or self._probe_batch_seconds(predictor, evalset, plan.crops)
        with PeakMemory(torch.device(self.device)) as memory:
            timing = measure_end_to_end(predictor, paths, self.batch, crops=plan.crops, iters=self.timing["iters"],
                                        seconds=self.timing["seconds"], warmup=self.timing["warmup"],
                                        batch_estimate_s=estimate, workers=self.workers)
        scored = runtime.run_files(predictor, paths, crops=plan.crops, batch=self.batch, workers=self.workers)
        row = self._row(plan, "end-to-end", stats=timing.summary(), memory=memory.result(),
                        units=predictor.units_precision)
        row.update(self._split_calls_note(predictor, plan))
        row.update(timing.extra)
        row.update(host_preprocess_cost(paths, predictor.spec, self.batch))
        row["preprocess"] = scored.preprocess
        row.update(self.scores.score(plan.target, predictor, evalset, scored.logits.numpy(), positions=scored.positions,
                                     crops=plan.crops, precision=plan.precision))
        if scored.failures:
            row["failed_images"] = [{"path": paths[p], "error": reason} for p, reason in scored.failures]
        return row

    def _split_calls_note(self, predictor, plan: RowPlan) -> dict:
        """Say so when the runtime has to cut a batch into several graph calls (a TensorRT profile's limit)."""
        limit = predictor.max_batch
        mode = crop_mode(plan.crops)
        per_batch = self.batch if predictor.ten_crop_in_graph or not mode.cuts_crops else mode.count * self.batch
        if limit is None or per_batch <= limit:
            return {}
        return {"note": f"the engine takes at most {limit} rows per call, so each batch of {per_batch} rows "
                        f"ran as {-(-per_batch // limit)} calls (export with a larger max batch to avoid it)"}

    def _probe_batch_seconds(self, predictor, evalset: EvalSet, crops: str) -> float:
        """One untimed model call, to size the end-to-end file list when no compute row preceded it."""
        images = cycled(evalset.images(predictor.spec), self.batch)
        began = time.perf_counter()
        predictor.logits_from_images(images, crops)
        return time.perf_counter() - began

    # --- row assembly ------------------------------------------------------------------------------
    def _row(self, plan: RowPlan, mode: str, *, stats: Optional[dict] = None, memory: Optional[dict] = None,
             error: Optional[str] = None, units: Optional[str] = None) -> dict:
        """One row; ``units``: the precision of the matrix units the predictor computes with (its %peak's)."""
        target = plan.target
        row = {
            "target": target.name, "kind": target.kind, "source": target.path, "backend": plan.backend,
            "precision": plan.precision, "variant": plan.variant, "device": self.device, "mode": mode,
            "batch": self.batch, "crops": plan.crops, "crops_per_image": crop_mode(plan.crops).count,
            "ten_crop_in_graph": bool(target.manifest and target.manifest.get("ten_crop_in_graph")),
            "error": error,
        }
        if stats is None:
            return row
        images_per_s = self.batch / (stats["mean_ms"] / 1e3)
        row.update({
            "images_per_s": images_per_s,
            "crops_per_s": crop_mode(plan.crops).count * images_per_s,
            **{k: stats[k] for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "stddev_ms", "min_ms", "max_ms",
                                     "cv", "iterations", "warmup")},
            "unstable": bool(stats["cv"] > CV_WARN),
            **(memory or {}),
        })
        row.update(self.costs.row_fields(target, units or plan.precision, images_per_s, plan.crops))
        return row


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}"
