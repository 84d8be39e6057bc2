"""TensorRT engines built from the exported ONNX graphs, with the TensorRT 10/11 Python API.

Precision is a property of the graph: networks are created strongly typed (TensorRT 10 needs the
STRONGLY_TYPED flag for that; TensorRT 11 is always strongly typed, keeps the flag only for
compatibility and has removed BuilderFlag.FP16 and implicit INT8), so an fp16 ONNX graph gives an
fp16 engine and no precision flag is ever set. EXPLICIT_BATCH is the default since TensorRT 10 and
is not passed. One optimisation profile covers batch 1..max; a timing cache file is shared by
every build so later builds skip kernel timing already done.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

from common import atomic_write
from export.errors import ExportError

WORKSPACE_BYTES = 4 << 30
TENSORRT_MODES = ("auto", "on", "off")
TEN_CROPS = 10


def tensorrt_status() -> tuple[bool, str]:
    """(available, reason if not): TensorRT importable and a CUDA device visible to torch."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        return False, f"TensorRT is not installed (pip install '.[tensorrt]'): {exc}"
    if not torch.cuda.is_available():
        return False, f"TensorRT {trt.__version__} is installed but no CUDA device is visible"
    return True, ""


def resolve_mode(mode: str) -> tuple[bool, str]:
    """(build engines?, one line saying why not). ``on`` without TensorRT/CUDA is an ExportError."""
    if mode not in TENSORRT_MODES:
        raise ExportError(f"tensorrt must be one of {TENSORRT_MODES}, got {mode!r}")
    if mode == "off":
        return False, "skipped: --tensorrt off"
    available, reason = tensorrt_status()
    if available:
        return True, ""
    if mode == "on":
        raise ExportError(f"--tensorrt on, but {reason}")
    return False, f"skipped: {reason}"


def profile_shapes(io: dict, max_batch: int) -> dict:
    """min/opt/max input shapes of the optimisation profile for a graph's ``io`` spec.

    The runtime feeds up to ``max_batch`` images per call: as ten crops each when the crops are cut
    outside the graph (so up to 10 x max_batch rows), as one resized image each when they are cut
    inside it. opt = max: engines are tuned for full batches, which is what throughput runs use.
    """
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
        raise ExportError(f"max_batch must be a positive integer, got {max_batch!r}")
    (graph_input,) = io["inputs"]
    rows = max_batch * (TEN_CROPS if io["crops_per_image"] == 1 else 1)
    per_item = tuple(int(d) for d in graph_input["shape"][1:])
    return {"input_name": graph_input["name"], "min_shape": (1, *per_item),
            "opt_shape": (rows, *per_item), "max_shape": (rows, *per_item)}


def _network_flags(trt) -> int:
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if strongly_typed is None else 1 << int(strongly_typed)


def _read_timing_cache(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def _attach_timing_cache(config, path: str):
    """Load the shared timing cache into ``config``; a cache from another TensorRT/GPU starts afresh."""
    cache = config.create_timing_cache(_read_timing_cache(path))
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return
    print(f"[export] timing cache {path} does not fit this TensorRT/GPU; starting a new one", file=sys.stderr)
    config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def build_tensorrt_engine(onnx_path, plan_path, *, input_name: str, min_shape, opt_shape, max_shape,
                          timing_cache_path) -> dict:
    """Build a serialized engine from ``onnx_path`` into ``plan_path`` (atomic); update the timing cache.

    Returns ``{"file", "tensorrt_version", "profile": {input_name: {min, opt, max}}, "build_seconds"}``.
    """
    available, reason = tensorrt_status()
    if not available:
        raise ExportError(f"cannot build a TensorRT engine: {reason}")
    import tensorrt as trt

    onnx_path, plan_path, timing_cache_path = map(os.fspath, (onnx_path, plan_path, timing_cache_path))
    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{onnx_path}: TensorRT's ONNX parser rejected the graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, tuple(min_shape), tuple(opt_shape), tuple(max_shape))
    config.add_optimization_profile(profile)
    _attach_timing_cache(config, timing_cache_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"{onnx_path}: TensorRT failed to build an engine (see TensorRT's log above)")
    atomic_write(plan_path, memoryview(serialized).tobytes())
    atomic_write(timing_cache_path, memoryview(config.get_timing_cache().serialize()).tobytes())
    return {
        "file": os.path.basename(plan_path),
        "tensorrt_version": trt.__version__,
        "profile": {input_name: {"min": list(min_shape), "opt": list(opt_shape), "max": list(max_shape)}},
        "build_seconds": round(time.perf_counter() - started, 2),
    }


class TensorRTEngine:
    """Runs a serialized engine on the current CUDA device with torch CUDA tensors as I/O buffers.

    Only for plans this program built or verified against a manifest: deserialising a plan runs
    its code.
    """

    def __init__(self, plan: bytes):
        available, reason = tensorrt_status()
        if not available:
            raise ExportError(f"cannot run a TensorRT engine: {reason}")
        import tensorrt as trt

        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ExportError("TensorRT could not deserialise the engine (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]

    def _torch_dtype(self, name: str) -> torch.dtype:
        trt = self._trt
        table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                 trt.DataType.UINT8: torch.uint8, trt.DataType.INT8: torch.int8,
                 trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool}
        if hasattr(trt.DataType, "INT64"):
            table[trt.DataType.INT64] = torch.int64
        return table[self.engine.get_tensor_dtype(name)]

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """CUDA tensors in (by input name), CUDA tensors out (by output name), on torch's current stream."""
        keep_alive = []
        for name in self.input_names:
            tensor = inputs[name].to(device="cuda", dtype=self._torch_dtype(name)).contiguous()
            keep_alive.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ExportError("TensorRT engine execution failed (see TensorRT's log above)")
        stream.synchronize()
        return outputs

    def logits_runner(self):
        """numpy batch in -> numpy ``logits`` out, the form parity uses."""
        (name,) = self.input_names

        def run(batch: np.ndarray) -> np.ndarray:
            return self.run({name: torch.from_numpy(np.ascontiguousarray(batch))})["logits"].float().cpu().numpy()

        return run
