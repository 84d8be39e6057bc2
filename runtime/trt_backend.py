"""The TensorRT backend: a serialized engine (.plan) run with torch CUDA tensors as its I/O.

The plan is read once and its bytes are checked against the manifest's sha256 before TensorRT
deserialises them (export.manifest.verified_bytes): an engine can carry code, so only the
verified bytes are ever loaded. The engine wrapper (checked set_input_shape/set_tensor_address, 256-byte aligned
I/O, execute_async_v3 on a non-default stream ordered with torch's current one) is export's, shared
with its parity check.
"""
from __future__ import annotations

import torch
from torch import Tensor

from cnnbench.data.spec import PreprocessSpec
from cnnbench.export.manifest import graph_crops
from cnnbench.runtime.predictor import BackendError, Predictor

LOGITS = "logits"


def tensorrt_problem() -> str | None:
    """Why the TensorRT backend cannot run here, or None when it can."""
    from cnnbench.export.tensorrt import tensorrt_status

    available, reason = tensorrt_status()
    return None if available else reason


class TensorRTPredictor(Predictor):
    backend = "tensorrt"

    def __init__(self, manifest: dict, *, source: str, device: str, precision: str):
        from cnnbench.export.manifest import artifact_path, verified_bytes
        from cnnbench.export.tensorrt import TensorRTEngine

        problem = tensorrt_problem()
        if problem:
            raise BackendError(f"tensorrt backend unavailable: {problem}")
        if not device.startswith("cuda"):
            raise BackendError(f"the tensorrt backend runs on CUDA only, not on {device!r}")
        super().__init__(source=source, spec=PreprocessSpec.from_dict(manifest["spec"]), classes=manifest["classes"],
                         device=device, precision=precision, graph_crops=graph_crops(manifest))
        self.manifest = manifest
        self.artifact = artifact_path(manifest, precision=precision, fmt="tensorrt")
        with torch.cuda.device(device):
            self._engine = TensorRTEngine(verified_bytes(manifest, precision=precision, fmt="tensorrt"))
        if len(self._engine.input_names) != 1 or LOGITS not in self._engine.output_names:
            raise BackendError(f"{self.artifact}: expected one input and a '{LOGITS}' output, found inputs "
                               f"{self._engine.input_names}, outputs {self._engine.output_names}")
        self._input = self._engine.input_names[0]
        self.max_batch = self._engine.max_batch  # the engine's optimisation profile caps the batch

    def _forward_crops(self, crops: Tensor) -> Tensor:
        return self._run(crops)

    def _forward_images(self, images: Tensor) -> Tensor:
        return self._run(images)

    def _run(self, x: Tensor) -> Tensor:
        with torch.cuda.device(x.device):
            return self._engine.run({self._input: x})[LOGITS]
