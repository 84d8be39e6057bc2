"""The backends, named once: what every `--backend` accepts (eval, predict, bench, validate), which
export artifacts each one runs, and whether it can run here. Nothing heavy is imported at module
level, so the CLI builds its choices from it."""
from __future__ import annotations

AUTO = "auto"
BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")
BACKEND_CHOICES = (AUTO, *BACKENDS)
# The backends that run an export's artifacts of each format (torch runs checkpoints).
FORMAT_BACKENDS = {"onnx": ("onnxruntime", "openvino"), "tensorrt": ("tensorrt",)}
EXPORT_BACKENDS = tuple(b for group in FORMAT_BACKENDS.values() for b in group)
CPU_ONLY_BACKENDS = ("openvino",)  # device "auto" means the CPU for these


def backend_problem(backend: str, device: str) -> str | None:
    """Why an export backend cannot run on ``device`` here, or None."""
    if backend == "tensorrt":
        from cnnbench.runtime.trt_backend import tensorrt_problem

        if not device.startswith("cuda"):
            return "TensorRT runs on CUDA only"
        return tensorrt_problem()
    if backend == "openvino":
        from cnnbench.runtime.openvino_backend import openvino_problem

        return openvino_problem(device)
    if backend == "onnxruntime" and device.startswith("cuda"):
        from cnnbench.runtime.ort_backend import cuda_provider_problem

        return cuda_provider_problem()
    return None
