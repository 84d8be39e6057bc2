"""The backend-independent part of inference: preprocessing on the device and crop averaging.

A backend subclass only says how to run its graph on a batch already on its device
(`_forward_crops`; `_forward_images` for exports with their crop mode inside the graph; `_forward_dense`
where the backend builds dense ten crops itself, the torch backend).
"""
from __future__ import annotations

import torch
from torch import Tensor

from cnnbench.common.errors import UserError
from cnnbench.data.crops import DENSE, TEN, crop_mode
from cnnbench.data.spec import PreprocessSpec


class BackendError(UserError, RuntimeError):
    """A backend that does not exist, is not available here, or cannot run the given model."""


def crop_mode_mismatch(source: str, graph_crops: str, asked: str) -> str:
    """One line: which crop mode an export's graph computes, and which export gives the mode asked for."""
    inside = "dense ten crops" if graph_crops == DENSE.name else "the ten crops"
    make = {DENSE.name: "--ten-crop dense", TEN.name: "--ten-crop graph (or host)"}.get(asked, "--ten-crop host")
    return f"{source}: this export computes {inside} inside its graph (crops={graph_crops} only); for crops={asked} export with {make}"


class Predictor:
    """Runs one model (checkpoint or export) through one backend.

    logits_from_crops: normalised float crops [N,3,c,c] -> [N,K] float32 on the CPU.
    logits_from_images: uint8 resized images [B,3,R,R] -> [B,K] float32 on the CPU, the mean over
    the ten crops (crops=10), the centre crop's logits (crops=1), or the mean over the dense ten
    crops' windows (crops="dense").
    graph_crops: the crop mode an export computes inside its graph from uint8 images ("10" or
    "dense"), or None when the graph takes normalised crops (then every cutting mode runs on the host).
    """

    backend = ""
    max_batch: int | None = None  # largest batch one graph call accepts (TensorRT profiles); None: any

    def __init__(self, *, source: str, spec: PreprocessSpec, classes: list[str], device: str,
                 precision: str, graph_crops: str | None, record: dict | None = None, tags: tuple = ()):
        self.source = source
        self.spec = spec
        self.classes = list(classes)
        self.device = device
        self.precision = precision
        self.graph_crops = graph_crops
        self.record = record or {}  # a checkpoint's training record (it names the split file)
        self.manifest: dict | None = None  # an export's verified manifest
        self.name = "-".join([self.backend, precision, *tags, device.split(":")[0]])

    @property
    def units_precision(self) -> str:
        """The precision of the matrix units this predictor computes with (bench's %peak divides by
        their measured peak): its precision, unless the backend computes in another (OpenVINO)."""
        return self.precision

    @property
    def ten_crop_in_graph(self) -> bool:
        """The graph takes uint8 resized images (its crop mode inside), not normalised crops."""
        return self.graph_crops is not None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, source={self.source!r})"

    # --- what a backend implements ------------------------------------------------------------
    def _forward_crops(self, crops: Tensor) -> Tensor:
        """Normalised float32 crops on self.device -> logits [N,K] (any float dtype) on self.device."""
        raise NotImplementedError

    def _forward_images(self, images: Tensor) -> Tensor:
        """uint8 images on self.device -> crop-averaged logits [B,K]; only for a crop mode in the graph."""
        raise NotImplementedError

    def _forward_dense(self, images: Tensor) -> Tensor:
        """uint8 images on self.device -> dense ten-crop logits [B,K]; an export needs them in its graph."""
        raise BackendError(f"{self.source}: this export runs the network on crops, so it cannot compute dense ten "
                           "crops; make an export with them in its graph: python cli.py export CHECKPOINT "
                           "--ten-crop dense")

    # --- public API ---------------------------------------------------------------------------
    def logits_from_crops(self, crops: Tensor) -> Tensor:
        if self.ten_crop_in_graph:
            raise BackendError(f"{self.source}: this export cuts the ten crops inside its graph and takes "
                               f"uint8 images [B,3,{self.spec.resize},{self.spec.resize}]; use logits_from_images")
        c = self.spec.crop
        if crops.dim() != 4 or tuple(crops.shape[1:]) != (3, c, c):
            raise ValueError(f"expected normalised crops [N,3,{c},{c}], got shape {tuple(crops.shape)}")
        crops = crops.to(self.device, torch.float32, non_blocking=True)
        return self._in_chunks(self._forward_crops, crops).float().cpu()

    def logits_from_images(self, images: Tensor, crops: int = 10) -> Tensor:
        return self.device_logits_from_images(images, crops).cpu()

    def device_logits_from_images(self, images: Tensor, crops: int = 10) -> Tensor:
        """logits_from_images, leaving the result on self.device (the pipeline copies once at the end)."""
        mode = crop_mode(crops)
        side = self.spec.resize
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (3, side, side):
            raise ValueError(f"expected uint8 images [B,3,{side},{side}], got {images.dtype} {tuple(images.shape)}")
        images = images.to(self.device, non_blocking=True)
        if self.graph_crops is not None:
            if mode.name != self.graph_crops:
                raise BackendError(crop_mode_mismatch(self.source, self.graph_crops, mode.name))
            return self._in_chunks(self._forward_images, images).float()
        if not mode.cuts_crops:
            return self._in_chunks(self._forward_dense, images).float()
        crops_in = mode.cut(images, self.spec).flatten(0, 1)
        return mode.reduce(self._in_chunks(self._forward_crops, crops_in).float())

    def _in_chunks(self, forward, x: Tensor) -> Tensor:
        if self.max_batch is None or x.shape[0] <= self.max_batch:
            return forward(x)
        return torch.cat([forward(part) for part in torch.split(x, self.max_batch)])
