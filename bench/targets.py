"""What to benchmark: checkpoints and export folders, and the backend/precision rows each gets."""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from typing import Optional

from cnnbench.common import sha256_file
from cnnbench.common.errors import InputError, MissingFileError
from cnnbench.data.crops import CROP_MODES, DENSE, TEN, crop_mode
from cnnbench.runtime.backends import BACKENDS, EXPORT_BACKENDS, FORMAT_BACKENDS, backend_problem

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
_VARIANTS = {"onnx": "onnx", "tensorrt": "plan"}  # a row's variant names the artifact format it runs


@dataclass(frozen=True)
class BenchTarget:
    """A checkpoint or an export folder.

    ``sources`` are the checkpoints whose PyTorch fp32 logits are this model's reference (one for a
    checkpoint or single export, the members of an ensemble), as far as they still exist unchanged;
    ``missing_sources`` says why any could not be used.
    """

    name: str
    path: str                              # checkpoint file or export folder, absolute
    kind: str                              # "checkpoint" | "single" | "ensemble"
    sources: tuple[str, ...] = ()
    missing_sources: tuple[str, ...] = ()
    manifest: Optional[dict] = field(default=None, compare=False, hash=False)

    @property
    def reference_key(self) -> str:
        """Models with the same key compute the same function, so they share a speedup baseline."""
        if self.sources and not self.missing_sources:
            return "+".join(self.sources)
        return self.path


@dataclass(frozen=True)
class RowPlan:
    """One predictor configuration to measure."""

    target: BenchTarget
    backend: str
    precision: str
    variant: str                           # eager | channels_last | compiled | cuda-graphs | onnx (onnxruntime, openvino) | plan (+10crop, +dense)
    channels_last: bool = False
    compile: bool | str = False
    crops: str = TEN.name                  # the crop mode (data.crops): "10", "1" or "dense"

    @property
    def is_baseline(self) -> bool:
        """The PyTorch eager fp32 exact ten-crop row: what speedups are relative to."""
        return (self.backend == "torch" and self.precision == "fp32" and self.variant == "eager"
                and self.crops == TEN.name)


def find_targets(names: Optional[list[str]], train_dir: str, export_dir: str) -> list[BenchTarget]:
    """Checkpoints (``<train_dir>/*/best.pt``) then exports (``<export_dir>/*/manifest.json``).

    ``names`` picks some: each is a checkpoint file, a run folder, an export folder, or a bare
    name looked up in both folders (a run and an export of the same name are both taken).
    """
    if not names:
        checkpoints = sorted(glob.glob(os.path.join(train_dir, "*", "best.pt")))
        exports = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(export_dir, "*", "manifest.json")))
        models = [checkpoint_target(p) for p in checkpoints] + [export_target(p) for p in exports]
        if not models:
            raise MissingFileError(f"nothing to benchmark: no {os.path.join(train_dir, '*', 'best.pt')} and no "
                                   f"{os.path.join(export_dir, '*', 'manifest.json')}; train and export first, "
                                   "or name a checkpoint or export folder")
        return models
    models: list[BenchTarget] = []
    for name in names:
        for model in _resolve_name(name, train_dir, export_dir):
            if model.path not in {m.path for m in models}:
                models.append(model)
    return models


def _resolve_name(name: str, train_dir: str, export_dir: str) -> list[BenchTarget]:
    name = os.fspath(name)
    if os.path.isfile(name):
        if os.path.basename(name) == "manifest.json":
            return [export_target(os.path.dirname(name))]
        return [checkpoint_target(name)]
    if os.path.isdir(name):
        if os.path.isfile(os.path.join(name, "manifest.json")):
            return [export_target(name)]
        if os.path.isfile(os.path.join(name, "best.pt")):
            return [checkpoint_target(os.path.join(name, "best.pt"))]
        raise MissingFileError(f"{name}: neither an export folder (no manifest.json) nor a training run (no best.pt)")
    found = []
    checkpoint = os.path.join(train_dir, name, "best.pt")
    if os.path.isfile(checkpoint):
        found.append(checkpoint_target(checkpoint))
    if os.path.isfile(os.path.join(export_dir, name, "manifest.json")):
        found.append(export_target(os.path.join(export_dir, name)))
    if not found:
        known = sorted({os.path.basename(os.path.dirname(p)) for p in
                        glob.glob(os.path.join(train_dir, "*", "best.pt"))
                        + glob.glob(os.path.join(export_dir, "*", "manifest.json"))})
        raise MissingFileError(f"{name}: no such checkpoint, run or export (looked in {train_dir} and {export_dir}; "
                               f"known: {', '.join(known) or 'none'})")
    return found


def checkpoint_target(path: str) -> BenchTarget:
    path = os.path.abspath(path)
    run = os.path.basename(os.path.dirname(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    name = run if stem == "best" else f"{run}/{stem}"
    return BenchTarget(name=name, path=path, kind="checkpoint", sources=(path,))


def export_target(folder: str) -> BenchTarget:
    """An export folder, its manifest verified (hashes) by export.load_manifest."""
    from cnnbench import export
    manifest = export.load_manifest(folder)
    sources, missing = [], []
    for entry in manifest["sources"]:
        path = entry.get("path", "")
        if not os.path.isfile(path):
            missing.append(f"{path}: source checkpoint no longer exists")
        elif entry.get("sha256") and sha256_file(path) != entry["sha256"]:
            missing.append(f"{path}: source checkpoint changed since the export (sha256 differs)")
        else:
            sources.append(os.path.abspath(path))
    name = manifest.get("name") or os.path.basename(os.path.abspath(folder))
    return BenchTarget(name=name, path=manifest["export_dir"], kind=manifest["kind"], sources=tuple(sources),
                 missing_sources=tuple(missing), manifest=manifest)


def plan_rows(models: list[BenchTarget], device: str, *, backends=None, precisions=None,
              compile: bool = False, crops=None) -> tuple[list[RowPlan], list[str]]:
    """Every (model, backend, precision, variant, crop mode) available on ``device``; also the reasons for skips.

    ``crops``: the crop modes to measure (data.crops names). None: exact ten crops, except that an
    export with a crop mode inside its graph is measured in that mode.
    """
    backends = _check_choices("backend", backends, BACKENDS)
    precisions = _check_choices("precision", precisions, PRECISIONS)
    chosen = None if not crops else [crop_mode(c).name for c in crops]
    rows, skipped = [], []
    for model in grouped(models):
        if model.kind == "checkpoint":
            candidates = [row for mode in (chosen or [TEN.name])
                          for row in _torch_rows(model, device, compile, mode, skipped)]
        else:
            candidates = _export_rows(model, device, skipped, chosen)
            if model.kind == "ensemble" and model.sources and not model.missing_sources:
                # The members' logit sum in eager fp32: the ensemble's reference speed.
                candidates.insert(0, RowPlan(model, "torch", "fp32", "eager"))
        rows += [r for r in candidates if r.backend in backends and r.precision in precisions]
    return rows, skipped


def grouped(models: list[BenchTarget]) -> list[BenchTarget]:
    """Each checkpoint followed by the exports of it, then ensembles and exports without their checkpoint."""
    ordered = []
    for model in models:
        if model.kind == "checkpoint":
            ordered.append(model)
            ordered += [m for m in models if m.kind == "single" and m.sources == (model.path,)]
    return ordered + [m for m in models if m not in ordered]


def _check_choices(what: str, chosen, allowed: tuple) -> tuple:
    if not chosen:
        return allowed
    unknown = [c for c in chosen if c not in allowed]
    if unknown:
        raise InputError(f"unknown {what}(s) {', '.join(map(str, unknown))}; choose from {', '.join(allowed)}")
    return tuple(chosen)


def _torch_rows(model: BenchTarget, device: str, compile: bool, crops: str, skipped: list[str]) -> list[RowPlan]:
    """Eager fp32 (the reference), then the fast half precision of the device in channels_last."""
    if crops == DENSE.name:
        problem = _dense_problem(model.path)
        if problem:
            skipped.append(f"{model.name} dense: {problem}")
            return []
    suffix = _crops_suffix(crops)
    half = "fp16" if device.startswith("cuda") else "bf16"
    rows = [RowPlan(model, "torch", "fp32", "eager" + suffix, crops=crops),
            RowPlan(model, "torch", half, "channels_last" + suffix, channels_last=True, crops=crops)]
    if compile:
        rows.append(RowPlan(model, "torch", half, "compiled" + suffix, channels_last=True, compile=True, crops=crops))
        if device.startswith("cuda"):
            # torch.compile's reduce-overhead mode replays the model as CUDA graphs.
            rows.append(RowPlan(model, "torch", half, "cuda-graphs" + suffix, channels_last=True,
                                compile="reduce-overhead", crops=crops))
    return rows


def _crops_suffix(crops: str) -> str:
    """The variant's tag for a crop mode: none for the exact ten crops (the default), +1crop, +dense."""
    return "" if crops == TEN.name else f"+{crops}crop" if crops.isdigit() else f"+{crops}"


def _dense_problem(checkpoint: str) -> Optional[str]:
    """Why a checkpoint's geometry has no dense ten crops (models.dense's one-line error), or None."""
    from cnnbench.data.spec import PreprocessSpec
    from cnnbench.models.checkpoint import load_checkpoint
    from cnnbench.models.dense import DenseGeometryError, dense_geometry

    network, meta = load_checkpoint(checkpoint)
    try:
        dense_geometry(network, PreprocessSpec.from_dict(meta["spec"]))
    except DenseGeometryError as exc:
        return str(exc)
    return None


def _export_rows(model: BenchTarget, device: str, skipped: list[str], chosen: Optional[list[str]]) -> list[RowPlan]:
    from cnnbench.export.manifest import graph_crops

    inside = graph_crops(model.manifest)
    if inside is not None:  # the graph computes one crop mode
        modes = [inside] if chosen is None or inside in chosen else []
        if not modes:
            skipped.append(f"{model.name}: its graph computes crops={inside} only (asked: {', '.join(chosen)})")
    else:
        modes = [m for m in (chosen or [TEN.name]) if CROP_MODES[m].cuts_crops]
        if chosen and DENSE.name in chosen:
            skipped.append(f"{model.name} dense: the graph takes crops; export with --ten-crop dense for dense rows")
    rows = []
    for crops in modes:
        rows += _artifact_rows(model, device, skipped, crops, inside)
    return rows


def _artifact_rows(model: BenchTarget, device: str, skipped: list[str], crops: str,
                   inside: Optional[str]) -> list[RowPlan]:
    from cnnbench.models.dense import DEFAULT_CENTRE

    suffix = "+10crop" if inside == TEN.name else _crops_suffix(crops)
    centre = model.manifest.get("dense_centre")
    if inside == DENSE.name and centre and centre != DEFAULT_CENTRE:  # the centre crop's handling tells rows apart
        suffix += f"-{centre}"
    rows = []
    for backend in EXPORT_BACKENDS:
        for artifact in model.manifest["artifacts"]:
            if backend not in FORMAT_BACKENDS.get(artifact["format"], ()):
                continue
            problem = backend_problem(backend, device)
            if problem:
                skipped.append(f"{model.name} {backend} {artifact['precision']}: {problem}")
                continue
            variant = _VARIANTS[artifact["format"]] + suffix
            rows += [RowPlan(model, backend, precision, variant, crops=crops)
                     for precision in _artifact_precisions(backend, artifact["precision"])]
    unknown = sorted({a["format"] for a in model.manifest["artifacts"]} - set(FORMAT_BACKENDS))
    skipped += [f"{model.name}: unknown artifact format {f!r}" for f in unknown]
    return rows


def _artifact_precisions(backend: str, graph: str) -> list[str]:
    """The precisions a backend runs from a graph of precision ``graph``: its own, and for OpenVINO on an
    fp32 graph also bf16 where the CPU has bf16 units (runtime.openvino_backend.OPENVINO_PRECISIONS)."""
    if backend != "openvino":
        return [graph]
    from cnnbench.runtime.openvino_backend import graph_precision, openvino_precisions

    return [p for p in openvino_precisions() if graph_precision(p) == graph]


def load_row(plan: RowPlan, device: str, threads: Optional[int] = None):
    """The runtime Predictor of a planned row (bench and mlperf load rows the same way)."""
    from cnnbench import runtime

    target = plan.target
    if target.kind == "checkpoint":
        return runtime.load(target.path, backend="torch", device=device, precision=plan.precision,
                            channels_last=plan.channels_last, compile=plan.compile, threads=threads)
    if plan.backend == "torch":
        return torch_ensemble(target, device)
    return runtime.load(target.path, backend=plan.backend, device=device, precision=plan.precision, threads=threads)


def torch_ensemble(target: BenchTarget, device: str):
    """The PyTorch fp32 logit-sum of an ensemble export's member checkpoints, as a runtime Predictor."""
    from cnnbench.models.checkpoint import load_checkpoint
    from cnnbench.models.ensemble import Ensemble
    from cnnbench.runtime.torch_backend import TorchPredictor

    members = [load_checkpoint(source)[0] for source in target.sources]
    manifest = target.manifest
    meta = {"arch": "ensemble", "spec": manifest["spec"], "classes": manifest["classes"], "record": {}}
    return TorchPredictor(Ensemble(members).eval(), meta, source=target.path, device=device, precision="fp32")
