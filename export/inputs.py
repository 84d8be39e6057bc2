"""Reading sample images into what an exported graph takes: shared by the parity check (held-out
images) and int8 calibration (training images)."""
from __future__ import annotations

import torch
from torch import Tensor

from cnnbench.data.images import ImageError, load_rgb
from cnnbench.data.spec import PreprocessSpec
from cnnbench.data.crops import eval_transform
from cnnbench.data.transforms import resize_uint8
from cnnbench.export.errors import ExportError


def graph_inputs(samples, spec: PreprocessSpec, ten_crop_in_graph: bool, crops: int, purpose: str) -> tuple[Tensor, list]:
    """The graph's input rows for each readable sample, concatenated: ``crops`` normalised crops (1: the
    centre crop, 10: the ten crops), or the resized uint8 image for an in-graph ten-crop graph.
    Unreadable images are skipped and listed as [path, reason]; none readable is an ExportError."""
    cut = eval_transform(spec, crops=crops)
    tensors, skipped = [], []
    for sample in samples:
        try:
            img = load_rgb(sample.path)
        except ImageError as exc:
            skipped.append([sample.path, str(exc)])
            continue
        rows = resize_uint8(img, spec) if ten_crop_in_graph else cut(img)
        tensors.append(rows if rows.dim() == 4 else rows.unsqueeze(0))
    if not tensors:
        raise ExportError(f"none of the {len(samples)} {purpose} images could be read (first: {skipped[0][1]})")
    return torch.cat(tensors), skipped
