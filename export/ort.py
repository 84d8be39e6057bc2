"""ONNX Runtime sessions for exported graphs (parity here; runtime/ and bench/ reuse them)."""
from __future__ import annotations

import functools
import os
import warnings
from typing import Callable

import numpy as np
import torch
from onnx import TensorProto, helper

from cnnbench.export.errors import ExportError

_GRAPH_OPT = ("all", "extended", "basic", "disable")


def cuda_device_index(device: str) -> int | None:
    """"cuda" -> 0, "cuda:N" -> N, "cpu"/"auto" -> None; anything else is an ExportError."""
    if device in ("cpu", "auto"):
        return None
    if device == "cuda":
        return 0
    index = device[len("cuda:"):] if device.startswith("cuda:") else ""
    if not index.isdigit():
        raise ExportError(f"device must be cpu, cuda, cuda:N or auto, got {device!r}")
    return int(index)


def cuda_provider_options(device_index: int) -> dict:
    """The CUDA provider's options: the GPU to run on, and true fp32 (its use_tf32 defaults to 1, which
    would round fp32 convolutions and matmuls to TF32 and miss the fp32 gate of max |dlogit| <= 1e-3)."""
    return {"device_id": str(device_index), "use_tf32": "0"}


@functools.lru_cache(maxsize=None)
def cuda_provider_problem(device_index: int = 0) -> str | None:
    """Why ONNX Runtime cannot run on GPU ``device_index`` here, or None when it can.

    Listing the CUDAExecutionProvider only says this onnxruntime build has it: its CUDA and cuDNN
    libraries load when a session asks for it, and ONNX Runtime then quietly runs on the CPU if they
    cannot. So a one-node graph is opened on the GPU once per process to find out.
    """
    import onnxruntime as ort

    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"this onnxruntime build ({ort.__version__}) has no CUDAExecutionProvider (install onnxruntime-gpu)"
    if device_index >= torch.cuda.device_count():
        return f"there is no cuda:{device_index} (torch sees {torch.cuda.device_count()} GPU(s))"
    _preload_cuda_libraries(ort)
    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    probe = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [value],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # what any onnxruntime reads
    try:
        session = ort.InferenceSession(probe.SerializeToString(), providers=[
            ("CUDAExecutionProvider", cuda_provider_options(device_index)), "CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        return f"ONNX Runtime's CUDAExecutionProvider failed to start: {exc}"
    if "CUDAExecutionProvider" not in session.get_providers():
        return ("ONNX Runtime lists its CUDAExecutionProvider but could not load its CUDA/cuDNN libraries "
                f"(onnxruntime {ort.__version__}; see its log above; its CUDA major must match torch's, "
                f"CUDA {torch.version.cuda})")
    return None


def _preload_cuda_libraries(ort) -> None:
    """Load the CUDA/cuDNN libraries the pip-installed NVIDIA packages bring (onnxruntime >= 1.21)."""
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def make_ort_session(onnx_path, device: str = "cpu", threads: int | None = None, graph_opt: str = "all",
                     spinning: bool = False):
    """An ``onnxruntime.InferenceSession`` on ``device`` ("cpu", "cuda", "cuda:N", or "auto": cuda:0 when usable).

    ``threads`` sets intra-op threads (None: ONNX Runtime's default, one per physical core).
    ``graph_opt`` is the graph optimisation level ("all" also fuses QDQ pairs into integer kernels).
    Operators run one after another (sequential mode, one inter-op thread): a classifier is a chain.
    ``spinning``: whether idle intra-op threads busy-wait for work. Off by default: on a machine whose
    cores other processes share, spinning threads steal the time the working ones need (ResNet26 int8
    at 224 px on 2 cores while a training job ran: 66-68 crops/s spinning, 70-74 without; fp32 22
    either way).
    On CUDA the provider gets ``cuda_provider_options`` (that GPU, TF32 off). Asking for "cuda" where
    it cannot run is an ExportError, never a silent fallback to the CPU (ONNX Runtime itself falls back
    quietly, so the providers are checked); "auto" falls back to the CPU with a warning saying why.
    """
    import onnxruntime as ort

    index = cuda_device_index(device)
    if graph_opt not in _GRAPH_OPT:
        raise ExportError(f"graph_opt must be one of {_GRAPH_OPT}, got {graph_opt!r}")
    path = os.fspath(onnx_path)
    if not os.path.isfile(path):
        raise ExportError(f"{path}: ONNX file not found")
    if device == "auto":
        index = 0 if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available() else None
    problem = None if index is None else cuda_provider_problem(index)
    if problem and device == "auto":
        warnings.warn(f"{path}: ONNX Runtime runs on the CPU: {problem}", RuntimeWarning, stacklevel=2)
        index = None
    elif problem:
        raise ExportError(f"{path}: ONNX Runtime on CUDA needs a GPU and a CUDA provider that starts ({device}: {problem})")
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
    providers = ["CPUExecutionProvider"]
    if index is not None:
        providers.insert(0, ("CUDAExecutionProvider", cuda_provider_options(index)))
    try:
        session = ort.InferenceSession(path, sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        raise ExportError(f"{path}: ONNX Runtime cannot load the graph: {exc}") from exc
    if index is not None and "CUDAExecutionProvider" not in session.get_providers():
        raise ExportError(f"{path}: ONNX Runtime could not start its CUDA provider on cuda:{index} (see its log above)")
    return session


def logits_runner(session) -> Callable[[np.ndarray], np.ndarray]:
    """numpy batch in -> the session's ``logits`` output (the first output) as a numpy array."""
    feed_name = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(["logits"], {feed_name: np.ascontiguousarray(batch)})[0]

    return run

