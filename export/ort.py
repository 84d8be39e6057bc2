"""ONNX Runtime sessions for exported graphs (parity here; runtime/ and bench/ reuse them)."""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch

from export.errors import ExportError

DEVICES = ("cpu", "cuda", "auto")
_GRAPH_OPT = ("all", "extended", "basic", "disable")


def cuda_provider_usable() -> bool:
    """ONNX Runtime's CUDA provider is used only where torch sees a GPU and the provider is installed."""
    import onnxruntime as ort

    return torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()


def make_ort_session(onnx_path, device: str = "cpu", threads: int | None = None, graph_opt: str = "all",
                     spinning: bool = False):
    """An ``onnxruntime.InferenceSession`` on ``device`` ("cpu", "cuda", or "auto": cuda when usable).

    ``threads`` sets intra-op threads (None: ONNX Runtime's default, one per physical core).
    ``graph_opt`` is the graph optimisation level ("all" also fuses QDQ pairs into integer kernels).
    Operators run one after another (sequential mode, one inter-op thread): a classifier is a chain.
    ``spinning``: whether idle intra-op threads busy-wait for work. Off by default: on a machine whose
    cores other processes share, spinning threads steal the time the working ones need (ResNet26 int8
    at 224 px on 2 cores while a training job ran: 66-68 crops/s spinning, 70-74 without; fp32 22
    either way).
    Asking for "cuda" where it cannot run is an ExportError, never a silent fallback to the CPU
    (ONNX Runtime itself falls back quietly, so the providers are checked).
    """
    import onnxruntime as ort

    if device not in DEVICES:
        raise ExportError(f"device must be one of {DEVICES}, got {device!r}")
    if graph_opt not in _GRAPH_OPT:
        raise ExportError(f"graph_opt must be one of {_GRAPH_OPT}, got {graph_opt!r}")
    path = os.fspath(onnx_path)
    if not os.path.isfile(path):
        raise ExportError(f"{path}: ONNX file not found")
    use_cuda = device == "cuda" or (device == "auto" and cuda_provider_usable())
    if use_cuda and not cuda_provider_usable():
        raise ExportError(f"{path}: ONNX Runtime on CUDA needs a GPU visible to torch and the CUDAExecutionProvider "
                          f"(available providers: {', '.join(ort.get_available_providers())})")
    if use_cuda and hasattr(ort, "preload_dlls"):
        # Loads the CUDA/cuDNN libraries from the pip-installed NVIDIA packages (onnxruntime >= 1.21).
        ort.preload_dlls()
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[graph_opt]
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(path, sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        raise ExportError(f"{path}: ONNX Runtime cannot load the graph: {exc}") from exc
    if use_cuda and "CUDAExecutionProvider" not in session.get_providers():
        raise ExportError(f"{path}: ONNX Runtime could not start its CUDA provider (see its log above)")
    return session


def logits_runner(session) -> Callable[[np.ndarray], np.ndarray]:
    """numpy batch in -> the session's ``logits`` output (the first output) as a numpy array."""
    feed_name = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(["logits"], {feed_name: np.ascontiguousarray(batch)})[0]

    return run


def session_device(session) -> str:
    return "cuda" if "CUDAExecutionProvider" in session.get_providers() else "cpu"
