"""CAM of an exported model, without autograd, and its agreement with the reference Grad-CAM.

An export made with ``cam_output`` has, beside ``logits``, the map entering global pooling
(``features``, or ``features_<i>`` per ensemble member) and ships the classifier weights
(``cam_weights.npz``). CAM = ReLU(sum_k W[c, k] * A_k) from those is, for a global-average-pool +
linear head, the reference Grad-CAM times h*w (Grad-CAM paper, section 3.1) - the same map in the
same logit units (gradcam.core) - so the two are compared directly: per image the Pearson
correlation of the pasted-back maps and the distance between their peaks. The gate on the mean
correlation over the images is export.parity.CAM_GATES (the same table shape as the logit gates).
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import Tensor, nn

from cnnbench.common import sha256_file
from cnnbench.common.errors import InputError
from cnnbench.data.spec import PreprocessSpec
from cnnbench.export import ExportError, artifact_path, load_cam_weights, make_ort_session
from cnnbench.gradcam.core import CamResult, weighted_channel_sum
from cnnbench.data.crops import DENSE, TEN, crop_mode
from cnnbench.export.manifest import graph_crops
from cnnbench.export.parity import CAM_GATES, apply_gates
from cnnbench.gradcam.dense import dense_targets, image_and_mirror_to_image
from cnnbench.gradcam.layers import LAST
from cnnbench.gradcam.tencrop import ImageCam, crops_to_image, image_cam, peak, per_crop_targets
from cnnbench.models.checkpoint import load_checkpoint
from cnnbench.models.ensemble import Ensemble
from cnnbench.runtime.predictor import crop_mode_mismatch


# The reference map an exported CAM equals (in logit units): Grad-CAM at the map entering global
# pooling. Fixed whatever gradcam.core.DEFAULT_CAMS says: an exported graph has
# no gradients and no other layer, so CAM parity covers this method at this layer only.
REFERENCE_METHOD, REFERENCE_LAYER = "gradcam", LAST


class ExportedCam:
    """Runs an export through ONNX Runtime: its logits, and with cam_output its CAM.

    ``manifest`` comes from ``export.load_manifest`` (hashes verified). An export made without
    cam_output still gives logits (``forward``), but ``image_cams`` refuses.
    """

    def __init__(self, manifest: dict, precision: str = "fp32", device: str = "cpu", batch: int = 16):
        self.name = manifest.get("name", manifest.get("export_dir", "?"))
        self.manifest = manifest
        self.precision = precision
        self.spec = PreprocessSpec.from_dict(manifest["spec"])
        self.classes = list(manifest["classes"])
        self.graph_crops = graph_crops(manifest)  # "10", "dense", or None (the graph takes crops)
        self.ten_crop_in_graph = self.graph_crops is not None
        self.batch = batch
        self.has_cam = bool(manifest.get("cam_output"))
        self.weights = ([torch.from_numpy(np.asarray(w, dtype=np.float32)) for w, _ in load_cam_weights(manifest)]
                        if self.has_cam else [])
        onnx_path = artifact_path(manifest, precision, "onnx")
        self.file = os.path.basename(onnx_path)
        self.session = make_ort_session(onnx_path, device=device)
        self.input_name = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        if not self.has_cam:
            self.feature_names = []
        elif "features" in outputs:
            self.feature_names = ["features"]
        else:
            self.feature_names = [f"features_{i}" for i in range(len(self.weights))]
        missing = [n for n in self.feature_names if n not in outputs]
        if missing or len(self.feature_names) != len(self.weights):
            raise ExportError(f"export {self.name!r}: graph outputs {outputs} do not match its {len(self.weights)} "
                              f"CAM weight set(s) (missing {missing})")

    def check_crops(self, crops) -> None:
        """InputError when the graph cannot give crop mode ``crops``, naming the export that can."""
        mode = crop_mode(crops)
        if self.graph_crops is not None and mode.name != self.graph_crops:
            raise InputError(crop_mode_mismatch(f"export {self.name!r}", self.graph_crops, mode.name))
        if self.graph_crops is None and not mode.cuts_crops:
            raise InputError(f"export {self.name!r} takes crops; dense CAM needs an export made with "
                             "--ten-crop dense --cam-output")

    def forward(self, images: Tensor, crops: int) -> tuple[Tensor, list[Tensor]]:
        """Resized uint8 images [B, 3, R, R] -> (crop logits [B*n, K], per member crop features [B*n, C, h, w]).

        An in-graph ten-crop graph returns only the crop-averaged logits: each crop row carries them.
        A dense graph: (image logits [B, K], per member full-image maps [2B, C, h, w], image then mirror).
        """
        self.check_crops(crops)
        dense = self.graph_crops == DENSE.name
        logits, features = [], [[] for _ in self.feature_names]
        for start in range(0, len(images), self.batch):
            chunk = images[start:start + self.batch]
            feed = chunk if self.ten_crop_in_graph else crop_mode(crops).cut(chunk, self.spec).flatten(0, 1)
            out = self.session.run(["logits", *self.feature_names], {self.input_name: np.ascontiguousarray(feed.numpy())})
            crop_logits = torch.from_numpy(np.asarray(out[0], dtype=np.float32))
            if self.ten_crop_in_graph and not dense:
                # The graph already averaged its crops' logits; CAM needs only its per-crop features.
                crop_logits = crop_logits.repeat_interleave(TEN.count, dim=0)
            logits.append(crop_logits)
            for member, array in enumerate(out[1:]):
                array = torch.from_numpy(np.asarray(array, dtype=np.float32))
                features[member].append(array.flatten(0, 1) if self.ten_crop_in_graph else array)
        return torch.cat(logits), [torch.cat(f) for f in features]

    def require_cam(self) -> None:
        if not self.has_cam:
            raise ExportError(f"export {self.name!r} was made without cam_output: it has no feature-map output; "
                              "re-export with --cam-output (or explain the checkpoint itself)")

    def image_logits(self, images: Tensor, crops: int = 10) -> Tensor:
        """[B, K] crop-averaged logits of resized uint8 images."""
        logits, _ = self.forward(images, crops)
        return logits if self.graph_crops == DENSE.name else crop_mode(crops).reduce(logits)

    def image_cams(self, images: Tensor, crops: int = 10, target_sets=(None,)) -> list[ImageCam]:
        """Like ``gradcam.tencrop.image_cams``, from the exported graph (None: the export's own prediction)."""
        self.require_cam()
        logits, features = self.forward(images, crops)
        results = []
        for targets in target_sets:
            if self.graph_crops == DENSE.name:  # full-image maps of image and mirror (gradcam.dense)
                chosen = dense_targets(targets, logits)
                maps = [weighted_channel_sum(a, w[chosen.repeat_interleave(2)]) for a, w in zip(features, self.weights)]
                cam = CamResult(maps=maps, logits=logits, targets=chosen, scales=[1.0] * len(maps))
                results.append(image_and_mirror_to_image(cam, self.spec, logits, chosen))
                continue
            crop_targets = per_crop_targets(targets, crops)(logits)
            maps = [weighted_channel_sum(a, w[crop_targets]) for a, w in zip(features, self.weights)]
            cam = CamResult(maps=maps, logits=logits, targets=crop_targets, scales=[1.0] * len(maps))
            results.append(crops_to_image(cam, self.spec, crops))
        return results


def load_reference(manifest: dict) -> tuple[nn.Module, dict]:
    """The fp32 PyTorch model an export was made from (an Ensemble for an ensemble export), and the
    first source checkpoint's meta (its record names the split).

    Each source checkpoint's sha256 is checked against the manifest: a retrained checkpoint is no
    longer the reference of this export.
    """
    members, metas = [], []
    for source in manifest["sources"]:
        path = source["path"]
        if not os.path.isfile(path):
            raise ExportError(f"{path}: source checkpoint of export {manifest.get('name', '?')!r} not found "
                              "(the reference model is needed to compare with)")
        if source.get("sha256") and sha256_file(path) != source["sha256"]:
            raise ExportError(f"{path}: changed since export {manifest.get('name', '?')!r} was made "
                              "(sha256 differs from the manifest); re-export it")
        model, meta = load_checkpoint(path)
        members.append(model.float().eval())
        metas.append(meta)
    model = members[0] if len(members) == 1 else Ensemble(members).eval()
    return model, metas[0]


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two maps over their pixels, in float64.

    A map with no variation (e.g. all zero after the ReLU) has no defined correlation: two such maps
    that are equal count as 1.0 (the same evidence: none), otherwise 0.0.
    """
    x = a.double().flatten()
    y = b.double().flatten()
    x, y = x - x.mean(), y - y.mean()
    norm = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    if norm == 0.0:
        return 1.0 if torch.allclose(a.double(), b.double()) else 0.0
    return float((x * y).sum()) / norm


def compare_maps(reference: Tensor, exported: Tensor) -> list[dict]:
    """Per image of two [B, R, R] map batches: correlation and peak distance (pixels and fraction of the side)."""
    side = reference.shape[-1]
    rows = []
    for ref_map, exp_map, ref_peak, exp_peak in zip(reference, exported, peak(reference), peak(exported)):
        distance = math.dist(ref_peak, exp_peak)
        rows.append({"correlation": pearson(ref_map, exp_map), "peak_distance_px": distance,
                     "peak_distance_frac": distance / side, "reference_peak": list(ref_peak),
                     "exported_peak": list(exp_peak)})
    return rows


def cam_gate_report(rows: list[dict], precision: str) -> dict:
    """Summary of ``compare_maps`` rows with the precision's CAM gates (export.parity.CAM_GATES)."""
    if not rows:
        raise ValueError("the CAM comparison needs at least one image")
    correlations = np.array([r["correlation"] for r in rows])
    distances = np.array([r["peak_distance_px"] for r in rows])
    fractions = np.array([r["peak_distance_frac"] for r in rows])
    metrics = {
        "n_images": len(rows),
        "mean_correlation": float(correlations.mean()),
        "min_correlation": float(correlations.min()),
        "mean_peak_distance_px": float(distances.mean()),
        "max_peak_distance_px": float(distances.max()),
        "mean_peak_distance_frac": float(fractions.mean()),
        "max_peak_distance_frac": float(fractions.max()),
    }
    return apply_gates(metrics, precision, CAM_GATES)


def compare_with_reference_cam(exported: ExportedCam, images: Tensor, reference: ImageCam,
                               crops=10) -> tuple[list[dict], ImageCam, ImageCam]:
    """The export's CAM of the reference's classes, compared image by image with the reference's maps
    (``compare_maps`` rows), and the export's CAM of its own prediction."""
    same_class, own = exported.image_cams(images, crops, [reference.targets, None])
    return compare_maps(reference.maps, same_class.maps), same_class, own


def cam_parity(manifest: dict, images: Tensor, precision: str = "fp32", crops: int = 10,
               reference: nn.Module | None = None, targets: Tensor | None = None, batch: int = 16) -> dict:
    """Exported CAM vs reference Grad-CAM on resized uint8 ``images`` [B, 3, R, R], with the gate.

    Both maps are of the same class per image: ``targets``, or the reference's prediction.
    Returns the ``cam_gate_report`` plus ``images`` (one ``compare_maps`` row each).
    """
    reference = load_reference(manifest)[0] if reference is None else reference
    exported = ExportedCam(manifest, precision, batch=batch)
    rows = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        chunk_targets = None if targets is None else torch.as_tensor(targets)[start:start + batch]
        ref = image_cam(reference, chunk, exported.spec, crops=crops, targets=chunk_targets, method=REFERENCE_METHOD,
                        layer=REFERENCE_LAYER)
        rows += compare_with_reference_cam(exported, chunk, ref, crops)[0]
    return {**cam_gate_report(rows, precision), "images": rows}
