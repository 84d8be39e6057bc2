"""`gradcam --errors CHECKPOINT`: galleries of misclassified and correct test images with their maps,
and the pointing game (does the true class's map peak inside the object mask?), 1 vs 10 crops."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from data.crops import CENTRE, DENSE, TEN, crop_mode
from data.folder import Sample
from data.spec import PreprocessSpec
from data.synth import mask_path
from gradcam.images import DEFAULT_OUT, INPUT_ERRORS, check_positive, held_out_samples, image_groups
from gradcam.panels import GalleryRow, MapView, save_gallery
from gradcam.pointing import ideal_map_hit, load_mask, peak_in_mask, pointing_summary
from gradcam.tencrop import image_cams, peak
from models.checkpoint import load_checkpoint
from runtime.predict import newest_checkpoint


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
                   images: int | None = None, progress: bool = True) -> dict:
    """Grids of misclassified test images (maps of the true and the predicted class) and of correct
    ones, the ``crops``-crop model's predictions; with object masks, the pointing game, 1 vs 10 crops.

    Galleries show the ``limit`` most confident errors and ``limit`` correct images spread over the
    classes. The pointing game explains the TRUE class (it scores localisation, not classification):
    a hit when the map's peak on the resized image falls inside the object mask.
    ``images``: scan at most this many test images, spread over the classes (None: all).
    """
    try:
        chosen = crop_mode(crops).name
        check_positive("limit", limit)
        path = newest_checkpoint() if checkpoint is None else os.fspath(checkpoint)
        model, meta = load_checkpoint(path)
        spec, classes = PreprocessSpec.from_dict(meta["spec"]), list(meta["classes"])
        samples, origin = held_out_samples(data, classes, meta.get("record"), limit=images)
    except INPUT_ERRORS as exc:
        return {"ok": False, "error": str(exc)}
    run_name = os.path.basename(os.path.dirname(os.path.abspath(path))) or "model"
    out = os.fspath(out) if out is not None else os.path.join(DEFAULT_OUT, f"errors-{run_name}")
    with_masks = any(os.path.isfile(mask_path(s.path)) for s in samples)
    settings = sorted({chosen, CENTRE.name, TEN.name} if with_masks else {chosen})

    # Pass 1: every test image's prediction and, with masks, where its true-class maps peak.
    failures: list[dict] = []
    outcomes: list[Outcome] = []
    hits = {c: [] for c in settings}
    cells = _last_map_side(model, spec)
    ideal = {c: [] for c in (CENTRE.name, TEN.name)}  # the ceiling: ideal_map_hit
    hit_correct = []  # per entry of each hits list: did the ``crops``-crop model classify the image correctly
    for group, batch in image_groups(samples, spec, failures, progress, "grad-cam errors"):
        labels = torch.tensor([g.label for g in group])
        cams = {c: image_cams(model, batch, spec, c, [labels]) for c in settings}
        probs = torch.softmax(cams[chosen][0].logits, dim=1)
        for i, image in enumerate(group):
            predicted = int(probs[i].argmax())
            outcomes.append(Outcome(Sample(image.path, image.label), predicted, float(probs[i, predicted])))
            mask = load_mask(image.path) if with_masks else None
            if mask is not None:
                for c in settings:
                    x, y = peak(cams[c][0].maps[i:i + 1])[0]
                    hits[c].append(peak_in_mask(x, y, spec.resize, mask))
                hit_correct.append(outcomes[-1].correct)
                for c in ideal:
                    ideal[c].append(ideal_map_hit(mask, spec, c, cells))
    if not outcomes:
        return {"ok": False, "error": f"none of the {len(samples)} test images could be read", "failures": failures}

    # Pass 2: maps for the few images the galleries show.
    wrong = sorted((o for o in outcomes if not o.correct), key=lambda o: -o.prob)[:limit]
    right = _round_robin([o for o in outcomes if o.correct], limit)
    galleries = {
        "errors": _gallery(model, wrong, spec, crops, classes, os.path.join(out, "errors.png"),
                           f"{run_name}: misclassified test images ({crops} crop(s)); maps of the true and the "
                           "predicted class", both_classes=True),
        "correct": _gallery(model, right, spec, crops, classes, os.path.join(out, "correct.png"),
                            f"{run_name}: correctly classified test images ({crops} crop(s))", both_classes=False),
    }
    correct = sum(o.correct for o in outcomes)
    pointing = None
    if with_masks and hits[TEN.name]:
        scored = list(zip(hits[chosen], hit_correct))
        # The ``crops`` game split by that model's prediction: how much of the shortfall is on images it
        # gets wrong anyway.
        pointing = {"explained": "true class", "1_crop": pointing_summary(hits[CENTRE.name]),
                    "10_crops": pointing_summary(hits[TEN.name]),
                    "ideal_map": {"cells": cells, "1_crop": pointing_summary(ideal[CENTRE.name]),
                                  "10_crops": pointing_summary(ideal[TEN.name])},
                    "by_prediction": {"crops": chosen,
                                      "correct": pointing_summary([hit for hit, right in scored if right]),
                                      "misclassified": pointing_summary([hit for hit, right in scored if not right])}}
        if chosen == DENSE.name:  # the full-image maps of dense ten crops, scored the same way
            pointing["dense"] = pointing_summary(hits[DENSE.name])
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


def _last_map_side(model: nn.Module, spec: PreprocessSpec) -> int:
    """The side of the maps Grad-CAM weighs (forward_features) for one crop."""
    with torch.no_grad():
        return int(model.forward_features(torch.zeros(1, 3, spec.crop, spec.crop)).shape[-1])


def _gallery(model: nn.Module, outcomes: list[Outcome], spec: PreprocessSpec, crops: int, classes: list[str],
             path: str, title: str, both_classes: bool) -> str | None:
    """A gallery of ``outcomes``: each image with the map of its predicted class (and of its true class)."""
    if not outcomes:
        return None
    rows, failures = [], []
    for group, batch in image_groups([o.sample for o in outcomes], spec, failures, False, "gallery"):
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
