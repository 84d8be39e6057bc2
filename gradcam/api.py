"""What cli.py calls: explain images, validate an export, galleries of errors with the pointing game.

Each function returns a JSON-serialisable dict with ``ok``; a problem with the inputs as a whole
(no model, unknown class) gives ``ok: False`` and ``error``; a bad image gets its own named error
and the other images go on.
"""
from __future__ import annotations

import heapq
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from common import atomic_write_json, topk_indices
from data.folder import Sample, scan_folder
from data.images import ImageError, load_rgb
from data.spec import PreprocessSpec
from data.split import load_split, make_split, spread_evenly
from data.synth import mask_path
from data.transforms import resize_uint8
from export import ExportError, load_manifest
from export.ort import logits_runner
from export.pipeline import PARITY_IMAGES
from export.parity import apply_gates, compare_logits, exported_logits, reference_logits
from gradcam.exported import ExportedCam, cam_gate_report, compare_maps, load_reference
from gradcam.panels import GalleryRow, MapView, save_gallery, save_panel
from gradcam.pointing import load_mask, peak_in_mask, peak_location, pointing_summary
from gradcam.tencrop import cut_crops, image_cam, image_cams, peak
from models.checkpoint import CheckpointError, load_checkpoint
from models.tencrop import TenCropModel
from runtime.predict import expand_paths, newest_checkpoint

DEFAULT_OUT = os.path.join("runs", "gradcam")
IMAGES_PER_PASS = 8  # images explained together (times the number of crops)
TOP_K = 5
MOST_MOVED = 4  # validate: panels for this many images whose exported map moved most
MAX_PANELS = 200  # validate: cap on top-1 difference panels per artifact, so a broken export cannot flood the disk
_INPUT_ERRORS = (ValueError, FileNotFoundError, CheckpointError, ExportError)


@dataclass
class LoadedImage:
    path: str
    width: int
    height: int
    resized: Tensor  # uint8 [3, R, R]
    label: int | None = None


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[gradcam] {message}", file=sys.stderr, flush=True)


def _load_one(sample: Sample | str, spec: PreprocessSpec) -> LoadedImage:
    """Decode and resize one file; raises ImageError."""
    path, label = (sample.path, sample.label) if isinstance(sample, Sample) else (os.fspath(sample), None)
    img = load_rgb(path)
    return LoadedImage(path, img.width, img.height, resize_uint8(img, spec), label)


def _groups(samples: list, spec: PreprocessSpec, failures: list[dict], progress: bool, desc: str):
    """Groups of up to IMAGES_PER_PASS readable images with their stacked uint8 tensor, loaded as
    they are needed; unreadable files are appended to ``failures`` as {"path", "error"}."""
    bar = tqdm(total=len(samples), desc=desc, unit="img", disable=not progress, file=sys.stderr)
    for start in range(0, len(samples), IMAGES_PER_PASS):
        group = []
        for sample in samples[start:start + IMAGES_PER_PASS]:
            try:
                group.append(_load_one(sample, spec))
            except ImageError as exc:
                failures.append({"path": exc.path, "error": exc.reason})
        bar.update(len(samples[start:start + IMAGES_PER_PASS]))
        if group:
            yield group, torch.stack([g.resized for g in group])
    bar.close()


def _top(logits: Tensor, classes: list[str]) -> list[dict]:
    """Top-5 of one image's [K] logits: softmax probabilities, best first."""
    probs = torch.softmax(logits.double(), dim=0).numpy()
    return [{"class": classes[c], "prob": float(probs[c])} for c in topk_indices(logits.numpy()[None], TOP_K)[0]]


def _class_index(classes: list[str], class_name: str | None) -> int | None:
    if class_name is None:
        return None
    if class_name in classes:
        return classes.index(class_name)
    shown = ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else "")
    raise ValueError(f"unknown class {class_name!r}; the model's classes are: {shown}")


def _panel_name(path: str, used: set[str], suffix: str = "") -> str:
    """File name for an image's panel: its stem, made unique when two inputs share one."""
    stem = os.path.splitext(os.path.basename(path))[0] + suffix
    name, n = f"{stem}.png", 1
    while name in used:
        n += 1
        name = f"{stem}-{n}.png"
    used.add(name)
    return name


def _is_export(path: str) -> bool:
    return os.path.isdir(path) or os.path.basename(path) == "manifest.json"


# ---------------------------------------------------------------------------------------------------
# gradcam IMG...


def gradcam_images(paths, model=None, class_name: str | None = None, crops: int = 10, out=DEFAULT_OUT,
                   progress: bool = True, precision: str = "fp32") -> dict:
    """A panel per image for the predicted class (and ``class_name``), predictions and map peaks.

    ``model``: a checkpoint (reference Grad-CAM), or an export folder made with cam_output (its CAM,
    compared with the reference Grad-CAM of its source checkpoint(s), gated); None: the newest
    runs/train/*/best.pt. ``precision`` picks the export's graph. "ok" is False when any image failed
    or an export's CAM gate failed.
    """
    try:
        if crops not in (1, 10):
            raise ValueError(f"crops must be 1 or 10, got {crops}")
        model_path = newest_checkpoint() if model is None else os.fspath(model)
        files, unlistable = expand_paths(paths)
        if _is_export(model_path):
            manifest = load_manifest(model_path)
            exported = ExportedCam(manifest, precision)
            exported.require_cam()
            if exported.ten_crop_in_graph and crops != 10:
                raise ValueError(f"{model_path}: this export cuts ten crops inside its graph; use crops=10")
            reference, _ = load_reference(manifest)
            spec, classes = exported.spec, exported.classes
        else:
            exported = None
            reference, meta = load_checkpoint(model_path)
            spec, classes = PreprocessSpec.from_dict(meta["spec"]), list(meta["classes"])
        chosen = _class_index(classes, class_name)
    except _INPUT_ERRORS as exc:
        return {"ok": False, "error": str(exc)}

    failures = [{"path": folder, "error": reason} for folder, reason in unlistable]
    results, comparisons, used = [], [], set()
    for group, batch in _groups(files, spec, failures, progress, "grad-cam"):
        views_per_image, rows = _explain_group(reference, exported, batch, spec, crops, chosen, classes)
        comparisons += [r["cam_parity"] for r in rows if "cam_parity" in r]
        for image, views, row in zip(group, views_per_image, rows):
            panel = os.path.join(os.fspath(out), _panel_name(image.path, used))
            save_panel(panel, image.resized, views, title=os.path.basename(image.path))
            results.append(_image_result(image, row, classes, spec, panel))
    summary = {
        "model": model_path,
        "kind": "export" if exported else "checkpoint",
        "method": "CAM of the exported feature map" if exported else "Grad-CAM",
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


def _explain_group(reference: nn.Module, exported: ExportedCam | None, batch: Tensor, spec: PreprocessSpec,
                   crops: int, chosen: int | None, classes: list[str]) -> tuple[list[list[MapView]], list[dict]]:
    """Maps, panel views and per-image facts for one group of resized images."""
    n = len(batch)
    target_sets = [None] + ([torch.full((n,), chosen)] if chosen is not None else [])
    if exported is None:
        cams = image_cams(reference, batch, spec, crops, target_sets)
        shown = [(cam, "Grad-CAM") for cam in cams]
        references = [None] * len(cams)
    else:
        cams = exported.image_cams(batch, crops, target_sets)
        # The reference explains the class the export predicted, so the two maps are comparable.
        references = image_cams(reference, batch, spec, crops, [cams[0].targets] + target_sets[1:])
        shown = [(cam, f"export {exported.precision} CAM") for cam in cams]
    views, rows = [], []
    for i in range(n):
        image_views, row = [], {"logits": cams[0].logits[i], "maps": [cam.maps[i] for cam in cams],
                                "targets": [int(cam.targets[i]) for cam in cams]}
        for (cam, label), ref in zip(shown, references):
            image_views.append(MapView(f"{label}: {classes[int(cam.targets[i])]}", cam.maps[i]))
            if ref is not None:
                image_views.append(MapView(f"reference Grad-CAM: {classes[int(ref.targets[i])]}", ref.maps[i]))
        if exported is not None:
            row["cam_parity"] = compare_maps(references[0].maps[i:i + 1], cams[0].maps[i:i + 1])[0]
        views.append(image_views)
        rows.append(row)
    return views, rows


def _image_result(image: LoadedImage, row: dict, classes: list[str], spec: PreprocessSpec, panel: str) -> dict:
    peaks = peak(torch.stack(row["maps"]))
    locations = [peak_location(x, y, spec.resize, image.width, image.height) for x, y in peaks]
    result = {
        "path": image.path,
        "predicted": classes[row["targets"][0]],
        "top": _top(row["logits"], classes),
        "peak": locations[0],
        "panel": panel,
    }
    if len(row["targets"]) > 1:
        result["class"] = {"class": classes[row["targets"][1]], "peak": locations[1]}
    if "cam_parity" in row:
        parity = row["cam_parity"]
        result["cam_correlation"] = parity["correlation"]
        result["peak_distance_px"] = parity["peak_distance_px"]
        result["peak_distance_frac"] = parity["peak_distance_frac"]
    return result


# ---------------------------------------------------------------------------------------------------
# validate EXPORT


def _test_samples(record: dict, data, classes: list[str]) -> tuple[list[Sample], dict]:
    """The held-out images: the checkpoint's saved split, or a seed-0 split of ``data``."""
    if data is not None:
        split = make_split(scan_folder(data), seed=0)
        origin = {"source": "seed-0 split of a folder", "path": os.path.abspath(os.fspath(data))}
    else:
        split_path = record.get("split")
        if not split_path:
            raise ValueError("no split recorded with the model; pass data=<folder> (--data)")
        if not os.path.isfile(split_path):
            raise FileNotFoundError(f"split file {split_path} recorded with the model is missing; pass data=<folder> (--data)")
        split = load_split(split_path)
        origin = {"source": "test split", "path": split_path}
    if split.classes != classes:
        raise ValueError(f"the model's {len(classes)} classes differ from the split's {len(split.classes)} "
                         f"({origin['path']}); validate on the data it was trained on")
    if not split.test:
        raise ValueError(f"the test split is empty ({origin['path']})")
    return split.test, origin


@dataclass
class _ArtifactCheck:
    """What validate accumulates for one exported graph over the image groups."""

    exported: ExportedCam
    logits: list
    cam_rows: list
    differs: list
    moved: list  # heap of (-(1 - correlation), counter, facts) keeping the MOST_MOVED lowest correlations


def validate_export(export_dir, data=None, out=None, limit: int | None = None, progress: bool = True) -> dict:
    """The held-out test split through the reference and the export's ONNX graphs (ONNX Runtime, CPU).

    Per graph: the numeric parity gates (export.parity, on the inputs the export's parity uses:
    centre crops, or resized images for an in-graph ten-crop graph), and with cam_output the CAM
    gate (ten crops). ``limit`` caps the images of the Grad-CAM comparison (the costly part); the
    parity gates still see at least PARITY_IMAGES images (their 99 % rates need over a hundred to
    mean anything), or all of the split when it is smaller. Panels for every image whose ten-crop
    top-1 differs (reference map of the reference's class vs exported map of the export's class; the
    reference's Grad-CAM of both classes when the export has no CAM) and for the MOST_MOVED images
    whose maps moved most. The JSON report goes atomically to ``out``/validation.json (default:
    <export>/validation/).
    """
    try:
        manifest = load_manifest(export_dir)
        reference, meta = load_reference(manifest)
        spec, classes = PreprocessSpec.from_dict(manifest["spec"]), list(manifest["classes"])
        samples, origin = _test_samples(meta.get("record", {}), data, classes)
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        samples = spread_evenly(samples, None if limit is None else max(limit, PARITY_IMAGES))
        cam_paths = {s.path for s in spread_evenly(samples, limit)}
        precisions = [a["precision"] for a in manifest["artifacts"] if a["format"] == "onnx"]
        checks = {p: _ArtifactCheck(ExportedCam(manifest, p), [], [], [], []) for p in precisions}
    except _INPUT_ERRORS as exc:
        return {"ok": False, "error": str(exc)}
    out = os.fspath(out) if out is not None else os.path.join(manifest["export_dir"], "validation")
    in_graph = bool(manifest.get("ten_crop_in_graph"))
    parity_reference = TenCropModel(reference, spec).eval() if in_graph else reference

    _log(progress, f"{manifest['name']}: {len(samples)} test images for parity, {len(cam_paths)} of them for "
                   f"Grad-CAM; graphs {', '.join(precisions)}")
    reference_chunks, failures, used, counter, cam_images = [], [], set(), 0, 0
    for group, batch in _groups(samples, spec, failures, progress, f"validate {manifest['name']}"):
        parity_input = batch if in_graph else cut_crops(batch, spec, 1)[:, 0]
        reference_chunks.append(reference_logits(parity_reference, parity_input))
        for check in checks.values():
            check.logits.append(exported_logits(logits_runner(check.exported.session), parity_input))
        picked = [i for i, image in enumerate(group) if image.path in cam_paths]
        if not picked:
            continue
        cam_group, cam_batch = [group[i] for i in picked], batch[picked]
        cam_images += len(picked)
        ref_cam = image_cam(reference, cam_batch, spec, crops=10)
        for check in checks.values():
            counter = _compare_group(check, reference, cam_group, cam_batch, spec, ref_cam, classes, out, used, counter)

    if not reference_chunks:
        return {"ok": False, "error": f"none of the {len(samples)} test images could be read", "failures": failures}
    expected = np.concatenate(reference_chunks)
    artifacts, problems = {}, []
    for precision, check in checks.items():
        parity = apply_gates(compare_logits(expected, np.concatenate(check.logits)), precision)
        cam = cam_gate_report(check.cam_rows, precision) if check.cam_rows else None
        moved = [facts for _, _, facts in sorted(check.moved, reverse=True)]
        for facts in moved:
            facts["panel"] = _moved_panel(facts, out, used, classes)
        artifacts[precision] = {
            "file": check.exported.file,
            "parity": parity,
            "cam": cam,
            "top1_differs": check.differs,
            "moved_most": [{k: v for k, v in f.items() if not k.startswith("_")} for f in moved],
        }
        problems += [f"{precision}: parity gate {name} failed" for name, g in parity["gates"].items() if not g["passed"]]
        if cam is not None and not cam["passed"]:
            problems.append(f"{precision}: CAM correlation {cam['mean_correlation']:.4f} < {cam['gate']['limit']}")
    report = {
        "ok": not problems,
        "export": manifest["name"],
        "export_dir": manifest["export_dir"],
        "kind": manifest["kind"],
        "images": {**origin, "n_images": len(expected), "cam_images": cam_images, "skipped": failures},
        "parity_input": "resized uint8 image (ten crops in the graph)" if in_graph else "normalised centre crop",
        "cam_crops": 10,
        "artifacts": artifacts,
        "problems": problems,
        "out": out,
        "report": os.path.join(out, "validation.json"),
    }
    atomic_write_json(report["report"], report)
    return report


def _compare_group(check: _ArtifactCheck, reference: nn.Module, group: list[LoadedImage], batch: Tensor,
                   spec: PreprocessSpec, ref_cam, classes: list[str], out: str, used: set[str], counter: int) -> int:
    """Exported maps and predictions of one group vs the reference's; panels for changed top-1."""
    exported = check.exported
    if exported.has_cam:
        same_class, own = exported.image_cams(batch, 10, [ref_cam.targets, None])
        rows = compare_maps(ref_cam.maps, same_class.maps)
        check.cam_rows += rows
        exported_targets, exported_maps = own.targets, own.maps
        for i, row in enumerate(rows):
            facts = {"path": group[i].path, "correlation": row["correlation"],
                     "peak_distance_px": row["peak_distance_px"], "class": classes[int(ref_cam.targets[i])],
                     "_image": group[i].resized, "_maps": (ref_cam.maps[i], same_class.maps[i]),
                     "_precision": exported.precision}
            counter += 1
            entry = (1.0 - row["correlation"], counter, facts)
            if len(check.moved) < MOST_MOVED:
                heapq.heappush(check.moved, entry)
            else:
                heapq.heappushpop(check.moved, entry)
    else:
        exported_targets, exported_maps = exported.image_logits(batch, 10).argmax(dim=1), None
    for i in torch.nonzero(exported_targets != ref_cam.targets).flatten().tolist():
        ref_class, exp_class = int(ref_cam.targets[i]), int(exported_targets[i])
        entry = {"path": group[i].path, "reference": classes[ref_class], "exported": classes[exp_class]}
        if len(check.differs) < MAX_PANELS:
            if exported_maps is not None:
                exp_view = MapView(f"export {exported.precision} CAM: {classes[exp_class]}", exported_maps[i])
            else:
                other = image_cam(reference, batch[i:i + 1], spec, crops=10, targets=torch.tensor([exp_class]))
                exp_view = MapView(f"reference Grad-CAM: {classes[exp_class]} (export's class)", other.maps[0])
            views = [MapView(f"reference Grad-CAM: {classes[ref_class]}", ref_cam.maps[i]), exp_view]
            name = _panel_name(group[i].path, used, f"_{exported.precision}_top1")
            entry["panel"] = save_panel(os.path.join(out, name), group[i].resized, views,
                                        title=f"top-1 differs ({exported.precision}): {os.path.basename(group[i].path)}")
        check.differs.append(entry)
    return counter


def _moved_panel(facts: dict, out: str, used: set[str], classes: list[str]) -> str:
    reference_map, exported_map = facts["_maps"]
    precision = facts["_precision"]
    views = [MapView(f"reference Grad-CAM: {facts['class']}", reference_map),
             MapView(f"export {precision} CAM: {facts['class']}", exported_map)]
    name = _panel_name(facts["path"], used, f"_{precision}_moved")
    title = f"r = {facts['correlation']:.4f}, peaks {facts['peak_distance_px']:.1f} px apart"
    return save_panel(os.path.join(out, name), facts["_image"], views, title=title)


# ---------------------------------------------------------------------------------------------------
# gradcam --errors CHECKPOINT


def errors_gallery(checkpoint=None, data=None, limit: int = 16, crops: int = 10, out=None,
                   images: int | None = None, progress: bool = True) -> dict:
    """Grids of misclassified test images (maps of the true and the predicted class) and of correct
    ones, the ``crops``-crop model's predictions; with object masks, the pointing game, 1 vs 10 crops.

    Galleries show the ``limit`` most confident errors and ``limit`` correct images spread over the
    classes. The pointing game explains the TRUE class (it scores localisation, not classification):
    a hit when the map's peak on the resized image falls inside the object mask.
    ``images``: scan at most this many test images, spread over the classes (None: all).
    """
    try:
        if crops not in (1, 10):
            raise ValueError(f"crops must be 1 or 10, got {crops}")
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        path = newest_checkpoint() if checkpoint is None else os.fspath(checkpoint)
        model, meta = load_checkpoint(path)
        spec, classes = PreprocessSpec.from_dict(meta["spec"]), list(meta["classes"])
        samples, origin = _test_samples(meta.get("record", {}), data, classes)
        samples = spread_evenly(samples, images)
    except _INPUT_ERRORS as exc:
        return {"ok": False, "error": str(exc)}
    run_name = os.path.basename(os.path.dirname(os.path.abspath(path))) or "model"
    out = os.fspath(out) if out is not None else os.path.join(DEFAULT_OUT, f"errors-{run_name}")
    with_masks = any(os.path.isfile(mask_path(s.path)) for s in samples)
    settings = sorted({crops, 1, 10} if with_masks else {crops})

    # Pass 1: every test image's prediction and, with masks, where its true-class maps peak.
    failures: list[dict] = []
    outcomes, hits = [], {c: [] for c in settings}
    for group, batch in _groups(samples, spec, failures, progress, "grad-cam errors"):
        labels = torch.tensor([g.label for g in group])
        cams = {c: image_cams(model, batch, spec, c, [labels]) for c in settings}
        probs = torch.softmax(cams[crops][0].logits, dim=1)
        for i, image in enumerate(group):
            predicted = int(probs[i].argmax())
            outcomes.append({"sample": Sample(image.path, image.label), "predicted": predicted,
                             "prob": float(probs[i, predicted])})
            mask = load_mask(image.path) if with_masks else None
            if mask is not None:
                for c in settings:
                    x, y = peak(cams[c][0].maps[i:i + 1])[0]
                    hits[c].append(peak_in_mask(x, y, spec.resize, mask))
    if not outcomes:
        return {"ok": False, "error": f"none of the {len(samples)} test images could be read", "failures": failures}

    # Pass 2: maps for the few images the galleries show.
    wrong = sorted((o for o in outcomes if o["predicted"] != o["sample"].label), key=lambda o: -o["prob"])[:limit]
    right = _round_robin([o for o in outcomes if o["predicted"] == o["sample"].label], limit)
    galleries = {
        "errors": _gallery(model, wrong, spec, crops, classes, os.path.join(out, "errors.png"),
                           f"{run_name}: misclassified test images ({crops} crop(s)); maps of the true and the "
                           "predicted class", both_classes=True),
        "correct": _gallery(model, right, spec, crops, classes, os.path.join(out, "correct.png"),
                            f"{run_name}: correctly classified test images ({crops} crop(s))", both_classes=False),
    }
    correct = sum(o["predicted"] == o["sample"].label for o in outcomes)
    pointing = None
    if with_masks and hits[10]:
        pointing = {"explained": "true class", "1_crop": pointing_summary(hits[1]),
                    "10_crops": pointing_summary(hits[10])}
    return {
        "ok": True,
        "checkpoint": path,
        "crops": crops,
        "images": {**origin, "n_images": len(outcomes), "skipped": failures},
        "top1": 100.0 * correct / len(outcomes),
        "misclassified": len(outcomes) - correct,
        "galleries": galleries,
        "pointing_game": pointing,
        "pointing_game_note": None if pointing else "no object masks beside the test images (the embedded set has them)",
        "out": out,
    }


def _gallery(model: nn.Module, outcomes: list[dict], spec: PreprocessSpec, crops: int, classes: list[str],
             path: str, title: str, both_classes: bool) -> str | None:
    """A gallery of ``outcomes``: each image with the map of its predicted class (and of its true class)."""
    if not outcomes:
        return None
    rows, failures = [], []
    for group, batch in _groups([o["sample"] for o in outcomes], spec, failures, False, "gallery"):
        labels = torch.tensor([g.label for g in group])
        predicted_cam, true_cam = image_cams(model, batch, spec, crops, [None, labels])
        for i, image in enumerate(group):
            pred = int(predicted_cam.targets[i])
            prob = float(torch.softmax(predicted_cam.logits[i], dim=0)[pred])
            views = [MapView(f"pred: {classes[pred]} ({prob:.2f})", predicted_cam.maps[i])]
            if both_classes:
                views.insert(0, MapView(f"true: {classes[image.label]}", true_cam.maps[i]))
            label = os.path.basename(image.path) if both_classes else classes[image.label]
            rows.append(GalleryRow(image.resized, label, views))
    return save_gallery(path, rows, title, columns=2 if both_classes else 3) if rows else None


def _round_robin(facts: list, limit: int) -> list:
    """Up to ``limit`` items, taking one per class in turn (so a gallery shows many classes)."""
    by_class: dict[int, list] = {}
    for f in facts:
        by_class.setdefault(f["sample"].label, []).append(f)
    queues = [by_class[c] for c in sorted(by_class)]
    picked = []
    while len(picked) < limit and any(queues):
        for queue in queues:
            if queue and len(picked) < limit:
                picked.append(queue.pop(0))
    return picked
