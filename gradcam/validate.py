"""`validate EXPORT`: the held-out split through the reference and the export's ONNX graphs: the
logit parity gates and the CAM gate (export.parity's tables), with panels of what changed.
The gated logits come from ONNX Runtime or OpenVINO (``backend``); the CAM comparison from ONNX Runtime."""
from __future__ import annotations

import heapq
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn

from cnnbench.common import atomic_write_json
from cnnbench.data.crops import CENTRE, DENSE, TEN
from cnnbench.data.spec import PreprocessSpec
from cnnbench.data.split import spread_evenly
from cnnbench.export import load_manifest
from cnnbench.export.ort import logits_runner
from cnnbench.export.manifest import graph_crops, ten_crop_place
from cnnbench.export.onnx_export import images_model
from cnnbench.models.dense import DEFAULT_CENTRE
from cnnbench.export.parity import apply_gates, compare_logits, exported_logits, reference_logits, top1_agreement
from cnnbench.export.pipeline import PARITY_IMAGES
from cnnbench.gradcam.exported import (REFERENCE_LAYER, REFERENCE_METHOD, ExportedCam, cam_gate_report, compare_maps,
                                       compare_with_reference_cam, load_reference)
from cnnbench.gradcam.images import INPUT_ERRORS, LoadedImage, check_positive, held_out_samples, image_groups, log, panel_name
from cnnbench.gradcam.panels import MapView, save_panel
from cnnbench.gradcam.tencrop import ImageCam, image_cam
from cnnbench.runtime.predictor import BackendError

REFERENCE_CAM = {"method": REFERENCE_METHOD, "layer": REFERENCE_LAYER}  # what exported CAM parity compares with

MOST_MOVED = 4  # panels for this many images whose exported map moved most
MAX_PANELS = 200  # cap on top-1 difference panels per artifact, so a broken export cannot flood the disk


@dataclass
class MovedMap:
    """An image whose exported map (same class as the reference's) correlates least with the reference."""

    path: str
    correlation: float
    peak_distance_px: float
    class_name: str
    image: Tensor
    reference_map: Tensor
    exported_map: Tensor

    def facts(self, panel: str) -> dict:
        return {"path": self.path, "correlation": self.correlation, "peak_distance_px": self.peak_distance_px,
                "class": self.class_name, "panel": panel}


@dataclass
class _ArtifactCheck:
    """What validate accumulates for one precision over the image groups: the gated logits from
    ``run_logits`` (the backend's), and with ``exported`` (the graph in ONNX Runtime) the CAM comparison."""

    run_logits: Callable[[np.ndarray], np.ndarray]
    file: str
    exported: Optional[ExportedCam]
    logits: list = field(default_factory=list)
    cam_rows: list = field(default_factory=list)
    exact_cam_rows: list = field(default_factory=list)  # dense export: its CAM vs the exact ten-crop map
    differs: list = field(default_factory=list)
    moved: list = field(default_factory=list)  # heap of (1 - correlation, counter, MovedMap), the MOST_MOVED lowest


def validate_export(export_dir, data=None, out=None, limit: int | None = None, backend: str = "onnxruntime",
                    progress: bool = True) -> dict:
    """The held-out test split through the reference and the export's ONNX graphs (``backend``: their
    logits from "onnxruntime" or "openvino", on the CPU; OpenVINO also runs bf16 where the CPU has bf16
    units, judged by the fp16 gates).

    Per graph: the numeric parity gates (export.parity, on the inputs the export's parity uses:
    centre crops, or resized images for an in-graph ten-crop graph), and with cam_output the CAM
    gate (ten crops). ``limit`` caps the images of the Grad-CAM comparison (the costly part); the
    parity gates still see at least PARITY_IMAGES images (their 99 % rates need over a hundred to
    mean anything), or all of the split when it is smaller. Panels for every image whose ten-crop
    top-1 differs (reference map of the reference's class vs exported map of the export's class; the
    reference's Grad-CAM of both classes when the export has no CAM) and for the MOST_MOVED images
    whose maps moved most. The JSON report goes atomically to ``out``/validation.json (default:
    <export>/validation/).

    A dense export (``--ten-crop dense``) is gated against the PyTorch dense reference (logits and
    Grad-CAM in dense mode); beside the gates it reports, per graph, the top-1 agreement with the
    exact ten crops and the correlation of its CAM with the exact ten-crop paste-back map (same class).
    """
    try:
        check_positive("limit", limit)
        manifest = load_manifest(export_dir)
        reference, meta = load_reference(manifest)
        spec, classes = PreprocessSpec.from_dict(manifest["spec"]), list(manifest["classes"])
        samples, origin = held_out_samples(data, classes, meta.get("record"), manifest,
                                           limit=None if limit is None else max(limit, PARITY_IMAGES))
        cam_paths = {s.path for s in spread_evenly(samples, limit)}
        checks = _artifact_checks(manifest, backend)
        precisions = list(checks)
    except INPUT_ERRORS as exc:
        return {"ok": False, "error": str(exc)}
    out = os.fspath(out) if out is not None else os.path.join(manifest["export_dir"], "validation")
    inside = graph_crops(manifest)
    in_graph, dense = inside is not None, inside == DENSE.name
    centre = manifest.get("dense_centre") or DEFAULT_CENTRE
    parity_reference = (images_model(reference, spec, ten_crop_place(manifest), centre=centre).eval() if in_graph
                        else reference)
    exact_reference = images_model(reference, spec, "graph").eval() if dense else None
    cam_crops = DENSE.name if dense else TEN.name

    log(progress, f"{manifest['name']}: {len(samples)} test images for parity, {len(cam_paths)} of them for "
                  f"Grad-CAM; graphs {', '.join(precisions)}")
    reference_chunks, exact_chunks, failures, used, counter, cam_images = [], [], [], set(), 0, 0
    for group, batch in image_groups(samples, spec, failures, progress, f"validate {manifest['name']}"):
        parity_input = batch if in_graph else CENTRE.cut(batch, spec)[:, 0]
        reference_chunks.append(reference_logits(parity_reference, parity_input))
        if dense:
            exact_chunks.append(reference_logits(exact_reference, parity_input))
        for check in checks.values():
            check.logits.append(exported_logits(check.run_logits, parity_input))
        picked = [i for i, image in enumerate(group) if image.path in cam_paths]
        if not picked:
            continue
        cam_group, cam_batch = [group[i] for i in picked], batch[picked]
        cam_images += len(picked)
        ref_cam = image_cam(reference, cam_batch, spec, crops=cam_crops, **REFERENCE_CAM)
        exact_cam = (image_cam(reference, cam_batch, spec, crops=TEN.name, targets=ref_cam.targets, **REFERENCE_CAM)
                     if dense else None)
        for check in (c for c in checks.values() if c.exported is not None):
            counter = _compare_group(check, reference, cam_group, cam_batch, spec, ref_cam, classes, out, used, counter,
                                     cam_crops, exact_cam)

    if not reference_chunks:
        return {"ok": False, "error": f"none of the {len(samples)} test images could be read", "failures": failures}
    expected = np.concatenate(reference_chunks)
    artifacts, problems = {}, []
    for precision, check in checks.items():
        got = np.concatenate(check.logits)
        parity = {**apply_gates(compare_logits(expected, got), precision), "runtime": f"{backend}-cpu"}
        cam = cam_gate_report(check.cam_rows, precision) if check.cam_rows else None
        if dense:  # reported beside the gates, never gated: dense is an approximation of the ten crops
            parity["exact_top1_agreement"] = top1_agreement(np.concatenate(exact_chunks), got)
            if cam is not None:
                correlations = np.array([r["correlation"] for r in check.exact_cam_rows])
                cam["exact_ten_crop_map"] = {"n_images": len(correlations),
                                             "mean_correlation": float(correlations.mean()),
                                             "min_correlation": float(correlations.min())}
        moved = [m for _, _, m in sorted(check.moved, key=lambda entry: entry[:2], reverse=True)]
        artifacts[precision] = {
            "file": check.file,
            "parity": parity,
            "cam": cam,
            "top1_differs": check.differs,
            "moved_most": [m.facts(_moved_panel(m, precision, out, used)) for m in moved],
        }
        problems += [f"{precision}: parity gate {name} failed" for name, g in parity["gates"].items() if not g["passed"]]
        if cam is not None and not cam["passed"]:
            problems += [f"{precision}: CAM {name} {g['value']:.4f} {'<' if g['op'] == '>=' else '>'} {g['limit']}"
                         for name, g in cam["gates"].items() if not g["passed"]]
    report = {
        "ok": not problems,
        "export": manifest["name"],
        "export_dir": manifest["export_dir"],
        "kind": manifest["kind"],
        "backend": backend,
        "cam_runtime": "onnxruntime-cpu",
        "images": {**origin, "n_images": len(expected), "cam_images": cam_images, "skipped": failures},
        "parity_input": (f"resized uint8 image ({'dense ten crops' if dense else 'ten crops'} in the graph)"
                         if in_graph else "normalised centre crop"),
        "cam_crops": cam_crops,
        "artifacts": artifacts,
        "problems": problems,
        "out": out,
        "report": os.path.join(out, "validation.json"),
    }
    atomic_write_json(report["report"], report)
    return report


def _artifact_checks(manifest: dict, backend: str) -> dict[str, _ArtifactCheck]:
    """One check per precision ``backend`` runs from the export's ONNX graphs, each with the graph's CAM
    in ONNX Runtime (none for OpenVINO's bf16, which is no graph of its own)."""
    from cnnbench.runtime.backends import FORMAT_BACKENDS

    if backend not in FORMAT_BACKENDS["onnx"]:
        raise BackendError(f"validate runs the ONNX graphs through {' or '.join(FORMAT_BACKENDS['onnx'])}, "
                           f"not {backend!r}")
    graphs = [a["precision"] for a in manifest["artifacts"] if a["format"] == "onnx"]
    cams = {p: ExportedCam(manifest, p) for p in graphs}
    if backend == "onnxruntime":
        return {p: _ArtifactCheck(logits_runner(cam.session), cam.file, cam) for p, cam in cams.items()}
    from cnnbench.runtime.openvino_backend import graph_for, graph_precision, openvino_precisions

    checks = {}
    for precision in openvino_precisions():
        graph = graph_precision(precision)
        if graph in cams:
            checks[precision] = _ArtifactCheck(graph_for(manifest, precision).logits, cams[graph].file,
                                               cams[graph] if graph == precision else None)
    return checks


def _compare_group(check: _ArtifactCheck, reference: nn.Module, group: list[LoadedImage], batch: Tensor,
                   spec: PreprocessSpec, ref_cam: ImageCam, classes: list[str], out: str, used: set[str],
                   counter: int, crops: str, exact_cam: ImageCam | None) -> int:
    """Exported maps and predictions of one group vs the reference's (in crop mode ``crops``); panels for
    changed top-1. ``exact_cam``: the exact ten-crop map of the same classes, compared with a dense export's."""
    exported = check.exported
    if exported.has_cam:
        rows, same_class, own = compare_with_reference_cam(exported, batch, ref_cam, crops)
        check.cam_rows += rows
        if exact_cam is not None:
            check.exact_cam_rows += compare_maps(exact_cam.maps, same_class.maps)
        exported_targets, exported_maps = own.targets, own.maps
        for i, row in enumerate(rows):
            moved = MovedMap(group[i].path, row["correlation"], row["peak_distance_px"],
                             classes[int(ref_cam.targets[i])], group[i].resized, ref_cam.maps[i], same_class.maps[i])
            counter += 1
            entry = (1.0 - row["correlation"], counter, moved)
            if len(check.moved) < MOST_MOVED:
                heapq.heappush(check.moved, entry)
            else:
                heapq.heappushpop(check.moved, entry)
    else:
        exported_targets, exported_maps = exported.image_logits(batch, crops).argmax(dim=1), None
    for i in torch.nonzero(exported_targets != ref_cam.targets).flatten().tolist():
        ref_class, exp_class = int(ref_cam.targets[i]), int(exported_targets[i])
        entry = {"path": group[i].path, "reference": classes[ref_class], "exported": classes[exp_class]}
        if len(check.differs) < MAX_PANELS:
            if exported_maps is not None:
                exp_view = MapView(f"export {exported.precision} CAM: {classes[exp_class]}", exported_maps[i])
            else:
                other = image_cam(reference, batch[i:i + 1], spec, crops=crops, targets=torch.tensor([exp_class]),
                                  **REFERENCE_CAM)
                exp_view = MapView(f"reference Grad-CAM: {classes[exp_class]} (export's class)", other.maps[0])
            views = [MapView(f"reference Grad-CAM: {classes[ref_class]}", ref_cam.maps[i]), exp_view]
            name = panel_name(group[i].path, used, f"_{exported.precision}_top1")
            entry["panel"] = save_panel(os.path.join(out, name), group[i].resized, views,
                                        title=f"top-1 differs ({exported.precision}): {os.path.basename(group[i].path)}")
        check.differs.append(entry)
    return counter


def _moved_panel(moved: MovedMap, precision: str, out: str, used: set[str]) -> str:
    views = [MapView(f"reference Grad-CAM: {moved.class_name}", moved.reference_map),
             MapView(f"export {precision} CAM: {moved.class_name}", moved.exported_map)]
    name = panel_name(moved.path, used, f"_{precision}_moved")
    title = f"r = {moved.correlation:.4f}, peaks {moved.peak_distance_px:.1f} px apart"
    return save_panel(os.path.join(out, name), moved.image, views, title=title)
