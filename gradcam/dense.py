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

from cnnbench.common.device import ieee_fp32
from cnnbench.common.errors import InputError
from cnnbench.data.spec import PreprocessSpec
from cnnbench.gradcam.core import BaseCAM, CamResult, tap_features
from cnnbench.gradcam.tencrop import ImageCam
from cnnbench.models.dense import DenseTenCropModel


def dense_method_cams(model: nn.Module, images: Tensor, spec: PreprocessSpec, target_sets, cams: list[BaseCAM],
                      with_graph: bool) -> list[list[ImageCam]]:
    """``gradcam.tencrop.method_cams`` in dense mode: one trunk pass (image + mirror) for every method and
    target set. targets None: the dense ten crops' prediction (argmax of the mean window logits).

    Layer ``last`` only: the windows dense ten crops pool are cut from the map entering global pooling of
    the full image; an earlier layer's full-image map has no windows (its cells feed several crops' last
    maps through receptive fields that cross the crop borders), so there is no dense map to show there.
    """
    layer = cams[0].layer
    if not layer.is_last:
        raise InputError(f"dense maps exist at layer 'last' only (dense ten crops cut their windows from the map "
                         f"entering global pooling), not {layer.describe()}; use --crops 10 or 1 for other layers")
    dense = DenseTenCropModel(cams[0].model, spec, return_features=True).eval()
    device = next(cams[0].model.parameters()).device
    with ieee_fp32(), torch.no_grad():
        logits, features = dense(images.to(device))
    members = features if isinstance(features, (list, tuple)) else [features]
    both = [f.flatten(0, 1) for f in members]  # [2B, C, h, w]: each image, then its mirror
    tapped = tap_features(cams[0].model, layer, both, with_graph)
    chosen_sets = [dense_targets(targets, logits) for targets in target_sets]
    return [[image_and_mirror_to_image(cam.explain(tapped, chosen.repeat_interleave(2)), spec, logits, chosen)
             for chosen in chosen_sets] for cam in cams]


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
