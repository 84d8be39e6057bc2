"""Dense ten crops: the trunk runs once on the resized image and once on its mirror, and each of
torchvision's ten crops is read off the feature map as a window (global average pool over the
window, then the head) instead of running the network on the crop.

Geometry, measured on the model rather than assumed: every convolution and pooling maps output
cell j to input pixel j*stride + constant, whatever the input size, so a crop cut at pixel offset o
sees, at its cell j, the full image's cell j + o/S (S = the trunk's output stride). The four corner
crops therefore sit on whole cells when (resize - crop) is a multiple of S; their windows are
``crop_cells`` wide. The feature map sizes and S are measured by running the trunk on the meta
device (shapes only), so Xception's valid-padding stem or any other trunk needs no special case.

Dense is an approximation, not the same answer: inside the whole image a window's border cells
see real neighbours where the crop saw zero padding (exact only for padding-free trunks, as the
tests show). The centre crop sits at round((resize - crop) / 2) pixels, half a cell off the grid
at the standard 256/224 geometry; ``centre`` chooses how it is handled:

- ``"pass"``: the trunk also runs on the centre crop and its mirror (exact for those two crops;
  costs two crop passes more).
- ``"interpolate"``: a window at the fractional cell offset, each cell weighted by its overlap
  with the window (linear interpolation of the map at the crop's cell centres, then pooled).
- ``"drop"``: eight windows, the corners only.

For a head that is linear after pooling (every model here), when resize - crop equals exactly one
stride the interpolated centre window is the mean of the four corner windows, so "interpolate"
and "drop" give the same logits there; they differ at other offsets.

Default "pass", measured (ResNet18 trained 10 epochs at 96 px on the embedded set, val top-1 25 %,
evaluated at resize 128 / crop 96 on its 320 test images; exact ten crops: top-1 21.3 %):
top-1 agreement with exact ten crops "pass" 64.7 % (top-1 20.3 %), "interpolate" = "drop" 57.8 %
(top-1 17.5 %); a ResNet18 of 5 epochs at 144/112: 87.5 % vs 84.7 %. Cost in crop passes (FLOPs)
at 256/224: 4.61 vs 2.61 (exact: 10); ResNet26 eager fp32 CPU batch 8: 1.73x vs 3.2x faster than
exact ten crops. That weak model's own test-time variants disagree as much (exact one crop vs
exact ten crops 68 %), so these figures rank the options; they are not dense's agreement on a
well-trained model. Exported (export --ten-crop dense --dense-centre ...), ResNet26 at 256/224, int8
in ONNX Runtime, batch 8 on this 2-core CPU: "pass" 19.6x, "interpolate" 32.3x PyTorch eager fp32
exact ten crops, agreeing with them on 83.8 % / 78.8 % of the test images for a 30 % ResNet26
(README, one bench run).
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cnnbench.common.errors import InputError
from cnnbench.data.geometry import ten_crop_boxes
from cnnbench.data.spec import PreprocessSpec
from cnnbench.data.transforms import normalize
from cnnbench.models.ensemble import Ensemble

CENTRE_MODES = ("pass", "interpolate", "drop")
DEFAULT_CENTRE = "pass"
# Strides are products of small integer strides; an input this much larger than the crop is a
# whole number of strides for any S dividing it (every power of two to 512, times 1, 3 or 9).
_STRIDE_PROBE = 512 * 9
_CORNERS = 4  # TL, TR, BL, BR: the first four of five_crop's boxes, the fifth is the centre
# Below this many cells a side, most of a window's cells are border cells that saw real neighbours where
# the crop saw padding. Measured on a ResNet26 that learned (74.4 % exact ten-crop top-1 at 110/96 on the
# embedded set): at 128/96 (3x3-cell windows on a 4x4 map, eight of nine cells on the border) exact ten
# crops 60.0 %, dense with the centre pass 58.1 % and only 78.8 % top-1 agreement with exact (corners
# only: 51.6 %, 71.6 %). Dense is meant for 224 px and larger crops (7x7-cell windows at stride 32).
SMALL_WINDOW_CELLS = 5


class SmallDenseWindowWarning(UserWarning):
    """Dense ten crops on windows too small to stand in for the crops (models.dense.SMALL_WINDOW_CELLS)."""


class DenseGeometryError(InputError):
    """The ten crops' windows do not fall on the trunk's feature-map grid for this resize and crop
    (the user's choice of geometry: the CLI prints it as one line; a ValueError too)."""


@dataclass(frozen=True)
class DenseGeometry:
    """Where the crops' windows lie on one trunk's feature map of the resized image.

    stride: pixels per feature cell (the trunk's output stride, measured).
    image_cells / crop_cells: side of the feature map of the resized image / of one crop.
    corner_offsets: cell offsets of the corner windows along one axis, (0, (resize - crop) / stride).
    centre_offset: the centre crop's offset in cells along one axis (fractional in general).
    """

    stride: int
    image_cells: int
    crop_cells: int
    corner_offsets: tuple[int, int]
    centre_offset: float


def _members(model: nn.Module) -> list[nn.Module]:
    return list(model.members) if isinstance(model, Ensemble) else [model]


def _feature_sides(trunk: nn.Module, sizes: list[int]) -> list[int]:
    """Side of trunk.forward_features' map for square inputs of each size (meta device: shapes only)."""
    sides = []
    with torch.no_grad():
        for size in sizes:
            features = trunk.forward_features(torch.empty(2, 3, size, size, device="meta"))
            if features.dim() != 4 or features.shape[-1] != features.shape[-2]:
                raise DenseGeometryError(
                    f"dense ten crops need a square [N, C, h, w] feature map; the trunk gave {tuple(features.shape)} "
                    f"for a {size}x{size} input")
            sides.append(int(features.shape[-1]))
    return sides


def _shapes_only(trunk: nn.Module) -> nn.Module:
    """A copy of ``trunk`` on the meta device; the memo keeps deepcopy from copying the weights' data first."""
    memo = {id(t): torch.empty_like(t, device="meta") for t in trunk.buffers()}
    memo.update({id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in trunk.parameters()})
    return copy.deepcopy(trunk, memo).eval()


def _measure_stride(meta: nn.Module, crop: int) -> tuple[int, int]:
    """(output stride, feature side at ``crop``) of a trunk on the meta device.

    Each layer's output side grows by exactly one cell per ``stride`` input pixels, so the side at
    crop + N, N a multiple of the stride, is side(crop) + N / stride.
    """
    crop_side, probe_side = _feature_sides(meta, [crop, crop + _STRIDE_PROBE])
    growth = probe_side - crop_side
    if growth <= 0:
        raise DenseGeometryError(
            f"the trunk's feature map does not grow with its input ({crop_side} cells at {crop} px and at "
            f"{crop + _STRIDE_PROBE} px): dense ten crops need a fully convolutional trunk")
    stride = _STRIDE_PROBE // growth
    if stride * growth != _STRIDE_PROBE:
        raise DenseGeometryError(f"could not measure the trunk's output stride (feature side {crop_side} at {crop} px,"
                                 f" {probe_side} at {crop + _STRIDE_PROBE} px)")
    return stride, crop_side


def aligned_resizes(resize: int, crop: int, stride: int) -> list[int]:
    """The resizes nearest ``resize`` (one below when there is one, one above) whose corner offsets fit the grid."""
    below = crop + (resize - crop) // stride * stride
    above = below + stride
    return [size for size in (below, above) if size > crop]


def dense_geometry(model: nn.Module, spec: PreprocessSpec) -> list[DenseGeometry]:
    """The window geometry of each trunk (one per ensemble member); DenseGeometryError where it does not align."""
    meta_members = [_shapes_only(member) for member in _members(model)]
    measured = [_measure_stride(meta, spec.crop) for meta in meta_members]
    strides = [stride for stride, _ in measured]
    margin = spec.resize - spec.crop
    common = math.lcm(*strides)
    if margin % common:
        sizes = " or ".join(str(s) for s in aligned_resizes(spec.resize, spec.crop, common))
        raise DenseGeometryError(
            f"dense ten crops need resize - crop to be a multiple of the output stride {common}, got "
            f"{spec.resize} - {spec.crop} = {margin}; resizes that align with crop {spec.crop}: {sizes}")
    centre_pixels = ten_crop_boxes(spec.resize, spec.crop)[_CORNERS].top
    geometries = []
    for meta, (stride, crop_cells) in zip(meta_members, measured):
        [image_cells] = _feature_sides(meta, [spec.resize])
        far = margin // stride
        if far + crop_cells != image_cells:
            raise DenseGeometryError(
                f"the crop windows do not fit the feature map: {crop_cells} cells at crop {spec.crop} px, offset "
                f"{far} cells, but {image_cells} cells at resize {spec.resize} px (stride {stride})")
        geometries.append(DenseGeometry(stride, image_cells, crop_cells, (0, far), centre_pixels / stride))
    smallest = min(g.crop_cells for g in geometries)
    if smallest < SMALL_WINDOW_CELLS:
        warnings.warn(
            f"dense ten crops at crop {spec.crop} px read windows of {smallest}x{smallest} feature cells: most of "
            f"their cells border the window and saw the image where the crop saw padding, so dense is a poor "
            f"stand-in for exact ten crops here (a trained ResNet26 at 128/96: 78.8 % top-1 agreement with exact "
            f"ten crops); use --crops 10, or dense with crops of 224 px and larger", SmallDenseWindowWarning,
            stacklevel=2)
    return geometries


def _axis_weights(image_cells: int, offset: float, width: int) -> Tensor:
    """Weight of each cell in a window [offset, offset + width) along one axis: the cell's overlap with it."""
    starts = torch.arange(image_cells, dtype=torch.float64)
    return (torch.clamp(torch.minimum(starts + 1, torch.tensor(offset + width))
                        - torch.maximum(starts, torch.tensor(offset)), min=0)).float()


def _window_weights(geometry: DenseGeometry, centre: str) -> Tensor:
    """[windows, image_cells, image_cells] pooling weights, each summing to one, in five_crop's order.

    The corners (TL, TR, BL, BR), then the centre window unless it is dropped or has its own pass.
    """
    near, far = geometry.corner_offsets
    rows_cols = [(near, near), (near, far), (far, near), (far, far)]
    if centre == "interpolate":
        rows_cols.append((geometry.centre_offset, geometry.centre_offset))
    maps = [torch.outer(_axis_weights(geometry.image_cells, top, geometry.crop_cells),
                        _axis_weights(geometry.image_cells, left, geometry.crop_cells)) for top, left in rows_cols]
    return torch.stack(maps) / geometry.crop_cells ** 2


def dense_flops(model: nn.Module, spec: PreprocessSpec, centre: str = DEFAULT_CENTRE) -> int:
    """Forward FLOPs of dense ten crops per image (models.complexity): the trunk on the image and its
    mirror, plus the centre crop and its mirror when the centre has its own pass."""
    from cnnbench.models.complexity import model_flops

    centre_passes = 2 if centre == "pass" else 0
    return 2 * model_flops(model, spec.resize) + centre_passes * model_flops(model, spec.crop)


class DenseTenCropModel(nn.Module):
    """Input ``[B, 3, spec.resize, spec.resize]`` uint8 (or float holding 0..255), as TenCropModel.

    Returns the mean logit over the crop windows, ``[B, K]`` float32 (an Ensemble's members' logits
    summed, as the Ensemble does). ``crop_logits`` gives the per-window logits in TenCrop's order.
    With ``return_features=True`` it returns ``(logits, features)``: the full-image maps of the
    image and its mirror, ``[B, 2, C, h, w]`` (a list of those for an Ensemble), for CAM.
    Raises DenseGeometryError at construction where the windows do not align.

    ``model`` has ``forward_features`` (a fully convolutional trunk) and ``forward_head`` starting
    with a global average pool: the head receives each window's average as a 1x1 map.
    """

    def __init__(self, model: nn.Module, spec: PreprocessSpec, centre: str = DEFAULT_CENTRE,
                 return_features: bool = False):
        super().__init__()
        if centre not in CENTRE_MODES:
            raise ValueError(f"centre must be one of {CENTRE_MODES}, got {centre!r}")
        self.model = model
        self.spec = spec
        self.centre = centre
        self.return_features = return_features
        self.geometries = dense_geometry(model, spec)
        # Buffers, so .to(device) moves them; made where the model already is (the torch backend wraps
        # a model that is on the GPU), and _pool still follows the features should the two part ways.
        device = next(model.parameters()).device
        for index, geometry in enumerate(self.geometries):
            weights = _window_weights(geometry, centre).flatten(1).T.to(device)
            self.register_buffer(f"_weights_{index}", weights, persistent=False)

    @property
    def num_windows(self) -> int:
        """Windows averaged per image: 10, or 8 with the centre dropped."""
        return 2 * (_CORNERS if self.centre == "drop" else _CORNERS + 1)

    def _pool(self, features: Tensor, index: int) -> Tensor:
        """[N, C, h, w] -> [N * windows, C, 1, 1]: the windows' averages, as maps the head pools again (a no-op)."""
        weights = getattr(self, f"_weights_{index}").to(features.device, features.dtype)
        pooled = (features.flatten(2) @ weights).transpose(1, 2)
        return pooled.reshape(-1, features.shape[1], 1, 1)

    def _head(self, features) -> Tensor:
        """Windows' logits [N, windows, K] from the trunk's output (a list per member for an Ensemble)."""
        if isinstance(features, (list, tuple)):
            pooled = [self._pool(f, i) for i, f in enumerate(features)]
            batch = features[0].shape[0]
        else:
            pooled = self._pool(features, 0)
            batch = features.shape[0]
        logits = self.model.forward_head(pooled).float()
        return logits.reshape(batch, -1, logits.shape[-1])

    def _windows(self, x: Tensor):
        side = self.spec.resize
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, side, side):
            raise ValueError(f"DenseTenCropModel expects [B, 3, {side}, {side}] input, got {tuple(x.shape)}")
        first_param = next(self.model.parameters())
        images = normalize(x, self.spec).to(first_param.dtype)
        # The mirrored crops are five_crop's boxes of the mirrored image: the same windows on its map.
        both = torch.cat([images, torch.flip(images, dims=[-1])])
        features = self.model.forward_features(both)
        window_logits = self._head(features)  # [2B, windows on the full map, K]
        if self.centre == "pass":
            box = ten_crop_boxes(side, self.spec.crop)[_CORNERS]
            centres = both[:, :, box.top:box.top + box.size, box.left:box.left + box.size]
            centre_logits = self.model.forward_head(self.model.forward_features(centres)).float()
            window_logits = torch.cat([window_logits, centre_logits.unsqueeze(1)], dim=1)
        batch = images.shape[0]  # of the float tensor: TensorRT reads no Shape of a uint8 input
        # [2B, n, K] -> [B, 2n, K]: the image's five (or four) windows, then the mirror's, as TenCrop orders them.
        crop_logits = torch.cat([window_logits[:batch], window_logits[batch:]], dim=1)
        return crop_logits, features

    def crop_logits(self, x: Tensor) -> Tensor:
        """[B, num_windows, K]: one logit vector per crop window, in TenCrop's order (centre omitted when dropped)."""
        return self._windows(x)[0]

    def forward(self, x: Tensor):
        crop_logits, features = self._windows(x)
        mean_logits = crop_logits.mean(dim=1)
        if not self.return_features:
            return mean_logits
        return mean_logits, _image_and_mirror(features)


def _image_and_mirror(features):
    """[2B, C, h, w] (images, then mirrors) -> [B, 2, C, h, w], member by member for an ensemble's list."""
    if isinstance(features, (list, tuple)):
        return [_image_and_mirror(f) for f in features]
    return torch.stack(features.chunk(2), dim=1)
