"""The OpenVINO backend: an export's ONNX graphs compiled by OpenVINO Runtime for the CPU.

The graph is compiled from the bytes the manifest's hash check read (export.manifest.verified_bytes),
never from the file again, so a graph swapped after verification is not what runs. Each precision
is a graph of the export plus OpenVINO's INFERENCE_PRECISION_HINT (OPENVINO_PRECISIONS). On a CPU
with bf16 units (AMX, AVX512-BF16) the CPU plugin's default for an fp32 graph is bf16, so "fp32"
asks for f32 explicitly and "bf16" is its own precision, offered only where the CPU has those units.
"""
from __future__ import annotations

import functools
import os
import threading

import numpy as np
import torch
from torch import Tensor

from cnnbench.common.device import cpu_has_fast_bf16
from cnnbench.data.spec import PreprocessSpec
from cnnbench.export.manifest import artifact_entry, graph_crops, verified_bytes
from cnnbench.runtime.predictor import BackendError, Predictor

LOGITS = "logits"
CPU = "CPU"
# precision -> (the export graph it runs, INFERENCE_PRECISION_HINT; None: the plugin's default)
OPENVINO_PRECISIONS = {
    "fp32": ("fp32", "f32"),
    # The fp32 graph computed in bf16: no calibration, no second graph; judged by the fp16 gates.
    "bf16": ("fp32", "bf16"),
    # The fp16 graph's fp16 weights and casts, its arithmetic in f32 (CPUs without fp16 matrix units).
    "fp16": ("fp16", "f32"),
    # The QDQ graph: its quantised convolutions and matmuls run in int8 whatever the hint; the few
    # float operations between them (residual adds, pooling) keep the plugin's default, bf16 where
    # the CPU has bf16 units, which is the fast path the int8 top-1 gate then judges.
    "int8": ("int8", None),
}
_UNITS = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}  # OpenVINO's element types in this project's names


def openvino_problem(device: str = "cpu") -> str | None:
    """Why the OpenVINO backend cannot run on ``device`` here, or None when it can."""
    if device != "cpu":
        return f"the openvino backend runs on the CPU only (asked for {device}); use --device cpu"
    try:
        import openvino  # noqa: F401
    except ImportError as exc:
        return (f"openvino is not installed ({exc}); it is a dependency on x86-64 Linux: "
                "pip install 'openvino>=2025.1'")
    return None


def openvino_precisions() -> tuple[str, ...]:
    """The precisions the openvino backend offers on this CPU: bf16 only where it has bf16 units."""
    return tuple(p for p in OPENVINO_PRECISIONS if p != "bf16" or cpu_has_fast_bf16())


def graph_precision(precision: str) -> str:
    """The export graph (its precision) that the openvino backend runs for ``precision``."""
    if precision not in OPENVINO_PRECISIONS:
        raise BackendError(f"openvino backend precision must be one of {', '.join(OPENVINO_PRECISIONS)}, "
                           f"got {precision!r}")
    if precision not in openvino_precisions():
        raise BackendError("openvino bf16 needs a CPU with bf16 units (AMX or AVX512-BF16); this one has "
                           "neither, and OpenVINO would quietly compute in f32: use fp32 or int8")
    return OPENVINO_PRECISIONS[precision][0]


@functools.lru_cache(maxsize=1)
def _core():
    import openvino as ov

    return ov.Core()


def compile_config(precision: str, threads: int | None) -> dict:
    """The CPU plugin's properties for ``precision``: its precision hint, the THROUGHPUT hint (streams
    chosen by the plugin for the cores, see OpenVinoGraph.run) and, given, the inference threads
    (all streams together; default: the plugin's, one per physical core)."""
    config = {"PERFORMANCE_HINT": "THROUGHPUT"}
    hint = OPENVINO_PRECISIONS[precision][1]
    if hint is not None:
        config["INFERENCE_PRECISION_HINT"] = hint
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise BackendError(f"threads must be a positive integer, got {threads!r}")
        config["INFERENCE_NUM_THREADS"] = threads
    return config


class OpenVinoGraph:
    """One ONNX graph (its verified bytes) compiled for the CPU: numpy batch in, named outputs out."""

    def __init__(self, graph: bytes, *, label: str, precision: str, threads: int | None = None):
        problem = openvino_problem("cpu")
        if problem:
            raise BackendError(problem)
        config = compile_config(precision, threads)
        core = _core()
        try:
            model = core.read_model(graph)
            self.compiled = core.compile_model(model, CPU, config)
        except RuntimeError as exc:  # OpenVINO raises RuntimeError with its own trace as the message
            raise BackendError(f"{label}: OpenVINO cannot compile the graph: {_last_line(exc)}") from exc
        self.label = label
        self.precision = precision
        hint = config.get("INFERENCE_PRECISION_HINT")
        got = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if hint is not None and got != hint:
            raise BackendError(f"{label}: OpenVINO was asked for {hint} and compiled {got} "
                               f"(openvino {_version()}, this CPU); {precision} is not available here")
        self.inference_precision = got
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]
        requests = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self._requests = [self.compiled.create_infer_request() for _ in range(max(1, requests))]
        # One call at a time owns the requests (a server may call one predictor from several threads);
        # each call already spreads its rows over every stream, so waiting costs no idle cores.
        self._lock = threading.Lock()

    def run(self, batch: np.ndarray, outputs: tuple[str, ...] = (LOGITS,)) -> list[np.ndarray]:
        """The ``outputs`` of one batch, its rows split over the streams' requests, run at once.

        Why streams: the plugin's THROUGHPUT hint gives each stream its own threads, so the parts of
        a batch run side by side and no thread waits for another at every layer. One request on all
        the threads (LATENCY hint) waits at each layer for the slowest thread, which on a machine
        whose cores other processes share is often descheduled. Once, ResNet26 fp32 at 224 px, 80
        crops a call, 2-core EPYC: best of 4 calls 2.73 s with two streams against 3.83 s with one
        request (medians equal under a load average of 3 to 10: a sanity check, not a benchmark).
        A batch with fewer rows than streams uses fewer requests (and so fewer threads).
        """
        missing = [n for n in outputs if n not in self.output_names]
        if missing:
            raise BackendError(f"{self.label}: graph has no output {missing} (outputs: {self.output_names})")
        batch = np.ascontiguousarray(batch)
        parts = np.array_split(batch, max(1, min(len(self._requests), len(batch))))
        results = []
        with self._lock:
            for request, part in zip(self._requests, parts):
                request.start_async({0: part}, share_inputs=True)  # ``parts`` keeps each input alive until wait()
            for request in self._requests[:len(parts)]:
                request.wait()
                # Copies: a request reuses its output buffers on its next call.
                results.append([request.get_tensor(name).data.copy() for name in outputs])
        return [np.concatenate([r[i] for r in results]) for i in range(len(outputs))]

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """numpy batch in -> its ``logits`` (export.parity's run_exported)."""
        return self.run(batch)[0]


def graph_for(manifest: dict, precision: str, threads: int | None = None) -> OpenVinoGraph:
    """The export's graph for ``precision`` (OPENVINO_PRECISIONS), compiled from its verified bytes."""
    graph = graph_precision(precision)
    data = verified_bytes(manifest, graph, "onnx")  # what compiles is exactly what the hash check read
    label = os.path.join(manifest["export_dir"], artifact_entry(manifest, graph, "onnx")["file"])
    return OpenVinoGraph(data, label=label, precision=precision, threads=threads)


class OpenVinoPredictor(Predictor):
    backend = "openvino"

    def __init__(self, manifest: dict, *, source: str, device: str, precision: str, threads: int | None = None):
        problem = openvino_problem(device)
        if problem:
            raise BackendError(problem)
        super().__init__(source=source, spec=PreprocessSpec.from_dict(manifest["spec"]), classes=manifest["classes"],
                         device=device, precision=precision, graph_crops=graph_crops(manifest))
        self.manifest = manifest
        self.graph = graph_for(manifest, precision, threads)
        self.artifact = self.graph.label
        if LOGITS not in self.graph.output_names:
            raise BackendError(f"{self.artifact}: graph has no '{LOGITS}' output (outputs: {self.graph.output_names})")

    @property
    def units_precision(self) -> str:
        """What the plugin computes in: f32 for the fp32 and fp16 graphs, bf16, and int8 for the QDQ graph."""
        if self.precision == "int8":
            return "int8"
        return _UNITS[self.graph.inference_precision]

    def _forward_crops(self, crops: Tensor) -> Tensor:
        return self._run(crops)

    def _forward_images(self, images: Tensor) -> Tensor:
        return self._run(images)

    def _run(self, x: Tensor) -> Tensor:
        return torch.from_numpy(self.graph.logits(x.contiguous().numpy()))


def _last_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _version() -> str:
    import openvino

    return openvino.__version__
