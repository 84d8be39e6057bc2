"""TensorRT engines built from the exported ONNX graphs, with the TensorRT 10/11 Python API.

Precision is a property of the graph: networks are created strongly typed (TensorRT 10 needs the
STRONGLY_TYPED flag for that; TensorRT 11 is always strongly typed, keeps the flag only for
compatibility and has removed BuilderFlag.FP16 and implicit INT8), so an fp16 ONNX graph gives an
fp16 engine and no precision flag is ever set. EXPLICIT_BATCH is the default since TensorRT 10 and
is not passed. One optimisation profile covers batch 1..max; a timing cache file is shared by
every build so later builds skip kernel timing already done. BuilderFlag.TF32 is on by default and
is cleared: fp32 layers (all of an fp32 engine, the fp32 prefix and head of the others) compute in
true fp32, as the fp32 parity gate (max |dlogit| <= 1e-3 against an IEEE reference) requires.

Running an engine: every set_input_shape/set_tensor_address result is checked (a batch outside the
optimisation profile is an error naming both), I/O addresses are 256-byte aligned as TensorRT
requires (a misaligned view is copied), and the engine is enqueued on a non-default stream (TensorRT
synchronises the whole device around the legacy default stream) that torch's current stream then
waits on, so nothing synchronises the host inside a call: the caller's copy of the result does, once.
"""
from __future__ import annotations

import math
import os
import sys
import time

import numpy as np
import torch
from torch import Tensor

from cnnbench.common import atomic_write
from cnnbench.export.errors import ExportError

WORKSPACE_BYTES = 4 << 30
TENSORRT_MODES = ("auto", "on", "off")
TEN_CROPS = 10
ADDRESS_ALIGNMENT = 256  # bytes; TensorRT's requirement for every I/O tensor address
# TensorRT DataType member -> torch dtype; members a TensorRT version lacks are skipped, and types with
# no torch equivalent (INT4, FP4, E8M0: packed or exponent-only) are refused by name (torch_dtype).
_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
                 "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8,
                 "FP8": getattr(torch, "float8_e4m3fn", None)}


class TensorRTError(ExportError):
    """TensorRT refused a call (shape outside the profile, an address, a type torch cannot hold, a launch)."""


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

    TF32 is cleared (see above): no parity gate allows it, and fp16 is the fast choice.
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
    config.clear_flag(trt.BuilderFlag.TF32)  # on by default
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


def torch_dtype(trt, trt_type, what: str) -> torch.dtype:
    """The torch dtype of TensorRT DataType ``trt_type``; a type torch cannot hold is a TensorRTError."""
    for member, dtype in _TORCH_DTYPES.items():
        if dtype is not None and getattr(trt.DataType, member, None) == trt_type:
            return dtype
    raise TensorRTError(f"{what} has TensorRT type {getattr(trt_type, 'name', trt_type)}, which torch "
                        f"{torch.__version__} cannot hold; export the graph with float, int or bool I/O")


def aligned(tensor: Tensor) -> Tensor:
    """``tensor`` contiguous and starting on a 256-byte boundary, copied only when it is not (a view into
    a larger batch, as torch.split makes, starts wherever its first row does)."""
    tensor = tensor.contiguous()
    if tensor.data_ptr() % ADDRESS_ALIGNMENT == 0:
        return tensor
    return empty_aligned(tensor.shape, tensor.dtype, tensor.device).copy_(tensor)


def empty_aligned(shape, dtype: torch.dtype, device) -> Tensor:
    """An uninitialised tensor starting on a 256-byte boundary, whatever alignment the allocator gives
    (torch's CUDA allocator gives 512 bytes, its CPU one 64): over-allocate and start at the first one."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    buffer = torch.empty(nbytes + ADDRESS_ALIGNMENT, dtype=torch.uint8, device=device)
    start = -buffer.data_ptr() % ADDRESS_ALIGNMENT
    return buffer[start:start + nbytes].view(dtype).view(tuple(shape))


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
        self._describe_io()
        self._stream = torch.cuda.Stream()  # TensorRT's own, on the current device: never the legacy default

    def _describe_io(self) -> None:
        """Names, torch dtypes and profile-0 shape ranges of the engine's I/O tensors."""
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == self._trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.dtypes = {n: torch_dtype(self._trt, self.engine.get_tensor_dtype(n), f"engine tensor {n!r}")
                       for n in names}
        self.profiles = {n: tuple(tuple(int(d) for d in shape) for shape in self.engine.get_tensor_profile_shape(n, 0))
                         for n in self.input_names}
        self.max_batch = min(shapes[2][0] for shapes in self.profiles.values())

    def bind(self, inputs: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[Tensor]]:
        """Set every input's shape and address and allocate the outputs on the inputs' device.

        Returns (outputs by name, the input tensors TensorRT reads, to keep alive until it has).
        """
        bound = []
        device = next(iter(inputs.values())).device
        for name in self.input_names:
            tensor = aligned(inputs[name].to(device=device, dtype=self.dtypes[name]))
            bound.append(tensor)
            shape = tuple(tensor.shape)
            if not self.context.set_input_shape(name, shape):
                low, _, high = self.profiles[name]
                raise TensorRTError(f"TensorRT refused input {name!r} of shape {list(shape)}: the engine's profile "
                                    f"takes {list(low)} to {list(high)} (a larger batch must be split)")
            self._set_address(name, tensor)
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = empty_aligned(shape, self.dtypes[name], device)
            self._set_address(name, outputs[name])
        return outputs, bound

    def _set_address(self, name: str, tensor: Tensor) -> None:
        if not self.context.set_tensor_address(name, tensor.data_ptr()):
            raise TensorRTError(f"TensorRT refused the address {tensor.data_ptr():#x} of tensor {name!r} "
                                f"({tensor.dtype} {list(tensor.shape)} on {tensor.device})")

    def run(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """CUDA tensors in (by input name), CUDA tensors out (by output name), ordered on torch's current
        stream: nothing here waits for the GPU, so reading the outputs on the host synchronises once."""
        caller = torch.cuda.current_stream()
        outputs, bound = self.bind({n: t.cuda() for n, t in inputs.items()})  # allocated on the caller's stream
        # TensorRT synchronises the device around the legacy default stream (handle 0): use our own then.
        stream = self._stream if caller.cuda_stream == 0 else caller
        if stream is not caller:
            stream.wait_stream(caller)  # inputs (and their copies) complete before TensorRT reads them
            for tensor in (*bound, *outputs.values()):
                tensor.record_stream(stream)  # the allocator keeps them until TensorRT is done with them
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise TensorRTError("TensorRT engine execution failed (see TensorRT's log above)")
        if stream is not caller:
            caller.wait_stream(stream)  # whatever the caller does next sees the outputs complete
        return outputs

    def logits_runner(self):
        """numpy batch in -> numpy ``logits`` out, the form parity uses; batches larger than the
        engine's profile are run in chunks of its largest batch."""
        (name,) = self.input_names

        def run(batch: np.ndarray) -> np.ndarray:
            tensor = torch.from_numpy(np.ascontiguousarray(batch))
            chunks = [self.run({name: part})["logits"].float().cpu() for part in torch.split(tensor, self.max_batch)]
            return torch.cat(chunks).numpy()

        return run
