"""Ten-crop (and centre-crop) CAM: one map per crop, pasted back onto the resized image.

Crops, their boxes and the logit reduction come from the crop mode (``data.crops``): a mirrored crop's map is
mirrored back, then every map is pasted at its box and each pixel is the mean over the crops that
cover it. The class explained is the one the ten-crop model predicts: the argmax of the mean of
the crops' logits (or a class given by the caller). The same paste-back serves exported CAM.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cnnbench.data.crops import crop_mode
from cnnbench.data.geometry import CropBox
from cnnbench.data.spec import PreprocessSpec
from cnnbench.gradcam.core import DEFAULT_LAYER, DEFAULT_METHOD, BaseCAM, CamResult, method_class, tap
from cnnbench.gradcam.layers import Layer, resolve_layer


@dataclass
class ImageCam:
    """maps: [B, R, R] on the resized image (logit units, see gradcam.core); logits: [B, K] mean over crops."""

    maps: Tensor
    logits: Tensor
    targets: Tensor


def paste_back(crop_maps: Tensor, boxes: list[CropBox], resize: int) -> Tensor:
    """[B, n, c, c] maps of the n crops (as the model saw them) -> [B, R, R], mean over covering crops.

    Pixels no crop covers (only possible with crops=1) are 0.
    """
    if crop_maps.dim() != 4 or crop_maps.shape[1] != len(boxes):
        raise ValueError(f"expected [B, {len(boxes)}, c, c] crop maps, got {tuple(crop_maps.shape)}")
    batch = crop_maps.shape[0]
    total = crop_maps.new_zeros(batch, resize, resize)
    count = crop_maps.new_zeros(resize, resize)
    for index, box in enumerate(boxes):
        piece = crop_maps[:, index]
        if piece.shape[-1] != box.size or piece.shape[-2] != box.size:
            raise ValueError(f"crop map {index} is {tuple(piece.shape[-2:])}, its box is {box.size} square")
        if box.flipped:
            piece = torch.flip(piece, dims=[-1])
        rows, cols = slice(box.top, box.top + box.size), slice(box.left, box.left + box.size)
        total[:, rows, cols] += piece
        count[rows, cols] += 1
    return total / count.clamp(min=1)  # uncovered pixels: 0 / 1


def image_cam(
    model: nn.Module,
    images: Tensor,
    spec: PreprocessSpec,
    crops: int = 10,
    targets: Tensor | None = None,
    method: str | type[BaseCAM] = DEFAULT_METHOD,
    layer: str | Layer = DEFAULT_LAYER,
) -> ImageCam:
    """CAM of resized uint8 images [B, 3, R, R] through ``crops`` crops, pasted back to [B, R, R].

    targets: [B] classes to explain (default: each image's prediction from the mean crop logits).
    method: a gradcam.core.METHODS name or class; layer: a gradcam.layers name.
    """
    return image_cams(model, images, spec, crops, [targets], method, layer)[0]


def image_cams(
    model: nn.Module,
    images: Tensor,
    spec: PreprocessSpec,
    crops: int = 10,
    target_sets: list[Tensor | None] = (None,),
    method: str | type[BaseCAM] = DEFAULT_METHOD,
    layer: str | Layer = DEFAULT_LAYER,
) -> list[ImageCam]:
    """``image_cam`` for several target sets (e.g. predicted and true class) from one backbone pass.

    crops="dense": the map from the full-image feature maps (gradcam.dense), no paste-back."""
    return method_cams(model, images, spec, crops, target_sets, [method], layer)[0]


def method_cams(
    model: nn.Module,
    images: Tensor,
    spec: PreprocessSpec,
    crops,
    target_sets: list[Tensor | None],
    methods: list[str | type[BaseCAM]],
    layer: str | Layer = DEFAULT_LAYER,
) -> list[list[ImageCam]]:
    """Per method, ``image_cams``: one forward pass for all of them, and one backward per target set shared
    by every gradient method (the methods differ only in what they make of the same gradients)."""
    layer = layer if isinstance(layer, Layer) else resolve_layer(model, layer)
    cams = [method_class(m)(model, layer) for m in methods]
    with_graph = any(cam.needs_gradients for cam in cams)
    if not crop_mode(crops).cuts_crops:
        from cnnbench.gradcam.dense import dense_method_cams  # it builds on this module's ImageCam

        return dense_method_cams(model, images, spec, target_sets, cams, with_graph)
    batch_crops = crop_mode(crops).cut(images, spec)
    batch = batch_crops.shape[0]
    for targets in target_sets:
        if targets is not None and torch.as_tensor(targets).numel() != batch:
            raise ValueError(f"one target per image: {torch.as_tensor(targets).numel()} targets for {batch} images")
    tapped = tap(model, layer, batch_crops.flatten(0, 1), with_graph)
    return [[crops_to_image(cam.explain(tapped, per_crop_targets(targets, crops)), spec, crops) for targets in target_sets]
            for cam in cams]


def crops_to_image(result: CamResult, spec: PreprocessSpec, crops: int) -> ImageCam:
    """A CamResult over [B*n] crops (image-major, the crop mode's box order) -> the pasted-back ImageCam."""
    mode = crop_mode(crops)
    crop_maps = mode.per_image(result.at_size(spec.crop))
    return ImageCam(paste_back(crop_maps, mode.boxes(spec), spec.resize).cpu(), mode.reduce(result.logits).cpu(),
                    result.targets[::mode.count].cpu())


def per_crop_targets(targets: Tensor | None, crops):
    """Every crop is explained for its image's class (d mean-logit / d crop-logit = 1/n > 0); by
    default the class the crop mode's model predicts: argmax of its reduced logits."""
    mode = crop_mode(crops)

    def choose(logits: Tensor) -> Tensor:
        chosen = mode.reduce(logits).argmax(dim=1) if targets is None else targets
        return torch.as_tensor(chosen, dtype=torch.int64, device=logits.device).reshape(-1).repeat_interleave(mode.count)

    return choose


def peak(maps: Tensor) -> list[tuple[int, int]]:
    """(x, y) of the maximum of each [B, H, W] map (first one in row-major order on ties)."""
    width = maps.shape[-1]
    flat = maps.reshape(maps.shape[0], -1).argmax(dim=1)
    return [(int(i) % width, int(i) // width) for i in flat]
