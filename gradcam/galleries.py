"""`gradcam --errors CHECKPOINT`: galleries of misclassified and correct test images with their maps,
and the pointing game (does the true class's map peak inside the object mask?), 1 vs 10 crops, per
method and layer when asked (gradcam.pointing_table)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from cnnbench.common.errors import InputError
from cnnbench.data.crops import DENSE, crop_mode
from cnnbench.data.folder import Sample
from cnnbench.data.spec import PreprocessSpec
from cnnbench.data.synth import mask_path
from cnnbench.gradcam.core import METHODS, default_layer, default_method, method_key, method_name
from cnnbench.gradcam.exported import REFERENCE_LAYER, REFERENCE_METHOD
from cnnbench.gradcam.images import DEFAULT_OUT, INPUT_ERRORS, check_positive, held_out_samples, image_groups
from cnnbench.gradcam.layers import Layer, map_sides, resolve_layer
from cnnbench.gradcam.panels import GalleryRow, MapView, save_gallery
from cnnbench.gradcam.pointing import ideal_map_hit, load_mask, peak_in_mask
from cnnbench.gradcam.pointing_table import GAMES, PointingTally, save_pointing_plot
from cnnbench.gradcam.tencrop import image_cams, layer_method_cams, peak
from cnnbench.models.checkpoint import load_checkpoint
from cnnbench.runtime.predict import newest_checkpoint

# The side-by-side gallery compares the galleries' method with Grad-CAM at ``last``: the map the seed
# report showed and the one exported graphs give (gradcam.exported), on this many correctly classified
# images (their true class is their predicted class, so one map each).
SIDE_BY_SIDE_IMAGES = 4


@dataclass
class Outcome:
    """One test image's prediction by the ``crops``-crop model."""

    sample: Sample
    predicted: int
    prob: float

    @property
    def correct(self) -> bool:
        return self.predicted == self.sample.label


def errors_gallery(checkpoint=None, data=None, limit: int = 16, crops: int = 10, out=None,
                   images: int | None = None, progress: bool = True, method: str | None = None,
                   layer: str | None = None, methods=None, layers=None) -> dict:
    """Grids of misclassified test images (maps of the true and the predicted class) and of correct
    ones, the ``crops``-crop model's predictions; with object masks, the pointing game, 1 vs 10 crops.

    Galleries show the ``limit`` most confident errors and ``limit`` correct images spread over the
    classes, explained with ``method`` at ``layer`` (gradcam.core.METHODS, gradcam.layers; None: the
    defaults, gradcam.core.default_method(model) / default_layer(model, crops)). The pointing
    game explains the TRUE class (it scores localisation, not classification): a hit when the map's
    peak on the resized image falls inside the object mask. ``methods`` / ``layers`` (lists, comma-separated
    names, or "all" for every method): also the pointing table over them (gradcam.pointing_table), with a
    bar chart; the galleries' method and layer are always among its rows.
    ``images``: scan at most this many test images, spread over the classes (None: all).
    """
    try:
        chosen = crop_mode(crops).name
        check_positive("limit", limit)
        path = newest_checkpoint() if checkpoint is None else os.fspath(checkpoint)
        model, meta = load_checkpoint(path)
        method = method_key(method or default_method(model))
        layer = layer or default_layer(model, crops)
        table_methods = _names(methods, list(METHODS), method_key, method)
        table_layers = _names(layers, None, str, layer)
        spec, classes = PreprocessSpec.from_dict(meta["spec"]), list(meta["classes"])
        resolved = {name: resolve_layer(model, name, probe=spec.crop) for name in table_layers}
        if chosen == DENSE.name and not resolved[layer].is_last:
            raise InputError(f"dense maps exist at layer 'last' only, not {resolved[layer].describe()}; "
                             "use --crops 10 or 1 for other layers")
        samples, origin = held_out_samples(data, classes, meta.get("record"), limit=images)
    except INPUT_ERRORS as exc:
        return {"ok": False, "error": str(exc)}
    run_name = os.path.basename(os.path.dirname(os.path.abspath(path))) or "model"
    out = os.fspath(out) if out is not None else os.path.join(DEFAULT_OUT, f"errors-{run_name}")
    with_masks = any(os.path.isfile(mask_path(s.path)) for s in samples)
    tabled = methods is not None or layers is not None
    if not with_masks:  # nothing to score: only the predictions of the galleries' layer and method
        resolved, table_methods = {layer: resolved[layer]}, [method]

    # Pass 1: every test image's prediction and, with masks, where its true-class maps peak for each
    # layer, crop mode and method (the layers share each crop mode's forward pass, the methods each
    # layer's backward).
    failures: list[dict] = []
    outcomes: list[Outcome] = []
    tally = PointingTally(chosen, {name: {"module": found.describe(), "cells": max(map_sides(model, found, spec.crop))}
                                   for name, found in resolved.items()}, table_methods)
    for group, batch in image_groups(samples, spec, failures, progress, "grad-cam errors"):
        labels = torch.tensor([g.label for g in group])
        cams = {}
        scored = {name: _scored_modes(chosen, found, with_masks) for name, found in resolved.items()}
        for c in dict.fromkeys(c for modes in scored.values() for c in modes):
            names = [name for name, modes in scored.items() if c in modes]  # one forward pass for all of them
            per_layer = layer_method_cams(model, batch, spec, c, [labels], table_methods, [resolved[n] for n in names],
                                          display=False)  # scored only: the galleries below make their own
            for name, per_method in zip(names, per_layer):
                cams[(name, c)] = [sets[0] for sets in per_method]
        probs = torch.softmax(cams[(layer, chosen)][0].logits, dim=1)
        for i, image in enumerate(group):
            predicted = int(probs[i].argmax())
            outcomes.append(Outcome(Sample(image.path, image.label), predicted, float(probs[i, predicted])))
            mask = load_mask(image.path) if with_masks else None
            if mask is None:
                continue
            for (name, c), per_method in cams.items():
                for key, cam in zip(table_methods, per_method):
                    x, y = peak(cam.maps[i:i + 1])[0]
                    tally.add(name, key, c, peak_in_mask(x, y, spec.resize, mask))
            tally.correct.append(outcomes[-1].correct)
            ideal: dict[tuple[int, str], bool] = {}  # layers of one resolution share the ideal map
            for name, facts in tally.layers.items():
                for c in GAMES:
                    if (facts["cells"], c) not in ideal:
                        ideal[(facts["cells"], c)] = ideal_map_hit(mask, spec, c, facts["cells"])
                    tally.add_ideal(name, c, ideal[(facts["cells"], c)])
    if not outcomes:
        return {"ok": False, "error": f"none of the {len(samples)} test images could be read", "failures": failures}

    # Pass 2: maps for the few images the galleries show.
    wrong = sorted((o for o in outcomes if not o.correct), key=lambda o: -o.prob)[:limit]
    right = _round_robin([o for o in outcomes if o.correct], limit)
    shown = f"{method_name(method)} at {resolved[layer].describe()}"
    explainer = (method, resolved[layer])
    galleries = {
        "errors": _gallery(model, wrong, spec, crops, classes, os.path.join(out, "errors.png"),
                           f"{run_name}: misclassified test images ({crops} crop(s)); {shown} of the true and the "
                           "predicted class", both_classes=True, explainer=explainer),
        "correct": _gallery(model, right, spec, crops, classes, os.path.join(out, "correct.png"),
                            f"{run_name}: correctly classified test images ({crops} crop(s)); {shown}",
                            both_classes=False, explainer=explainer),
    }
    if (method, resolved[layer].paths) != (REFERENCE_METHOD, resolve_layer(model, REFERENCE_LAYER).paths):
        galleries["side_by_side"] = _side_by_side(model, right[:SIDE_BY_SIDE_IMAGES], spec, crops, classes,
                                                  os.path.join(out, "side_by_side.png"), run_name, explainer)
    correct = sum(o.correct for o in outcomes)
    pointing = table = None
    if with_masks and tally.correct:
        table = tally.table()
        row, facts = tally.row(layer, method), table["layers"][layer]
        # The ``crops`` game split by that model's prediction: how much of the shortfall is on images it
        # gets wrong anyway.
        pointing = {"explained": "true class", "1_crop": row["1_crop"], "10_crops": row["10_crops"],
                    "ideal_map": {"cells": facts["cells"], **facts["ideal_map"]}, "by_prediction": row["by_prediction"]}
        if chosen == DENSE.name:  # the full-image maps of dense ten crops, scored the same way
            pointing["dense"] = row["dense"]
        if tabled:
            table["png"] = save_pointing_plot(table, os.path.join(out, "pointing.png"))
    return {
        "ok": True,
        "checkpoint": path,
        "crops": crops,
        "method": method,
        "layer": resolved[layer].describe(),
        "images": {**origin, "n_images": len(outcomes), "skipped": failures},
        "top1": 100.0 * correct / len(outcomes),
        "misclassified": len(outcomes) - correct,
        "galleries": galleries,
        "pointing_game": pointing,
        "pointing_game_note": None if pointing else "no object masks beside the test images (the embedded set has them)",
        "pointing_table": table if tabled else None,
        "out": out,
    }


def _names(value, every: list[str] | None, canonical, first: str) -> list[str]:
    """--methods / --layers: None, "all" (methods only), a comma-separated string or a list -> names
    (``first``, the galleries' own, leads), without repeats."""
    if value is None:
        return [first]
    if isinstance(value, str):
        value = every if (value == "all" and every is not None) else [v.strip() for v in value.split(",") if v.strip()]
    if not value:
        raise InputError("an empty list of names; give at least one (or 'all' for every method)")
    return list(dict.fromkeys([first, *(canonical(v) for v in value)]))


def _scored_modes(chosen: str, layer: Layer, with_masks: bool) -> list[str]:
    """The crop modes a layer is explained with: the galleries' mode (dense at ``last`` only), and with
    masks one crop and ten crops for the pointing game."""
    modes = [chosen] if (chosen != DENSE.name or layer.is_last) else []
    return list(dict.fromkeys(modes + (list(GAMES) if with_masks else [])))


def _gallery(model: nn.Module, outcomes: list[Outcome], spec: PreprocessSpec, crops: int, classes: list[str],
             path: str, title: str, both_classes: bool, explainer: tuple[str, Layer]) -> str | None:
    """A gallery of ``outcomes``: each image with the map of its predicted class (and of its true class),
    ``explainer`` = (method, layer)."""
    if not outcomes:
        return None
    rows, failures = [], []
    for group, batch in image_groups([o.sample for o in outcomes], spec, failures, False, "gallery"):
        labels = torch.tensor([g.label for g in group])
        predicted_cam, true_cam = image_cams(model, batch, spec, crops, [None, labels], *explainer)
        for i, image in enumerate(group):
            pred = int(predicted_cam.targets[i])
            prob = float(torch.softmax(predicted_cam.logits[i], dim=0)[pred])
            views = [MapView(f"pred: {classes[pred]} ({prob:.2f})", predicted_cam.display[i])]
            if both_classes:
                views.insert(0, MapView(f"true: {classes[image.label]}", true_cam.display[i]))
            label = os.path.basename(image.path) if both_classes else classes[image.label]
            rows.append(GalleryRow(image.resized, label, views))
    return save_gallery(path, rows, title, columns=2 if both_classes else 3) if rows else None


def _side_by_side(model: nn.Module, outcomes: list[Outcome], spec: PreprocessSpec, crops, classes: list[str],
                  path: str, run_name: str, explainer: tuple[str, Layer]) -> str | None:
    """Correctly classified images, each with Grad-CAM at ``last`` beside ``explainer``'s map (true class)."""
    if not outcomes:
        return None
    baseline_layer = resolve_layer(model, REFERENCE_LAYER)
    mine = f"{method_name(explainer[0])} {explainer[1].name}"
    baseline = f"{method_name(REFERENCE_METHOD)} {baseline_layer.name}"
    rows, failures = [], []
    for group, batch in image_groups([o.sample for o in outcomes], spec, failures, False, "side by side"):
        labels = torch.tensor([g.label for g in group])
        (chosen,) = image_cams(model, batch, spec, crops, [labels], *explainer)
        (reference,) = image_cams(model, batch, spec, crops, [labels], REFERENCE_METHOD, baseline_layer)
        for i, image in enumerate(group):
            rows.append(GalleryRow(image.resized, classes[image.label],
                                   [MapView(baseline, reference.display[i]), MapView(mine, chosen.display[i])]))
    title = f"{run_name}: {mine} beside {baseline} ({crops} crop(s), true class)"
    return save_gallery(path, rows, title, columns=2) if rows else None


def _round_robin(outcomes: list[Outcome], limit: int) -> list[Outcome]:
    """Up to ``limit`` outcomes, taking one per class in turn (so a gallery shows many classes)."""
    by_class: dict[int, list[Outcome]] = {}
    for outcome in outcomes:
        by_class.setdefault(outcome.sample.label, []).append(outcome)
    queues = [by_class[c] for c in sorted(by_class)]
    picked = []
    while len(picked) < limit and any(queues):
        for queue in queues:
            if queue and len(picked) < limit:
                picked.append(queue.pop(0))
    return picked
