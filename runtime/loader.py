"""`runtime.load`: one entry point from a checkpoint or an export folder to a Predictor."""
from __future__ import annotations

import os
import warnings

from cnnbench.common.device import resolve_device
from cnnbench.common.errors import InputError, MissingFileError
from cnnbench.runtime.backends import AUTO, BACKEND_CHOICES, CPU_ONLY_BACKENDS, EXPORT_BACKENDS
from cnnbench.runtime.predictor import BackendError, Predictor


def load(path, backend: str = "auto", device: str = "auto", precision: str = "fp32", channels_last: bool = False,
         compile: bool | str = False, threads: int | None = None) -> Predictor:
    """Open `path` (checkpoint .pt, export folder or its manifest.json) with one backend.

    backend "auto": torch for a checkpoint. For an export on the CPU, the fastest backend that passed
    its gates for this precision in the `bench` measurements of this export on this machine
    (runtime.selection), else onnxruntime (openvino for bf16, which only it runs from an export). On a
    GPU: tensorrt when the export has a plan of this precision and TensorRT works, else onnxruntime
    (on the GPU when its CUDA provider works, else on the CPU). device "auto": cuda when torch sees a
    GPU, else cpu.
    channels_last / compile apply to the torch backend; threads to torch (intra-op), onnxruntime and openvino.
    """
    if backend not in BACKEND_CHOICES:
        raise BackendError(f"unknown backend {backend!r}; expected one of {', '.join(BACKEND_CHOICES)}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingFileError(f"model not found: {path} (expected a checkpoint .pt, an export folder or manifest.json)")
    if path.endswith((".onnx", ".plan")):
        raise BackendError(f"{path}: give the export folder (or its manifest.json), not one graph file: "
                           "the manifest carries the classes, the preprocessing and the hashes checked before loading")
    if _is_export(path):
        if channels_last or compile:
            raise InputError("channels_last and compile apply to the torch backend (checkpoints) only, not to exports")
        return _load_export(path, backend, device, precision, threads)
    if backend not in (AUTO, "torch"):
        raise BackendError(f"{path} is a PyTorch checkpoint; the {backend} backend runs an export folder "
                           "(create one with `python cli.py export`), or use --backend torch")
    return _load_checkpoint(path, resolve_device(device), precision, channels_last, compile, threads)


def _is_export(path: str) -> bool:
    return os.path.isdir(path) or path.endswith(".json")


def _load_checkpoint(path, device, precision, channels_last, compile, threads) -> Predictor:
    import torch

    from cnnbench.models.checkpoint import load_checkpoint
    from cnnbench.runtime.torch_backend import TorchPredictor

    if threads is not None:
        torch.set_num_threads(threads)
    model, meta = load_checkpoint(path, map_location="cpu")
    return TorchPredictor(model, meta, source=path, device=device, precision=precision,
                          channels_last=channels_last, compile=compile)


def _load_export(path, backend, device, precision, threads) -> Predictor:
    from cnnbench.export.manifest import load_manifest

    if backend == "torch":
        raise BackendError(f"{path} is an export; the torch backend runs the source checkpoint "
                           f"(see the manifest's sources), or use --backend {' / '.join(EXPORT_BACKENDS)}")
    manifest = load_manifest(path)  # verifies every file's sha256 before anything is deserialised
    if backend == AUTO:
        backend, device = _auto_export_backend(manifest, device, precision)
    else:
        device = resolve_device("cpu" if device == AUTO and backend in CPU_ONLY_BACKENDS else device)
    if backend == "openvino":
        from cnnbench.runtime.openvino_backend import OpenVinoPredictor, graph_precision

        _require_artifact(manifest, path, graph_precision(precision), "onnx")
        return OpenVinoPredictor(manifest, source=path, device=device, precision=precision, threads=threads)
    if backend == "tensorrt":
        from cnnbench.runtime.trt_backend import TensorRTPredictor, tensorrt_problem

        if tensorrt_problem():
            raise BackendError(f"tensorrt backend unavailable: {tensorrt_problem()}")
        _require_artifact(manifest, path, precision, "tensorrt")
        return TensorRTPredictor(manifest, source=path, device=device, precision=precision)
    from cnnbench.runtime.ort_backend import OrtPredictor

    _require_artifact(manifest, path, precision, "onnx")
    return OrtPredictor(manifest, source=path, device=device, precision=precision, threads=threads)


def _auto_export_backend(manifest: dict, device: str, precision: str) -> tuple[str, str]:
    """On the CPU: the backend bench verified fastest here (runtime.selection), else ONNX Runtime
    (OpenVINO for bf16). On a GPU: a TensorRT plan, then ONNX Runtime's CUDA provider, then its CPU one."""
    from cnnbench.runtime.ort_backend import cuda_provider_problem
    from cnnbench.runtime.selection import recorded_choice
    from cnnbench.runtime.trt_backend import tensorrt_problem

    resolved = resolve_device(device)
    if not resolved.startswith("cuda"):
        chosen = recorded_choice(manifest, resolved, precision)
        if chosen is not None:
            return chosen, resolved
        return ("openvino" if precision == "bf16" else "onnxruntime"), resolved
    if _has_artifact(manifest, precision, "tensorrt") and tensorrt_problem() is None:
        return "tensorrt", resolved
    problem = cuda_provider_problem()
    if problem is None:
        return "onnxruntime", resolved
    if device == "auto":  # a GPU exists but nothing here can run this export on it
        warnings.warn(f"onnxruntime runs this export on the CPU: {problem}", RuntimeWarning, stacklevel=3)
        return "onnxruntime", "cpu"
    raise BackendError(f"no backend can run this export on {resolved}: no usable TensorRT plan and {problem}")


def _has_artifact(manifest: dict, precision: str, fmt: str) -> bool:
    return any(a.get("format") == fmt and a.get("precision") == precision for a in manifest.get("artifacts", []))


def _require_artifact(manifest: dict, path: str, precision: str, fmt: str) -> None:
    if not _has_artifact(manifest, precision, fmt):
        have = sorted(f"{a.get('format')}/{a.get('precision')}" for a in manifest.get("artifacts", []))
        raise BackendError(f"{path}: the export has no {fmt} artifact in {precision} (it has: {', '.join(have)})")
