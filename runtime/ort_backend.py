"""The ONNX Runtime backend: CPU provider, or the CUDA provider with I/O bound to torch GPU tensors."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cnnbench.data.spec import PreprocessSpec
from cnnbench.export.ort import cuda_device_index, cuda_provider_problem  # noqa: F401 (the loader asks it too)
from cnnbench.export.manifest import graph_crops
from cnnbench.runtime.predictor import BackendError, Predictor

LOGITS = "logits"
_NUMPY_TYPES = {torch.float32: np.float32, torch.uint8: np.uint8}


class OrtPredictor(Predictor):
    backend = "onnxruntime"

    def __init__(self, manifest: dict, *, source: str, device: str, precision: str, threads: int | None = None):
        from cnnbench.export.manifest import artifact_path
        from cnnbench.export.ort import make_ort_session

        super().__init__(source=source, spec=PreprocessSpec.from_dict(manifest["spec"]), classes=manifest["classes"],
                         device=device, precision=precision, graph_crops=graph_crops(manifest))
        self.manifest = manifest
        self.artifact = artifact_path(manifest, precision=precision, fmt="onnx")
        on_gpu = device.startswith("cuda")
        self._device_index = cuda_device_index(device) if on_gpu else 0
        problem = cuda_provider_problem(self._device_index) if on_gpu else None
        if problem:
            raise BackendError(f"onnxruntime cannot use {device}: {problem}")
        # make_ort_session preloads the CUDA libraries torch's wheel brings and refuses a silent CPU fallback.
        self.session = make_ort_session(self.artifact, device=device if on_gpu else "cpu", threads=threads)
        self._input_name = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        if LOGITS not in outputs:
            raise BackendError(f"{self.artifact}: graph has no '{LOGITS}' output (outputs: {outputs})")

    def _forward_crops(self, crops: Tensor) -> Tensor:
        return self._run(crops)

    def _forward_images(self, images: Tensor) -> Tensor:
        return self._run(images)

    def _run(self, x: Tensor) -> Tensor:
        """Input and output bound to torch-owned memory (on the GPU with CUDA): no copies, no host round trip."""
        x = x.contiguous()
        logits = torch.empty((x.shape[0], len(self.classes)), dtype=torch.float32, device=x.device)
        kind = "cuda" if x.is_cuda else "cpu"
        binding = self.session.io_binding()
        binding.bind_input(self._input_name, kind, self._device_index, _NUMPY_TYPES[x.dtype], tuple(x.shape),
                           x.data_ptr())
        binding.bind_output(LOGITS, kind, self._device_index, np.float32, tuple(logits.shape), logits.data_ptr())
        if x.is_cuda:
            # ONNX Runtime computes on its own stream: the input must be complete before it starts.
            torch.cuda.current_stream(x.device).synchronize()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()  # the logits are complete before torch reads them
        return logits
