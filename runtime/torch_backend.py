"""The PyTorch backend: the reference (fp32, TF32 off) and its faster variants (bf16, fp16,
channels_last, torch.compile)."""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from cnnbench.common.device import ieee_fp32
from cnnbench.common.errors import InputError
from cnnbench.data.spec import PreprocessSpec
from cnnbench.runtime.predictor import Predictor

TORCH_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TorchPredictor(Predictor):
    """Runs an nn.Module from a checkpoint.

    bf16/fp16 cast the whole model (`model.to(dtype)`): on this project's CPUs that measured
    faster than autocast (which re-casts every weight on every call under inference_mode) with the
    same logits error, and on CUDA it is the usual half-precision deployment.
    """

    backend = "torch"

    def __init__(self, model: nn.Module, meta: dict, *, source: str, device: str, precision: str,
                 channels_last: bool = False, compile: bool | str = False):
        if precision not in TORCH_PRECISIONS:
            raise InputError(f"torch backend precision must be one of {', '.join(TORCH_PRECISIONS)}, got {precision!r}")
        tags = (["channels_last"] if channels_last else []) + (["compiled"] if compile else [])
        super().__init__(source=source, spec=PreprocessSpec.from_dict(meta["spec"]), classes=meta["classes"],
                         device=device, precision=precision, graph_crops=None,
                         record=meta.get("record"), tags=tuple(tags))
        self.arch = meta["arch"]
        self._dtype = TORCH_PRECISIONS[precision]
        self._memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model = model.eval().to(device=device, dtype=self._dtype, memory_format=self._memory_format)
        self.model = model  # the eager module (Grad-CAM and parity checks want it)
        self._compiled = bool(compile)
        self._compile = compile
        self._module = _compile_model(model, compile, device) if compile else model
        self._dense_module = None  # built on first use: its geometry check must not stop crops=10/1

    def _forward_dense(self, images: Tensor) -> Tensor:
        if self._dense_module is None:
            from cnnbench.models.dense import DenseTenCropModel

            dense = DenseTenCropModel(self.model, self.spec).eval()
            self._dense_module = _compile_model(dense, self._compile, self.device) if self._compiled else dense
        with torch.inference_mode(), self._fp32_reference_math():
            logits = self._dense_module(images)
        return logits.clone() if self._compiled else logits

    def _forward_crops(self, crops: Tensor) -> Tensor:
        x = crops.to(dtype=self._dtype, memory_format=self._memory_format)
        with torch.inference_mode(), self._fp32_reference_math():
            logits = self._module(x)
        # A CUDA-graph replay (compile mode "reduce-overhead") reuses its output buffer on the next call.
        return logits.clone() if self._compiled else logits

    def _fp32_reference_math(self):
        """fp32 on CUDA means IEEE fp32: TF32 convolutions/matmuls are switched off during the call."""
        if self.precision != "fp32" or not self.device.startswith("cuda"):
            return contextlib.nullcontext()
        return ieee_fp32()


def _compile_model(model: nn.Module, compile: bool | str, device: str) -> nn.Module:
    """torch.compile (inductor). A string is the mode ("reduce-overhead" replays CUDA graphs).

    On the CPU: mode "max-autotune" with the weights frozen into the compiled graph (inductor's
    ``freezing``: BatchNorm folded into the convolutions, weights pre-packed for oneDNN once instead
    of re-read as inputs on every call). Freezing is switched on in inductor's config, process-wide:
    passed as ``options={"freezing": True}`` the same bf16 ResNet26 (224 px, 80 crops) ran at 60
    crops/s, with the config flag at 70, and with max-autotune on top at 74 (torch 2.14, this
    2-core CPU). Freezing only applies to graphs compiled for inference, so training is unaffected.
    """
    if isinstance(compile, str):
        return torch.compile(model, mode=compile)
    if device != "cpu":
        return torch.compile(model)
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return torch.compile(model, mode="max-autotune")

