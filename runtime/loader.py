"""`runtime.load`: one entry point from a checkpoint or an export folder to a Predictor."""
from __future__ import annotations

import os
import warnings

from common.device import resolve_device
from common.errors import InputError, MissingFileError
from runtime.predictor import BackendError, Predictor

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


def load(path, backend: str = "auto", device: str = "auto", precision: str = "fp32", channels_last: bool = False,
         compile: bool | str = False, threads: int | None = None) -> Predictor:
    """Open `path` (checkpoint .pt, export folder or its manifest.json) with one backend.

    backend "auto": torch for a checkpoint; for an export, tensorrt when the export has a plan of this
    precision and TensorRT + CUDA are available, else onnxruntime (on the GPU when its CUDA provider
    works, else on the CPU). device "auto": cuda when torch sees a GPU, else cpu.
    channels_last / compile apply to the torch backend; threads to torch (intra-op) and onnxruntime.
    """
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
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
    if backend in ("onnxruntime", "tensorrt"):
        raise BackendError(f"{path} is a PyTorch checkpoint; the {backend} backend runs an export folder "
                           "(create one with `python cli.py export`), or use --backend torch")
    return _load_checkpoint(path, resolve_device(device), precision, channels_last, compile, threads)


def _is_export(path: str) -> bool:
    return os.path.isdir(path) or path.endswith(".json")


def _load_checkpoint(path, device, precision, channels_last, compile, threads) -> Predictor:
    import torch

    from models.checkpoint import load_checkpoint
    from runtime.torch_backend import TorchPredictor

    if threads is not None:
        torch.set_num_threads(threads)
    model, meta = load_checkpoint(path, map_location="cpu")
    return TorchPredictor(model, meta, source=path, device=device, precision=precision,
                          channels_last=channels_last, compile=compile)


def _load_export(path, backend, device, precision, threads) -> Predictor:
    from export.manifest import load_manifest

    if backend == "torch":
        raise BackendError(f"{path} is an export; the torch backend runs the source checkpoint "
                           "(see the manifest's sources), or use --backend onnxruntime / tensorrt")
    manifest = load_manifest(path)  # verifies every file's sha256 before anything is deserialised
    if backend == "auto":
        backend, device = _auto_export_backend(manifest, device, precision)
    else:
        device = resolve_device(device)
    if backend == "tensorrt":
        from runtime.trt_backend import TensorRTPredictor, tensorrt_problem

        if tensorrt_problem():
            raise BackendError(f"tensorrt backend unavailable: {tensorrt_problem()}")
        _require_artifact(manifest, path, precision, "tensorrt")
        return TensorRTPredictor(manifest, source=path, device=device, precision=precision)
    from runtime.ort_backend import OrtPredictor

    _require_artifact(manifest, path, precision, "onnx")
    return OrtPredictor(manifest, source=path, device=device, precision=precision, threads=threads)


def _auto_export_backend(manifest: dict, device: str, precision: str) -> tuple[str, str]:
    """Fastest available: a TensorRT plan on the GPU, then ONNX Runtime's CUDA provider, then its CPU one."""
    from runtime.ort_backend import cuda_provider_problem
    from runtime.trt_backend import tensorrt_problem

    resolved = resolve_device(device)
    if not resolved.startswith("cuda"):
        return "onnxruntime", resolved
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
