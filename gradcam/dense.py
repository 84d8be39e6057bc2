"""Dense-mode CAM: the map comes straight from the full-image feature maps that dense ten crops
compute (models.dense: the trunk on the resized image and on its mirror), with no paste-back.

Per image: the CAM of the image's map and the CAM of the mirror's map, the latter mirrored back,
averaged, each upsampled to the resized image in logit units (gradcam.core). Windows of the map are
what dense ten crops pool, so this is the evidence behind their answer; the exact ten crops' map
(gradcam.tencrop, pasted back from ten crop maps) differs where a crop's border saw zero padding.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from common.device import ieee_fp32
from data.spec import PreprocessSpec
from gradcam.core import BaseCAM, CamResult
from gradcam.tencrop import ImageCam
from models.dense import DenseTenCropModel


def dense_image_cams(model: nn.Module, images: Tensor, spec: PreprocessSpec, target_sets, method: type[BaseCAM]
                     ) -> list[ImageCam]:
    """``gradcam.tencrop.image_cams`` in dense mode: one trunk pass (image + mirror) for every target set.

    targets None: the dense ten crops' prediction (argmax of the mean window logits).
    """
    cam = method(model)
    dense = DenseTenCropModel(cam.model, spec, return_features=True).eval()
    device = next(cam.model.parameters()).device
    with ieee_fp32(), torch.no_grad():
        logits, features = dense(images.to(device))
    members = features if isinstance(features, (list, tuple)) else [features]
    both = [f.flatten(0, 1) for f in members]  # [2B, C, h, w]: each image, then its mirror
    results = []
    for targets in target_sets:
        chosen = dense_targets(targets, logits)
        result = cam.explain(both, chosen.repeat_interleave(2))
        results.append(image_and_mirror_to_image(result, spec, logits, chosen))
    return results


def dense_targets(targets, logits: Tensor) -> Tensor:
    """[B] classes to explain: ``targets``, or the argmax of the dense logits [B, K]."""
    if targets is None:
        return logits.argmax(dim=1)
    chosen = torch.as_tensor(targets, dtype=torch.int64, device=logits.device).reshape(-1)
    if chosen.numel() != logits.shape[0]:
        raise ValueError(f"one target per image: {chosen.numel()} targets for {logits.shape[0]} images")
    return chosen


def image_and_mirror_to_image(result: CamResult, spec: PreprocessSpec, logits: Tensor, targets: Tensor) -> ImageCam:
    """A CamResult over [2B] full-image maps (image, mirror, per image) -> the ImageCam [B, R, R]:
    the image's map and the un-mirrored mirror's map, averaged."""
    maps = result.at_size(spec.resize).reshape(-1, 2, spec.resize, spec.resize)
    averaged = (maps[:, 0] + torch.flip(maps[:, 1], dims=[-1])) / 2
    return ImageCam(averaged.cpu(), logits.float().cpu(), targets.cpu())
