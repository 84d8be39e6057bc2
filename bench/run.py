"""`run_bench`: every target x backend x precision measured side by side, with accuracy and agreement."""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

import numpy as np
import torch

import runtime
from common.errors import InputError
from bench import report
from bench.evalset import EvalSet, find_held_out, load_evalset
from bench.harness import CV_WARN, DEFAULT_SECONDS, release_memory
from bench.machine import PeakMemory, load_average, machine_info
from bench.modes import (cycled, eval_logits, host_preprocess_cost, measure_compute, measure_end_to_end)
from bench.peak import peak_flops
from bench.targets import Model, RowPlan, find_models, plan_rows
from common import accuracy_report
from models.checkpoint import load_checkpoint
from models.complexity import model_flops
from common.device import ieee_fp32, resolve_device

MODES = ("compute", "end-to-end", "both")
CROPS = 10
DEFAULT_EVAL_IMAGES = 1000


def run_bench(models: Optional[list[str]] = None, *, batch: int = 64, backends: Optional[list[str]] = None,
              precisions: Optional[list[str]] = None, device: str = "auto", mode: str = "compute",
              seconds: Optional[float] = None, iters: Optional[int] = None, warmup: int = 3, data=None,
              out: Optional[str] = None, compare: Optional[str] = None, train_dir="runs/train",
              export_dir="runs/export", progress: bool = True, compile: bool = False,
              eval_images: Optional[int] = DEFAULT_EVAL_IMAGES, threads: Optional[int] = None,
              workers: Optional[int] = None) -> dict:
    """Benchmark checkpoints (PyTorch) and exports (ONNX Runtime, TensorRT) on one device.

    ``batch`` counts images, each ten crops. ``mode``: compute (pre-resized inputs on the device,
    model only), end-to-end (image files through runtime.run_files) or both. Timing: ``iters``
    iterations or ``seconds`` (default 5 s) after ``warmup``. Accuracy and agreement use at most
    ``eval_images`` test images (None: all) of each model's saved split, or of ``data`` (a split.json,
    or a data folder whose seed-0 split is used, as runtime.evaluate does). ``compile`` adds
    torch.compile rows (and CUDA graphs on a GPU); ``threads`` is passed to runtime.load, ``workers``
    (the end-to-end pipeline's decoding processes) to runtime.run_files.
    Writes ``out`` (default runs/bench/bench-<time>.json) plus .csv and .png beside it.
    Returns the report: rows, machine, measured peaks, skipped targets, warnings, comparison.
    """
    _check_arguments(batch, mode, seconds, iters, warmup, eval_images)
    resolved = resolve_device(device)
    old_report = report.load_report(os.fspath(compare)) if compare else None
    found = find_models(models, os.fspath(train_dir), os.fspath(export_dir))
    plans, skipped = plan_rows(found, resolved, backends=backends, precisions=precisions, compile=compile)
    if not plans:
        raise InputError("no row to measure with these filters on " + resolved
                         + (": " + "; ".join(skipped) if skipped else ""))
    modes = ["compute", "end-to-end"] if mode == "both" else [mode]
    load_at_start = load_average()
    session = _Session(resolved, batch, data, eval_images, dict(iters=iters, seconds=seconds, warmup=warmup),
                       threads, workers, progress)
    session.log(f"{len(plans)} configuration(s) x {len(modes)} mode(s) on {resolved}, batch {batch} images x {CROPS} crops")
    rows = [row for plan in plans for row in session.measure(plan, modes)]
    _add_speedups(rows)
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
        "peaks": session.peaks,
        "eval_sets": session.describe_eval_sets(),
        "eval_images_note": session.eval_note(),
        "rows": rows,
        "skipped": skipped,
        "warnings": (_busy_machine_warning(load_at_start) + _stability_warnings(rows) + _above_peak_warnings(rows)
                     + [f"{r['target']} {r['backend']} {r['precision']}: {r['note']}" for r in rows if r.get("note")]),
    }
    if old_report is not None:
        result["comparison"] = report.compare_rows(rows, old_report, os.fspath(compare))
    _write_outputs(result, out, session)
    return result


def _check_arguments(batch, mode, seconds, iters, warmup, eval_images) -> None:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InputError(f"batch must be a positive number of images, got {batch!r}")
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if seconds is not None and iters is not None:
        raise InputError("give --seconds or --iters, not both")
    if iters is not None and iters < 1:
        raise InputError(f"iters must be at least 1, got {iters}")
    if seconds is not None and seconds <= 0:
        raise InputError(f"seconds must be positive, got {seconds}")
    if warmup < 0:
        raise InputError(f"warmup must be >= 0, got {warmup}")
    if eval_images is not None and eval_images < 1:
        raise InputError(f"eval_images must be positive (or None for the whole test split), got {eval_images}")


class _Session:
    """One bench run's shared state: test images, reference logits, FLOP counts and peaks."""

    def __init__(self, device: str, batch: int, data, eval_images, timing: dict, threads, workers, progress: bool):
        self.device = device
        self.batch = batch
        self.data = data
        self.eval_limit = eval_images
        self.timing = timing
        self.threads = threads
        self.workers = workers
        self.progress = progress
        self.peaks: dict[str, dict] = {}
        self._eval_sets: dict[Optional[str], EvalSet] = {}
        self._eval_keys: dict[str, Optional[str]] = {}
        self._source_logits: dict[tuple, np.ndarray] = {}
        self._references: dict[tuple, tuple[Optional[np.ndarray], str]] = {}
        self._flops: dict[str, Optional[int]] = {}
        self._compute_p50_s: dict[RowPlan, float] = {}

    def log(self, message: str) -> None:
        if self.progress:
            print(f"[bench] {message}", file=sys.stderr, flush=True)

    # --- one configuration -----------------------------------------------------------------------
    def measure(self, plan: RowPlan, modes: list[str]) -> list[dict]:
        label = f"{plan.model.name} {plan.backend} {plan.precision} {plan.variant}"
        try:
            predictor = self._load(plan)
            evalset = self.eval_set(plan.model)
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
            timing = measure_compute(predictor, images, self.batch, **self.timing)
        stats = timing.summary()
        self._compute_p50_s[plan] = stats["p50_ms"] / 1e3
        logits = eval_logits(predictor, images, self.batch) if evalset.has_files else None
        if logits is not None and plan.model.kind == "checkpoint" and plan.is_baseline:
            self._source_logits[(plan.model.path, self._evalset_key(evalset))] = logits
        row = self._row(plan, "compute", stats=stats, memory=memory.result())
        row.update(self._split_calls_note(predictor))
        row.update(self._scores(plan.model, predictor, evalset, logits, positions=None))
        return row

    def _end_to_end_row(self, plan: RowPlan, predictor, evalset: EvalSet) -> dict:
        if not evalset.has_files:
            raise InputError(f"end-to-end mode reads image files, and there are none: {evalset.description}; "
                             "pass --data FOLDER")
        paths = evalset.paths
        estimate = self._compute_p50_s.get(plan) or self._probe_batch_seconds(predictor, evalset)
        with PeakMemory(torch.device(self.device)) as memory:
            timing = measure_end_to_end(predictor, paths, self.batch, iters=self.timing["iters"],
                                        seconds=self.timing["seconds"], warmup=self.timing["warmup"],
                                        batch_estimate_s=estimate, workers=self.workers)
        scored = runtime.run_files(predictor, paths, crops=CROPS, batch=self.batch, workers=self.workers)
        row = self._row(plan, "end-to-end", stats=timing.summary(), memory=memory.result())
        row.update(self._split_calls_note(predictor))
        row.update(timing.extra)
        row.update(host_preprocess_cost(paths, predictor.spec, self.batch))
        row["preprocess"] = scored.preprocess
        row.update(self._scores(plan.model, predictor, evalset, scored.logits.numpy(), positions=scored.positions))
        if scored.failures:
            row["failed_images"] = [{"path": paths[p], "error": reason} for p, reason in scored.failures]
        return row

    def _split_calls_note(self, predictor) -> dict:
        """Say so when the runtime has to cut a batch into several graph calls (a TensorRT profile's limit)."""
        limit = predictor.max_batch
        per_batch = self.batch if predictor.ten_crop_in_graph else CROPS * self.batch
        if limit is None or per_batch <= limit:
            return {}
        return {"note": f"the engine takes at most {limit} rows per call, so each batch of {per_batch} rows "
                        f"ran as {-(-per_batch // limit)} calls (export with a larger max batch to avoid it)"}

    def _probe_batch_seconds(self, predictor, evalset: EvalSet) -> float:
        """One untimed model call, to size the end-to-end file list when no compute row preceded it."""
        images = cycled(evalset.images(predictor.spec), self.batch)
        began = time.perf_counter()
        predictor.logits_from_images(images)
        return time.perf_counter() - began

    # --- row assembly ------------------------------------------------------------------------------
    def _row(self, plan: RowPlan, mode: str, *, stats: Optional[dict] = None, memory: Optional[dict] = None,
             error: Optional[str] = None) -> dict:
        model = plan.model
        row = {
            "target": model.name, "kind": model.kind, "source": model.path, "backend": plan.backend,
            "precision": plan.precision, "variant": plan.variant, "device": self.device, "mode": mode,
            "batch": self.batch, "crops_per_image": CROPS,
            "ten_crop_in_graph": bool(model.manifest and model.manifest.get("ten_crop_in_graph")),
            "error": error,
        }
        # Private keys for _add_speedups, removed before the report is written.
        row["_reference_key"], row["_is_baseline"] = model.reference_key, plan.is_baseline
        if stats is None:
            return row
        images_per_s = self.batch / (stats["mean_ms"] / 1e3)
        row.update({
            "images_per_s": images_per_s,
            "crops_per_s": CROPS * images_per_s,
            **{k: stats[k] for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "stddev_ms", "min_ms", "max_ms",
                                     "cv", "iterations", "warmup")},
            "unstable": bool(stats["cv"] > CV_WARN),
            **(memory or {}),
        })
        row.update(self._flops_fields(plan, images_per_s))
        return row

    def _flops_fields(self, plan: RowPlan, images_per_s: float) -> dict:
        per_image = self.flops_per_image(plan.model)
        peak = self.peak(plan.precision)
        achieved = None if per_image is None else per_image * images_per_s
        return {
            "flops_per_image": per_image,
            "achieved_flops_per_s": achieved,
            "peak_flops_per_s": peak["flops"],
            "peak_precision": plan.precision,
            "peak_fraction": achieved / peak["flops"] if achieved is not None and peak["flops"] else None,
        }

    def _scores(self, model: Model, predictor, evalset: EvalSet, logits, positions) -> dict:
        """Top-1/top-5 against the labels and top-1 agreement against the reference, same images."""
        scores = {"eval_images": None, "top1": None, "top5": None, "agreement_top1": None, "reference": None}
        if logits is None:
            scores["reference"] = f"none: {evalset.description}"
            return scores
        index = np.arange(len(logits)) if positions is None else np.asarray(positions, dtype=np.int64)
        scores["eval_images"] = int(len(logits))
        labels = evalset.labels_for(predictor.classes)
        if labels is not None:
            accuracy = accuracy_report(logits, labels[index], num_classes=len(predictor.classes))
            scores["top1"], scores["top5"] = accuracy["top1"], accuracy["top5"]
        reference, description = self.reference(model, evalset)
        scores["reference"] = description
        if reference is not None:
            agree = np.argmax(logits, axis=1) == np.argmax(reference[index], axis=1)
            scores["agreement_top1"] = float(100 * agree.mean())
        return scores

    # --- shared, cached measurements -------------------------------------------------------------
    def eval_set(self, model: Model) -> EvalSet:
        if model.path not in self._eval_keys:
            held, why_none = find_held_out(model, self.data)
            key = held.path if held is not None else None
            self._eval_keys[model.path] = key
            if key not in self._eval_sets:
                self._eval_sets[key] = load_evalset(held, why_none, self.eval_limit)
        return self._eval_sets[self._eval_keys[model.path]]

    def reference(self, model: Model, evalset: EvalSet) -> tuple[Optional[np.ndarray], str]:
        """The fp32 reference logits of ``model`` on ``evalset`` and what they are."""
        key = (model.reference_key, id(evalset))
        if key not in self._references:
            self._references[key] = self._compute_reference(model, evalset)
        return self._references[key]

    def _compute_reference(self, model: Model, evalset: EvalSet) -> tuple[Optional[np.ndarray], str]:
        if model.sources and not model.missing_sources:
            logits = sum(self._torch_fp32_logits(source, evalset) for source in model.sources)
            what = "torch fp32 eager" if len(model.sources) == 1 else "sum of the members' torch fp32 logits"
            return logits, what
        if model.manifest is None:
            return None, "none"
        why = "; ".join(model.missing_sources) or "no source checkpoints listed"
        if not any(a["format"] == "onnx" and a["precision"] == "fp32" for a in model.manifest["artifacts"]):
            return None, f"none (no fp32 ONNX graph, and {why})"
        device = self.device if _ort_runs_on(self.device) else "cpu"
        self.log(f"{model.name}: reference from its fp32 ONNX graph on {device} ({why})")
        predictor = runtime.load(model.path, backend="onnxruntime", device=device, precision="fp32",
                                 threads=self.threads)
        return eval_logits(predictor, evalset.images(predictor.spec), self.batch), f"fp32 ONNX on {device} ({why})"

    def _torch_fp32_logits(self, checkpoint: str, evalset: EvalSet) -> np.ndarray:
        key = (checkpoint, self._evalset_key(evalset))
        if key not in self._source_logits:
            self.log(f"reference logits of {checkpoint} (torch fp32 eager on {self.device})")
            predictor = runtime.load(checkpoint, backend="torch", device=self.device, precision="fp32",
                                     threads=self.threads)
            self._source_logits[key] = eval_logits(predictor, evalset.images(predictor.spec), self.batch)
        return self._source_logits[key]

    def _evalset_key(self, evalset: EvalSet) -> Optional[str]:
        return next(k for k, v in self._eval_sets.items() if v is evalset)

    def flops_per_image(self, model: Model) -> Optional[int]:
        """10 x forward FLOPs of one crop, summed over an ensemble's members; None without checkpoints."""
        if not model.sources or model.missing_sources:
            return None
        total = 0
        for source in model.sources:
            if source not in self._flops:
                network, meta = load_checkpoint(source)
                self._flops[source] = model_flops(network, meta["spec"]["crop"])
            total += self._flops[source]
        return CROPS * total

    def peak(self, precision: str) -> dict:
        if precision not in self.peaks:
            self.log(f"measuring the {precision} matmul peak on {self.device}")
            with ieee_fp32():
                self.peaks[precision] = peak_flops(precision, torch.device(self.device))
        return self.peaks[precision]

    def _load(self, plan: RowPlan):
        model = plan.model
        if model.kind == "checkpoint":
            return runtime.load(model.path, backend="torch", device=self.device, precision=plan.precision,
                                channels_last=plan.channels_last, compile=plan.compile, threads=self.threads)
        if plan.backend == "torch":
            return _torch_ensemble(model, self.device)
        return runtime.load(model.path, backend=plan.backend, device=self.device, precision=plan.precision,
                            threads=self.threads)

    def describe_eval_sets(self) -> list[dict]:
        return [{"source": key, "description": s.description, "images": len(s.paths) if s.has_files else 0,
                 "test_images": s.total, "skipped": [{"path": p, "error": e} for p, e in s.skipped]}
                for key, s in self._eval_sets.items()]

    def eval_note(self) -> str:
        notes = [f"{len(s.paths)} of {s.total} images of the {s.description}" if s.has_files else s.description
                 for s in self._eval_sets.values()]
        return "; ".join(notes) or "n/a"


def _torch_ensemble(model: Model, device: str):
    """The PyTorch fp32 logit-sum of an ensemble export's member checkpoints, as a runtime Predictor."""
    from models.ensemble import Ensemble
    from runtime.torch_backend import TorchPredictor

    members = [load_checkpoint(source)[0] for source in model.sources]
    manifest = model.manifest
    meta = {"arch": "ensemble", "spec": manifest["spec"], "classes": manifest["classes"], "record": {}}
    return TorchPredictor(Ensemble(members).eval(), meta, source=model.path, device=device, precision="fp32")


def _ort_runs_on(device: str) -> bool:
    from bench.targets import backend_problem

    return backend_problem("onnxruntime", device) is None


def _add_speedups(rows: list[dict]) -> None:
    """Each row's images/s over its model's PyTorch eager fp32 row (same mode, batch and device)."""
    baselines = {(row["_reference_key"], row["mode"]): row
                 for row in rows if row["_is_baseline"] and row.get("images_per_s")}
    for row in rows:
        del row["_is_baseline"]
        baseline = baselines.get((row.pop("_reference_key"), row["mode"]))
        row["speedup"] = (row["images_per_s"] / baseline["images_per_s"]
                          if baseline is not None and row.get("images_per_s") else None)
        row["speedup_vs"] = (f"{baseline['target']} torch fp32 eager" if baseline is not None else None)


def _busy_machine_warning(load: Optional[float]) -> list[str]:
    cores = os.cpu_count() or 1
    if load is None or load < cores:
        return []
    return [f"the machine was busy when the bench started (1-minute load average {load:.1f} on {cores} cores): "
            "other processes compete for the cores, so these timings understate what the machine can do"]


def _above_peak_warnings(rows: list[dict]) -> list[str]:
    """A model faster than the matmul peak means the peak kernels were slowed (a busy machine) or are
    weaker than the backend's own: the fraction is then only a relative figure."""
    above = [f"{r['target']} {r['backend']} {r['precision']} {r['variant']} {r['mode']} "
             f"({100 * r['peak_fraction']:.0f}%)" for r in rows if (r.get("peak_fraction") or 0) > 1]
    if not above:
        return []
    return ["achieved FLOP/s above the measured matmul peak in " + "; ".join(above)
            + ": the peak was measured low (a busy machine, or kernels slower than the backend's own)"]


def _stability_warnings(rows: list[dict]) -> list[str]:
    noisy = [f"{r['target']} {r['backend']} {r['precision']} {r['variant']} {r['mode']} ({100 * r['cv']:.0f}%)"
             for r in rows if r.get("unstable")]
    if not noisy:
        return []
    return [f"CV above {100 * CV_WARN:.0f}% (marked ! in the table) in {len(noisy)} row(s): the timings are noisy "
            "(a busy machine or too few iterations); rerun with more --seconds or --iters: " + "; ".join(noisy)]


def _write_outputs(result: dict, out: Optional[str], session: _Session) -> None:
    """JSON, CSV and PNG (all atomic); a chart that cannot be drawn is a warning, not a lost run."""
    json_path = os.fspath(out) if out else report.default_out_path()
    stem = json_path[:-5] if json_path.endswith(".json") else json_path
    result["json"], result["csv"], result["png"] = json_path, stem + ".csv", stem + ".png"
    report.write_csv(result["csv"], result["rows"])
    try:
        report.write_chart(result["png"], result)
    except Exception as exc:  # noqa: BLE001 - the numbers matter more than the picture
        result["png"] = None
        result["warnings"].append(f"chart not written: {type(exc).__name__}: {exc}")
    report.write_json(json_path, result)
    session.log(f"wrote {json_path}, {result['csv']}" + (f", {result['png']}" if result["png"] else ""))


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}"
