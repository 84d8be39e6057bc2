"""`gradcam IMG...`: a panel per image for the predicted class (and a chosen one), from a checkpoint's
CAM (gradcam.core's default method and layer unless named) or an export's CAM (then compared with the
reference Grad-CAM at last and gated)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cnnbench.common.errors import InputError
from cnnbench.data.crops import crop_mode
from cnnbench.data.spec import PreprocessSpec
from cnnbench.export import load_manifest
from cnnbench.gradcam.core import default_layer, default_method, method_key, method_name
from cnnbench.gradcam.exported import (REFERENCE_LAYER, REFERENCE_METHOD, ExportedCam, cam_gate_report, compare_maps,
                                       load_reference)
from cnnbench.gradcam.layers import resolve_layer
from cnnbench.gradcam.images import (DEFAULT_OUT, INPUT_ERRORS, LoadedImage, class_index, image_groups, panel_name,
                            top_classes)
from cnnbench.gradcam.panels import MapView, save_panel
from cnnbench.gradcam.pointing import peak_location
from cnnbench.gradcam.tencrop import image_cams, peak
from cnnbench.models.checkpoint import load_checkpoint
from cnnbench.runtime.predict import expand_paths, newest_checkpoint


@dataclass
class Explained:
    """One image's maps (predicted class first, then the chosen class), their classes, its logits, and
    with an export the comparison of its map with the reference's (a ``compare_maps`` row)."""

    logits: Tensor
    maps: list[Tensor]
    targets: list[int]
    views: list[MapView]
    cam_parity: dict | None = None


def gradcam_images(paths, model=None, class_name: str | None = None, crops: int = 10, out=DEFAULT_OUT,
                   progress: bool = True, precision: str = "fp32", method: str | None = None,
                   layer: str | None = None) -> dict:
    """A panel per image for the predicted class (and ``class_name``), predictions and map peaks.

    ``model``: a checkpoint (its ``method`` at ``layer``: gradcam.core.METHODS, gradcam.layers; None: the
    default), or an export folder made with cam_output (its CAM, compared with the reference Grad-CAM at
    ``last`` of its source checkpoint(s), gated: the only map an exported graph gives without gradients,
    so an export takes no other method or layer); None: the newest runs/train/*/best.pt. ``precision``
    picks the export's graph. "ok" is False when any image failed or an export's CAM gate failed.
    """
    try:
        mode = crop_mode(crops)
        model_path = newest_checkpoint() if model is None else os.fspath(model)
        files, unlistable = expand_paths(paths)
        exported_map = _is_export(model_path)
        if exported_map and (method_key(method or REFERENCE_METHOD), layer or REFERENCE_LAYER) != (REFERENCE_METHOD,
                                                                                                   REFERENCE_LAYER):
            raise InputError(f"an export's CAM is the classifier-weight CAM of the map entering global pooling "
                             f"(= Grad-CAM at layer 'last', what validate's CAM parity checks); --method {method} "
                             f"--layer {layer} needs a checkpoint")
        if exported_map:
            manifest = load_manifest(model_path)
            exported = ExportedCam(manifest, precision)
            exported.require_cam()
            exported.check_crops(mode.name)
            reference, _ = load_reference(manifest)
            spec, classes = exported.spec, exported.classes
        else:
            exported = None
            reference, meta = load_checkpoint(model_path)
            spec, classes = PreprocessSpec.from_dict(meta["spec"]), list(meta["classes"])
        method = method_key(method or (REFERENCE_METHOD if exported_map else default_method(reference)))
        layer = layer or (REFERENCE_LAYER if exported_map else default_layer(reference, crops))
        explainer = (method, resolve_layer(reference, layer, probe=spec.crop))
        if not mode.cuts_crops and not explainer[1].is_last:
            raise InputError(f"dense maps exist at layer 'last' only, not {explainer[1].describe()}; "
                             "use --crops 10 or 1 for other layers")
        chosen = class_index(classes, class_name)
    except INPUT_ERRORS as exc:
        return {"ok": False, "error": str(exc)}

    failures = [{"path": folder, "error": reason} for folder, reason in unlistable]
    results, comparisons, used = [], [], set()
    for group, batch in image_groups(files, spec, failures, progress, "grad-cam"):
        for image, explained in zip(group, _explain_group(reference, exported, batch, spec, crops, chosen, classes,
                                                                    explainer)):
            if explained.cam_parity is not None:
                comparisons.append(explained.cam_parity)
            panel = os.path.join(os.fspath(out), panel_name(image.path, used))
            save_panel(panel, image.resized, explained.views, title=os.path.basename(image.path))
            results.append(_image_result(image, explained, classes, spec, panel))
    summary = {
        "model": model_path,
        "kind": "export" if exported else "checkpoint",
        "method": "CAM of the exported feature map" if exported else f"{method_name(method)} at {explainer[1].describe()}",
        "crops": crops,
        "class": class_name,
        "out": os.fspath(out),
        "images": len(results) + len(failures),
        "succeeded": len(results),
        "failed": len(failures),
        "results": results,
        "failures": failures,
    }
    if exported is not None:
        summary["precision"] = precision
        summary["cam_parity"] = cam_gate_report(comparisons, precision) if comparisons else None
    gate_ok = exported is None or not comparisons or summary["cam_parity"]["passed"]
    summary["ok"] = not failures and bool(results) and gate_ok
    return summary


def _is_export(path: str) -> bool:
    return os.path.isdir(path) or os.path.basename(path) == "manifest.json"


def _explain_group(reference: nn.Module, exported: ExportedCam | None, batch: Tensor, spec: PreprocessSpec,
                   crops: int, chosen: int | None, classes: list[str], explainer: tuple) -> list[Explained]:
    """Maps, panel views and per-image facts for one group of resized images; ``explainer`` = (method, Layer)
    of a checkpoint (None with an export)."""
    n = len(batch)
    target_sets = [None] + ([torch.full((n,), chosen)] if chosen is not None else [])
    if exported is None:
        cams = image_cams(reference, batch, spec, crops, target_sets, *explainer)
        shown = [(cam, f"{method_name(explainer[0])} {explainer[1].name}") for cam in cams]
        references = [None] * len(cams)
    else:
        cams = exported.image_cams(batch, crops, target_sets)
        # The reference explains the class the export predicted, so the two maps are comparable.
        references = image_cams(reference, batch, spec, crops, [cams[0].targets] + target_sets[1:], REFERENCE_METHOD,
                                REFERENCE_LAYER)
        shown = [(cam, f"export {exported.precision} CAM") for cam in cams]
    explained = []
    for i in range(n):
        views = []
        for (cam, label), ref in zip(shown, references):
            views.append(MapView(f"{label}: {classes[int(cam.targets[i])]}", cam.display[i]))
            if ref is not None:
                views.append(MapView(f"reference Grad-CAM: {classes[int(ref.targets[i])]}", ref.display[i]))
        parity = None if exported is None else compare_maps(references[0].maps[i:i + 1], cams[0].maps[i:i + 1])[0]
        explained.append(Explained(cams[0].logits[i], [cam.maps[i] for cam in cams],
                                   [int(cam.targets[i]) for cam in cams], views, parity))
    return explained


def _image_result(image: LoadedImage, explained: Explained, classes: list[str], spec: PreprocessSpec,
                  panel: str) -> dict:
    peaks = peak(torch.stack(explained.maps))
    locations = [peak_location(x, y, spec.resize, image.width, image.height) for x, y in peaks]
    result = {
        "path": image.path,
        "predicted": classes[explained.targets[0]],
        "top": top_classes(explained.logits, classes),
        "peak": locations[0],
        "panel": panel,
    }
    if len(explained.targets) > 1:
        result["class"] = {"class": classes[explained.targets[1]], "peak": locations[1]}
    if explained.cam_parity is not None:
        parity = explained.cam_parity
        result["cam_correlation"] = parity["correlation"]
        result["peak_distance_px"] = parity["peak_distance_px"]
        result["peak_distance_frac"] = parity["peak_distance_frac"]
    return result
