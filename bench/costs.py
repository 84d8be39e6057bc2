"""What a row's speed means in FLOPs: each target's FLOPs per image and the device's measured peaks."""
from __future__ import annotations

import sys
from typing import Optional

import torch

from cnnbench.bench.peak import peak_flops
from cnnbench.bench.targets import BenchTarget
from cnnbench.common.device import ieee_fp32
from cnnbench.data.crops import TEN, crop_mode
from cnnbench.data.spec import PreprocessSpec
from cnnbench.models.checkpoint import load_checkpoint
from cnnbench.models.complexity import model_flops
from cnnbench.models.dense import DEFAULT_CENTRE, dense_flops


class Costs:
    """FLOP counts (per checkpoint) and matmul peaks (per precision), each measured once per run."""

    def __init__(self, device: str, progress: bool):
        self.device = device
        self.progress = progress
        self.peaks: dict[str, dict] = {}
        self._flops: dict[tuple, int] = {}  # (checkpoint, cuts crops, centre) -> FLOPs per crop / per dense image

    def row_fields(self, target: BenchTarget, precision: str, images_per_s: float, crops=TEN.name) -> dict:
        per_image = self.flops_per_image(target, crops)
        peak = self.peak(precision)
        achieved = None if per_image is None else per_image * images_per_s
        return {
            "flops_per_image": per_image,
            "achieved_flops_per_s": achieved,
            "peak_flops_per_s": peak["flops"],
            "peak_precision": precision,
            "peak_fraction": achieved / peak["flops"] if achieved is not None and peak["flops"] else None,
        }

    def flops_per_image(self, target: BenchTarget, crops=TEN.name) -> Optional[int]:
        """Forward FLOPs per image in crop mode ``crops`` (n x one crop; dense: models.dense.dense_flops),
        summed over an ensemble's members; None without checkpoints."""
        if not target.sources or target.missing_sources:
            return None
        mode = crop_mode(crops)
        # A dense export says how it handles the centre crop (its own pass costs two crop passes more);
        # PyTorch's dense rows use the default. Modes that cut crops have no centre choice.
        centre = None if mode.cuts_crops else (target.manifest or {}).get("dense_centre") or DEFAULT_CENTRE
        total = 0
        for source in target.sources:
            key = (source, mode.cuts_crops, centre)
            if key not in self._flops:
                network, meta = load_checkpoint(source)
                spec = PreprocessSpec.from_dict(meta["spec"])
                self._flops[key] = (model_flops(network, spec.crop) if mode.cuts_crops
                                    else dense_flops(network, spec, centre))
            total += self._flops[key] * (mode.count if mode.cuts_crops else 1)
        return total

    def peak(self, precision: str) -> dict:
        """The fp32 peak is measured like the fp32 reference runs: IEEE fp32 (TF32 off)."""
        if precision not in self.peaks:
            if self.progress:
                print(f"[bench] measuring the {precision} matmul peak on {self.device}", file=sys.stderr, flush=True)
            with ieee_fp32():
                self.peaks[precision] = peak_flops(precision, torch.device(self.device))
        return self.peaks[precision]
