"""The export command: checkpoints (and their logit-sum ensemble) to verified ONNX / TensorRT exports.

For each export folder ``<out>/<name>/``: ``model.onnx`` (+ ``model_fp16.onnx``, + ``model_int8.onnx``
quantised from model.onnx, see export/int8.py), a TensorRT plan per graph when TensorRT is built,
``cam_weights.npz`` with ``cam_output``, and ``manifest.json`` written last (atomically) with the hashes of all of them and the parity report.
"""
from __future__ import annotations

import glob
import os
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from cnnbench.common import sha256_file
from cnnbench.common.errors import UserError
from cnnbench.data.heldout import SplitFileMissing, SplitNotRecorded, held_out
from cnnbench.data.spec import PreprocessSpec
from cnnbench.data.synth import default_data_root
from cnnbench.export.errors import ExportError, ParityError
from cnnbench.export.inputs import graph_inputs
from cnnbench.export.int8 import CALIBRATION_IMAGES, calibration_inputs, calibration_samples, quantize_int8
from cnnbench.export.manifest import (CAM_WEIGHTS_NAME, FORMAT_VERSION, file_entry, write_cam_weights, write_manifest)
from cnnbench.export.onnx_export import EXPORTER, check_ten_crop, export_onnx, images_model
from cnnbench.export.ort import logits_runner, make_ort_session
from cnnbench.export.parity import (apply_gates, check_parity, compare_logits, exported_logits, reference_logits,
                           top1_agreement)
from cnnbench.export.tensorrt import TensorRTEngine, build_tensorrt_engine, profile_shapes, resolve_mode
from cnnbench.export.trt_support import check_tensorrt_support
from cnnbench.models.checkpoint import CheckpointError, load_checkpoint, recorded_split_files
from cnnbench.models.complexity import count_parameters
from cnnbench.models.ensemble import Ensemble
from cnnbench.models.dense import CENTRE_MODES, DEFAULT_CENTRE
from cnnbench.models.tencrop import TenCropModel

ONNX_FILES = {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "int8": "model_int8.onnx"}
PLAN_FILES = {"fp32": "model.plan", "fp16": "model_fp16.plan", "int8": "model_int8.plan"}
TIMING_CACHE_NAME = "timing.cache"
# The fp16 gates ask for >= 99 % agreement: with 64 images one near-tie (98.4 %) already fails them, so
# the count must be well over 100 for the gate to measure a rate. 200 single crops cost seconds.
PARITY_IMAGES = 200
_EXPORT_FILES = frozenset({*ONNX_FILES.values(), *PLAN_FILES.values(), CAM_WEIGHTS_NAME})


@dataclass
class Source:
    """One loaded checkpoint."""

    path: str
    name: str
    model: nn.Module
    meta: dict
    sha256: str

    @property
    def spec(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.meta["spec"])

    def describe(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "arch": self.meta["arch"],
                "params": count_parameters(self.model), "name": self.name}


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[export] {message}", file=sys.stderr, flush=True)


def find_checkpoints(train_dir) -> list[str]:
    """Every ``<train_dir>/*/best.pt``, sorted by run name."""
    return sorted(glob.glob(os.path.join(os.fspath(train_dir), "*", "best.pt")))


def _export_names(paths: list[str]) -> list[str]:
    """Run-folder name of each checkpoint; ``<folder>-<stem>`` where two share a folder."""
    folders = [os.path.basename(os.path.dirname(p)) or "checkpoint" for p in paths]
    names = [f if folders.count(f) == 1 else f"{f}-{os.path.splitext(os.path.basename(p))[0]}"
             for f, p in zip(folders, paths)]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ExportError(f"checkpoints map to the same export name(s) {', '.join(duplicates)}: "
                          "was a checkpoint given twice?")
    return names


def load_sources(paths: list[str]) -> list[Source]:
    paths = [os.path.abspath(os.fspath(p)) for p in paths]
    sources = []
    for path, name in zip(paths, _export_names(paths)):
        if not os.path.isfile(path):
            raise ExportError(f"{path}: checkpoint file not found")
        digest = sha256_file(path)
        try:
            model, meta = load_checkpoint(path)
        except CheckpointError as exc:
            raise ExportError(str(exc)) from exc
        sources.append(Source(path, name, model.float().eval(), meta, digest))
    return sources


def check_ensemble_members(sources: list[Source]) -> None:
    """Members must share class names (in order) and preprocessing; the error says what differs."""
    first = sources[0]
    for other in sources[1:]:
        if other.meta["classes"] != first.meta["classes"]:
            a, b = first.meta["classes"], other.meta["classes"]
            detail = (f"{len(a)} vs {len(b)} classes" if len(a) != len(b) else
                      "first difference at index {0}: {1!r} vs {2!r}".format(
                          *next((i, x, y) for i, (x, y) in enumerate(zip(a, b)) if x != y)))
            raise ExportError(f"cannot ensemble {first.name} and {other.name}: their class lists differ ({detail}); "
                              "export them without --ensemble")
        if other.spec != first.spec:
            a, b = first.spec.to_dict(), other.spec.to_dict()
            detail = ", ".join(f"{k} {a[k]} vs {b[k]}" for k in a if a[k] != b[k])
            raise ExportError(f"cannot ensemble {first.name} and {other.name}: their preprocessing differs ({detail}); "
                              "export them without --ensemble")


def _parity_samples(source: Source, data, count: int, progress: bool) -> tuple[list, dict]:
    """At most ``count`` held-out images for parity (data.heldout: the test part of ``data``'s seed-0
    split, else of the checkpoint's split); without either, of the embedded set's seed-0 split."""
    try:
        try:
            held = held_out(data, recorded_split_files(source.meta.get("record")), owner=source.name)
        except (SplitNotRecorded, SplitFileMissing) as exc:
            _log(progress, f"{exc}; using the embedded set")
            held = held_out(default_data_root(progress=progress))
        return held.samples("test", count), held.origin()
    except UserError as exc:
        raise ExportError(f"cannot read the parity images: {exc}") from exc


def load_parity_images(samples, spec: PreprocessSpec, ten_crop_in_graph: bool) -> tuple[Tensor, list]:
    """The exported graph's input for each readable sample: the normalised centre crop, or the
    resized uint8 image for the in-graph ten-crop graph. Unreadable images are skipped and listed."""
    return graph_inputs(samples, spec, ten_crop_in_graph, crops=1, purpose="parity")


def _versions(tensorrt_version: str | None) -> dict:
    import onnxruntime

    versions = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    if tensorrt_version:
        versions["tensorrt"] = tensorrt_version
    return versions


def export_checkpoints(checkpoints: list[str] | None = None, *, fp16: bool = False, int8: bool = False,
                       ensemble: bool | None = None, ten_crop: str = "host", dense_centre: str = DEFAULT_CENTRE,
                       cam_output: bool = False,
                       tensorrt: str = "auto", max_batch: int = 64, data=None, out="runs/export",
                       train_dir="runs/train", parity_images: int = PARITY_IMAGES, calibration_images: int = CALIBRATION_IMAGES,
                       opset: int | None = None, progress: bool = True) -> dict:
    """Export checkpoints (default: every ``<train_dir>/*/best.pt``) and, with two or more, their ensemble.

    ``ensemble``: None = when there are two or more checkpoints, True = required, False = never.
    ``int8`` adds a static int8 QDQ graph quantised from the fp32 one, calibrated on
    ``calibration_images`` training images of the checkpoint's split (of an ensemble: of its first member).
    ``ten_crop``: "host" (the graph takes normalised crops), "graph" (uint8 image in, the exact ten crops
    inside), "dense" (uint8 image in, dense ten crops inside, models.dense; its manifest also reports the
    top-1 agreement of every artifact with the exact ten-crop PyTorch fp32 reference, not gated);
    ``dense_centre``: the dense graph's centre crop (models.dense.CENTRE_MODES: own pass, interpolated, dropped).
    Every graph is checked against the PyTorch fp32 reference on ``parity_images`` held-out images;
    a failed gate does not stop the other exports: its manifest records ``parity.passed = false``,
    the failure is listed in ``failures``, and ``ok`` is False.
    Returns ``{"exports": [manifest, ...], "tensorrt": "built ..." | "skipped: why", "ok", "failures"}``.
    """
    build_trt, trt_line = resolve_mode(tensorrt)
    check_ten_crop(ten_crop)
    if dense_centre not in CENTRE_MODES:
        raise ExportError(f"dense_centre must be one of {', '.join(CENTRE_MODES)}, got {dense_centre!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ExportError(f"max_batch must be a positive integer, got {max_batch!r}")
    if isinstance(parity_images, bool) or not isinstance(parity_images, int) or parity_images < 1:
        raise ExportError(f"parity_images must be a positive integer, got {parity_images!r}")
    paths = list(checkpoints) if checkpoints else find_checkpoints(train_dir)
    if not paths:
        raise ExportError(f"no checkpoint given and none found as {os.path.join(os.fspath(train_dir), '*', 'best.pt')}: "
                          "train first, or name checkpoint files")
    sources = load_sources(paths)
    make_ensemble = len(sources) >= 2 if ensemble is None else bool(ensemble)
    if make_ensemble and len(sources) < 2:
        raise ExportError(f"an ensemble needs at least two checkpoints, got {len(sources)}")
    targets = [(s.name, [s]) for s in sources]
    if make_ensemble:
        check_ensemble_members(sources)
        targets.append(("ensemble-" + "+".join(s.name for s in sources), sources))

    settings = {"fp16": fp16, "int8": int8, "calibration_images": calibration_images,
                "ten_crop": ten_crop, "dense_centre": dense_centre, "cam_output": cam_output,
                "build_trt": build_trt, "max_batch": max_batch, "data": data, "out": os.fspath(out),
                "parity_images": parity_images, "opset": opset, "progress": progress}
    manifests, failures = [], []
    for name, members in targets:
        manifest, problems = _export_target(name, members, settings)
        manifests.append(manifest)
        failures.extend(problems)
    if build_trt:
        built = sum(a["format"] == "tensorrt" for m in manifests for a in m["artifacts"])
        trt_line = f"built {built} engine(s) with TensorRT {manifests[0]['versions']['tensorrt']}"
    return {"exports": manifests, "tensorrt": trt_line, "ok": not failures, "failures": failures}


def _export_target(name: str, members: list[Source], settings: dict) -> tuple[dict, list[str]]:
    """Export one checkpoint or one ensemble into ``<out>/<name>``; returns (manifest, parity failures)."""
    progress = settings["progress"]
    export_dir = os.path.join(settings["out"], name)
    model = members[0].model if len(members) == 1 else Ensemble([m.model for m in members]).eval()
    spec = members[0].spec
    ten_crop = settings["ten_crop"]
    in_graph = ten_crop != "host"
    samples, origin = _parity_samples(members[0], settings["data"], settings["parity_images"], progress)
    images, skipped = load_parity_images(samples, spec, in_graph)
    centre = settings["dense_centre"]
    reference = images_model(model, spec, ten_crop, centre=centre).eval() if in_graph else model
    _log(progress, f"{name}: PyTorch fp32 reference on {len(images)} parity images")
    expected = reference_logits(reference, images)
    # Dense is an approximation of the ten crops: how often each artifact picks the exact ten crops'
    # class is reported beside its parity (which is against the dense reference, gated as usual).
    exact = reference_logits(TenCropModel(model, spec).eval(), images) if ten_crop == "dense" else None
    precisions = ["fp32"] + ["fp16"] * settings["fp16"] + ["int8"] * settings["int8"]

    artifacts, reports, failures = [], {}, []
    io = opset = trt_version = quantization = calibration = None
    fp32_path = os.path.join(export_dir, ONNX_FILES["fp32"])
    for precision in precisions:
        onnx_path = os.path.join(export_dir, ONNX_FILES[precision])
        if precision == "int8":  # quantised from the fp32 graph written (and verified) first
            quantization, calibration = _quantize(members[0], fp32_path, onnx_path, io, in_graph, settings)
        else:
            _log(progress, f"{name}: exporting {ONNX_FILES[precision]}")
            info = export_onnx(model, onnx_path, spec=spec, precision=precision, ten_crop=ten_crop, dense_centre=centre,
                               cam_output=settings["cam_output"], opset=settings["opset"])
            io, opset = io or info["io"], info["opset"]
        artifacts.append(file_entry(onnx_path, format="onnx", precision=precision))
        if precision != "int8":  # TensorRT builds from this graph (int8: from a sibling, checked in _build_plan)
            _check_for_tensorrt(onnx_path, f"{name}/{ONNX_FILES[precision]}", settings["build_trt"])
        session = make_ort_session(onnx_path, device="cpu")
        reports[ONNX_FILES[precision]] = _parity(expected, logits_runner(session), images, precision,
                                                 "onnxruntime-cpu", name, ONNX_FILES[precision], failures, progress,
                                                 exact)
        if settings["build_trt"]:
            plan_path = os.path.join(export_dir, PLAN_FILES[precision])
            _log(progress, f"{name}: building TensorRT engine {PLAN_FILES[precision]}")
            built = _build_plan(precision, onnx_path, fp32_path, plan_path, io, calibration, settings)
            trt_version = built["tensorrt_version"]
            artifacts.append(file_entry(plan_path, format="tensorrt", precision=precision,
                                        tensorrt_version=trt_version, profile=built["profile"]))
            with open(plan_path, "rb") as f:
                engine = TensorRTEngine(f.read())
            reports[PLAN_FILES[precision]] = _parity(expected, engine.logits_runner(), images, precision,
                                                     "tensorrt", name, PLAN_FILES[precision], failures, progress,
                                                     exact)

    cam_entry = None
    if settings["cam_output"]:
        cam_path = os.path.join(export_dir, CAM_WEIGHTS_NAME)
        write_cam_weights(cam_path, [m.model.classifier for m in members])
        cam_entry = file_entry(cam_path, members=len(members))
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "kind": "single" if len(members) == 1 else "ensemble",
        "sources": [m.describe() for m in members],
        "classes": list(members[0].meta["classes"]),
        "spec": spec.to_dict(),
        "io": io,
        "ten_crop": ten_crop,
        "ten_crop_in_graph": in_graph,
        "dense_centre": centre if ten_crop == "dense" else None,
        "cam_output": settings["cam_output"],
        "cam_weights": cam_entry,
        "artifacts": artifacts,
        "int8": quantization,
        "opset": opset,
        "exporter": EXPORTER,
        "versions": _versions(trt_version),
        "parity": {
            "reference": ("PyTorch fp32 dense ten crops" if ten_crop == "dense" else "PyTorch fp32") + " on CPU, TF32 off",
            "images": {**origin, "n_images": int(len(images)), "skipped": skipped,
                       "input": "resized uint8 image" if in_graph else "normalised centre crop"},
            "artifacts": reports,
            "passed": all(r["passed"] for r in reports.values()),
        },
    }
    write_manifest(export_dir, manifest)
    _remove_stale_files(export_dir, manifest)
    _log(progress, f"{name}: wrote {os.path.join(export_dir, 'manifest.json')}")
    return {**manifest, "export_dir": os.path.abspath(export_dir)}, failures


def _build_plan(precision: str, onnx_path: str, fp32_path: str, plan_path: str, io: dict, calibration, settings: dict):
    """A TensorRT engine of ``onnx_path``; for int8, of a symmetric-activation sibling graph (TensorRT
    accepts no other), quantised from the fp32 graph with the same calibration inputs."""
    shapes = profile_shapes(io, settings["max_batch"])
    cache = os.path.join(settings["out"], TIMING_CACHE_NAME)
    if precision != "int8":
        return build_tensorrt_engine(onnx_path, plan_path, **shapes, timing_cache_path=cache)
    with tempfile.TemporaryDirectory(prefix=".trt-int8-", dir=os.path.dirname(plan_path)) as tmp:
        symmetric = os.path.join(tmp, "model_int8_symmetric.onnx")
        quantize_int8(fp32_path, symmetric, calibration, io=io, activations="int8-symmetric")
        _check_for_tensorrt(symmetric, f"{os.path.basename(plan_path)}'s int8 graph", strict=True)
        return build_tensorrt_engine(symmetric, plan_path, **shapes, timing_cache_path=cache)


def _check_for_tensorrt(onnx_path: str, label: str, strict: bool) -> None:
    """The static TensorRT check (export/trt_support.py): an error where an engine is to be built from
    the graph, else a warning, so a graph TensorRT cannot take is known before anyone builds one."""
    findings = check_tensorrt_support(onnx_path, strict=strict, label=label)
    if findings:
        print(f"[export] warning: {label}: TensorRT's ONNX parser would reject {len(findings)} node(s), "
              f"first: {findings[0]}", file=sys.stderr, flush=True)


def _quantize(source: Source, fp32_path: str, int8_path: str, io: dict, in_graph: bool,
              settings: dict) -> tuple[dict, Tensor]:
    """model_int8.onnx from model.onnx, calibrated on training images.

    Returns the manifest's ``int8`` section and the calibration inputs (a TensorRT build reuses them).
    """
    samples, origin = calibration_samples(source.meta, settings["data"], settings["calibration_images"])
    inputs, skipped = calibration_inputs(samples, source.spec, in_graph)
    _log(settings["progress"], f"{source.name}: quantising {os.path.basename(int8_path)} "
                               f"(calibration: {len(samples) - len(skipped)} training images, {len(inputs)} graph inputs)")
    settings_used = quantize_int8(fp32_path, int8_path, inputs, io=io, activations="uint8")
    calibration = {**origin, "n_images": len(samples) - len(skipped), "n_inputs": int(len(inputs)),
                   "input": "resized uint8 image" if in_graph else "ten normalised crops per image",
                   "images": [s.path for s in samples if s.path not in {p for p, _ in skipped}], "skipped": skipped}
    section = {**settings_used, "calibration": calibration}
    if settings["build_trt"]:
        section["tensorrt_activations"] = "int8-symmetric"
    return section, inputs


def _parity(expected: np.ndarray, runner, images: Tensor, precision: str, runtime: str, name: str, file: str,
            failures: list[str], progress: bool, exact: np.ndarray | None = None) -> dict:
    """The gated parity report of one artifact; with ``exact`` (a dense export's exact ten-crop reference
    logits) also ``exact_top1_agreement``, reported and never gated."""
    got = exported_logits(runner, images)
    report = {**apply_gates(compare_logits(expected, got), precision), "runtime": runtime}
    if exact is not None:
        report["exact_top1_agreement"] = top1_agreement(exact, got)
    try:
        check_parity(report, f"{name}/{file} ({runtime})")
        _log(progress, f"{name}: {file} parity on {report['n_images']} images under {runtime}: pass")
    except ParityError as exc:
        failures.append(str(exc))
        _log(progress, f"{name}: {exc}")
    return report


def _remove_stale_files(export_dir: str, manifest: dict) -> None:
    """Delete export files a previous run left that this manifest does not list (e.g. an old fp16 graph)."""
    listed = {a["file"] for a in manifest["artifacts"]}
    if manifest["cam_weights"]:
        listed.add(manifest["cam_weights"]["file"])
    for entry in os.listdir(export_dir):
        if entry in _EXPORT_FILES and entry not in listed:
            os.remove(os.path.join(export_dir, entry))
