"""Ten-crop (and centre-crop) CAM: one map per crop, pasted back onto the resized image.

Crops, their boxes and the logit reduction come from the crop mode (``data.crops``): a mirrored crop's map is
mirrored back, then every map is pasted at its box and each pixel is the mean over the crops that
cover it. The class explained is the one the ten-crop model predicts: the argmax of the mean of
the crops' logits (or a class given by the caller). The same paste-back serves exported CAM.

Two pasted maps per image. ``ImageCam.maps`` is the documented map: the plain mean over covering
crops, which the pointing game, the peaks, exported-CAM parity and --json report. Where the number of
covering crops changes (every crop border inside the image) that mean steps, so a panel of it shows
stair-step seams. ``ImageCam.display`` is what panels show: each crop's map weighted by a window that
tapers to near zero over its outer DISPLAY_TAPER of the crop side (a separable raised cosine), the
weighted sum divided by the summed weights per pixel (coverage normalisation). A map that is the same
constant in every crop pastes to that constant (no seams, no frame at the image edge); inside the
tapers a crop's border values, where its zero padding lies, count less.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cnnbench.data.crops import crop_mode
from cnnbench.data.geometry import CropBox
from cnnbench.data.spec import PreprocessSpec
from cnnbench.gradcam.core import BaseCAM, CamResult, default_layer, default_method, method_class, tap_layers
from cnnbench.gradcam.layers import Layer, resolve_layer


# Share of a crop's side over which its display weight rises from near 0 to 1, at each border.
DISPLAY_TAPER = 0.125


@dataclass
class ImageCam:
    """maps: [B, R, R] on the resized image (logit units, see gradcam.core), the documented map that peaks and
    the pointing game use; logits: [B, K] mean over crops; display: [B, R, R] the map panels show (the
    seamless paste-back of ten crops; ``maps`` itself where there is no paste-back)."""

    maps: Tensor
    logits: Tensor
    targets: Tensor
    display: Tensor | None = None

    def __post_init__(self):
        if self.display is None:
            self.display = self.maps


def paste_back(crop_maps: Tensor, boxes: list[CropBox], resize: int, taper: float = 0.0) -> Tensor:
    """[B, n, c, c] maps of the n crops (as the model saw them) -> [B, R, R], per pixel the weighted mean
    over the crops that cover it.

    taper 0: every covering crop weighs 1 (the documented map). taper > 0: each crop's weight is
    ``crop_window(c, taper)`` (for display). Pixels no crop covers (only possible with crops=1) are 0.
    """
    if crop_maps.dim() != 4 or crop_maps.shape[1] != len(boxes):
        raise ValueError(f"expected [B, {len(boxes)}, c, c] crop maps, got {tuple(crop_maps.shape)}")
    batch = crop_maps.shape[0]
    total = crop_maps.new_zeros(batch, resize, resize)
    weight = crop_maps.new_zeros(resize, resize)
    windows: dict[int, Tensor] = {}
    for index, box in enumerate(boxes):
        piece = crop_maps[:, index]
        if piece.shape[-1] != box.size or piece.shape[-2] != box.size:
            raise ValueError(f"crop map {index} is {tuple(piece.shape[-2:])}, its box is {box.size} square")
        if box.flipped:
            piece = torch.flip(piece, dims=[-1])
        if box.size not in windows:
            windows[box.size] = crop_window(box.size, taper).to(crop_maps)
        window = windows[box.size]  # symmetric, so a mirrored crop needs no mirrored window
        rows, cols = slice(box.top, box.top + box.size), slice(box.left, box.left + box.size)
        total[:, rows, cols] += piece * window
        weight[rows, cols] += window
    return torch.where(weight > 0, total / weight.clamp(min=torch.finfo(weight.dtype).tiny), total)


def crop_window(size: int, taper: float) -> Tensor:
    """[size, size] weights: 1 inside, rising as a raised cosine over round(taper * size) pixels at each
    border (never 0, so every pixel a crop covers keeps some weight); all ones for taper 0."""
    ramp_length = round(taper * size)
    profile = torch.ones(size, dtype=torch.float64)
    if ramp_length > 0:
        if 2 * ramp_length > size:
            raise ValueError(f"a taper of {taper} leaves no flat middle in a {size}-pixel crop")
        steps = torch.arange(1, ramp_length + 1, dtype=torch.float64)
        ramp = 0.5 - 0.5 * torch.cos(torch.pi * steps / (ramp_length + 1))
        profile[:ramp_length] = ramp
        profile[size - ramp_length:] = ramp.flip(0)
    return (profile[:, None] * profile[None, :]).float()


def image_cam(
    model: nn.Module,
    images: Tensor,
    spec: PreprocessSpec,
    crops: int = 10,
    targets: Tensor | None = None,
    method: str | type[BaseCAM] | None = None,
    layer: str | Layer | None = None,
) -> ImageCam:
    """CAM of resized uint8 images [B, 3, R, R] through ``crops`` crops, pasted back to [B, R, R].

    targets: [B] classes to explain (default: each image's prediction from the mean crop logits).
    method: a gradcam.core.METHODS name or class (None: the model's, gradcam.core.default_method); layer: a
    gradcam.layers name (None: the model's for the crop mode, gradcam.core.default_layer).
    """
    return image_cams(model, images, spec, crops, [targets], method, layer)[0]


def image_cams(
    model: nn.Module,
    images: Tensor,
    spec: PreprocessSpec,
    crops: int = 10,
    target_sets: list[Tensor | None] = (None,),
    method: str | type[BaseCAM] | None = None,
    layer: str | Layer | None = None,
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
    layer: str | Layer | None = None,
) -> list[list[ImageCam]]:
    """Per method, ``image_cams``: one forward pass for all of them, and one backward per target set shared
    by every gradient method (the methods differ only in what they make of the same gradients)."""
    return layer_method_cams(model, images, spec, crops, target_sets, methods, [layer])[0]


def layer_method_cams(
    model: nn.Module,
    images: Tensor,
    spec: PreprocessSpec,
    crops,
    target_sets: list[Tensor | None],
    methods: list[str | type[BaseCAM]],
    layers: list[str | Layer | None],
    display: bool = True,
) -> list[list[list[ImageCam]]]:
    """Per layer, ``method_cams``, all from ONE forward pass of the crops (gradcam.core.tap_layers); each
    layer's backward runs from the logits to that layer only. None in ``layers``: the model's default for the crop mode.
    display False: no seamless display paste (``ImageCam.display`` is ``maps``), for callers that only score.
    None in ``methods``: the model's default (gradcam.core.default_method)."""
    layers = [default_layer(model, crops) if layer is None else layer for layer in layers]
    layers = [layer if isinstance(layer, Layer) else resolve_layer(model, layer) for layer in layers]
    methods = [default_method(model) if method is None else method for method in methods]
    cams = [[method_class(m)(model, layer) for m in methods] for layer in layers]
    with_graph = any(cam.needs_gradients for per_layer in cams for cam in per_layer)
    if not crop_mode(crops).cuts_crops:
        from cnnbench.gradcam.dense import dense_method_cams  # it builds on this module's ImageCam

        return [dense_method_cams(model, images, spec, target_sets, per_layer, with_graph) for per_layer in cams]
    batch_crops = crop_mode(crops).cut(images, spec)
    batch = batch_crops.shape[0]
    for targets in target_sets:
        if targets is not None and torch.as_tensor(targets).numel() != batch:
            raise ValueError(f"one target per image: {torch.as_tensor(targets).numel()} targets for {batch} images")
    tapped_layers = tap_layers(model, layers, batch_crops.flatten(0, 1), with_graph)
    return [[[crops_to_image(cam.explain(tapped, per_crop_targets(targets, crops)), spec, crops, display)
              for targets in target_sets] for cam in per_layer]
            for tapped, per_layer in zip(tapped_layers, cams)]


def crops_to_image(result: CamResult, spec: PreprocessSpec, crops: int, display: bool = True) -> ImageCam:
    """A CamResult over [B*n] crops (image-major, the crop mode's box order) -> the pasted-back ImageCam
    (with its seamless display map unless ``display`` is False)."""
    mode = crop_mode(crops)
    crop_maps = mode.per_image(result.at_size(spec.crop))
    boxes = mode.boxes(spec)
    maps = paste_back(crop_maps, boxes, spec.resize)
    # One crop has no seams to hide: its panel shows the documented map.
    shown = paste_back(crop_maps, boxes, spec.resize, DISPLAY_TAPER) if display and len(boxes) > 1 else maps
    return ImageCam(maps.cpu(), mode.reduce(result.logits).cpu(), result.targets[::mode.count].cpu(), shown.cpu())


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
