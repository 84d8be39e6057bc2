"""Static int8 quantisation of an exported fp32 graph: QDQ format, per-channel weights, calibrated on
training images.

The int8 graph is made from the verified fp32 ONNX graph with ONNX Runtime's quantiser:
``quant_pre_process`` (shape inference, constant folding and operator fusion) and then
``quantize_static`` in QDQ format, where every quantised tensor is a QuantizeLinear/DequantizeLinear
pair around the float operator. ONNX Runtime's CPU provider fuses the pairs into integer kernels
(QLinearConv with VNNI dot products on x86), and TensorRT builds int8 engines from the same QDQ graph,
but the two want different activation types (below).

Choices, and why:
- weights int8, symmetric, one scale per output channel (Conv): what ONNX Runtime and TensorRT both
  run natively, and far more accurate than one scale per tensor for BN-folded convolutions;
- activations: the two backends want different ones, so ``activations`` picks:
  "uint8" (asymmetric, zero point where the data's minimum is) for ONNX Runtime: with int8
  activations its x86 CPU provider turned only 17 of ResNet26's 29 convolutions into integer kernels
  (those reading a residual sum or the max-pool output, and every residual Add, stayed in float
  between Dequantize/Quantize pairs); with uint8 all 29 and every Add run as integer kernels, about
  3x faster here. Asymmetric ranges also let the quantiser drop each ReLU into the Quantize after it.
  "int8-symmetric" (zero point 0) for TensorRT, which accepts nothing else; the export builds
  TensorRT's int8 engine from such a sibling graph, calibrated on the same images;
- biases: ONNX Runtime's quantiser stores each Conv bias as int32 behind a DequantizeLinear by default,
  which its integer kernels take; TensorRT's parser dequantises only INT8/FP8/INT4, so the TensorRT
  sibling keeps its biases in float (TensorRT folds them into its int8 convolutions itself). The
  sibling is checked against TensorRT's parser rules (export/trt_support.py) before any build;
- calibration ranges are min/max over the TRAINING images of the checkpoint's split, cut exactly as
  at inference (ten normalised crops per image, or the resized uint8 image for an in-graph ten-crop
  graph). The test images are never seen: they are what the parity gate and the bench score on;
- the graph's preprocessing prefix (in-graph normalisation and crop slicing) and the classifier head
  (global average pooling, every Gemm/MatMul and what follows them: ten-crop mean, ensemble logit
  sum) stay in fp32: the head costs nothing next to the convolutions, and 8-bit pooled features or
  logits would only cost agreement.
"""
from __future__ import annotations

import os
import tempfile
from collections import defaultdict

import numpy as np
import onnx
import torch
from torch import Tensor

from cnnbench.common import atomic_write
from cnnbench.common.errors import UserError
from cnnbench.data.heldout import FROM_RUN, held_out
from cnnbench.data.spec import PreprocessSpec
from cnnbench.export.errors import ExportError
from cnnbench.export.fp16 import preprocessing_nodes
from cnnbench.export.inputs import graph_inputs
from cnnbench.export.onnx_export import check_graph
from cnnbench.models.checkpoint import recorded_split_files

CALIBRATION_IMAGES = 64
CALIBRATION_CROPS = 32          # crops per calibration call (an in-graph ten-crop input is ten of them)
HEAD_OPS = ("GlobalAveragePool", "Gemm", "MatMul")
ACTIVATIONS = ("uint8", "int8-symmetric")  # for ONNX Runtime, for TensorRT (see above)


def calibration_samples(meta: dict, data=None, count: int = CALIBRATION_IMAGES) -> tuple[list, dict]:
    """Up to ``count`` training images, spread evenly over the classes, of the split the parity check
    holds out (data.heldout: ``data``'s seed-0 split, else the checkpoint's saved one), so calibration
    never sees a held-out image. Returns (samples, origin).
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ExportError(f"calibration needs a positive number of images, got {count!r}")
    try:
        held = held_out(data, recorded_split_files(meta.get("record")), owner="the checkpoint")
        samples = held.samples("train", count)
    except UserError as exc:
        raise ExportError(f"int8 calibration needs the checkpoint's training images: {exc}") from exc
    source = "train split" if held.source == FROM_RUN else "train part of the seed-0 split"
    return samples, {"source": source, "path": held.path}


def calibration_inputs(samples, spec: PreprocessSpec, ten_crop_in_graph: bool) -> tuple[Tensor, list]:
    """What the graph takes for each readable sample: its ten normalised crops (10 rows per image), or
    the resized uint8 image for an in-graph ten-crop graph. Unreadable images are listed."""
    return graph_inputs(samples, spec, ten_crop_in_graph, crops=10, purpose="calibration")


class _Batches:
    """onnxruntime.quantization.CalibrationDataReader over a tensor, ``batch`` rows at a time."""

    def __init__(self, input_name: str, inputs: Tensor, batch: int):
        self._feeds = [{input_name: np.ascontiguousarray(part.numpy())} for part in torch.split(inputs, batch)]
        self._next = 0

    def get_next(self):
        if self._next >= len(self._feeds):
            return None
        self._next += 1
        return self._feeds[self._next - 1]

    def rewind(self):
        self._next = 0


def fp32_nodes(graph: onnx.GraphProto) -> list[str]:
    """Names of the nodes kept in fp32: the preprocessing prefix and the head (HEAD_OPS and downstream)."""
    constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    keep = set(preprocessing_nodes(graph, constants))
    downstream = set()
    for index, node in enumerate(graph.node):  # nodes are in topological order
        if node.op_type in HEAD_OPS or any(name in downstream for name in node.input):
            keep.add(index)
            downstream.update(node.output)
    unnamed = [graph.node[i].op_type for i in keep if not graph.node[i].name]
    if unnamed:
        raise ExportError(f"cannot keep unnamed {unnamed[0]} node(s) in fp32: the quantiser selects nodes by name")
    return sorted(graph.node[i].name for i in keep)


def quantize_int8(fp32_path, out_path, calibration: Tensor, *, io: dict,
                  activations: str = "uint8") -> dict:
    """Write the static int8 QDQ graph of the fp32 graph at ``fp32_path`` to ``out_path`` (atomically).

    ``calibration`` holds the graph's inputs (see calibration_inputs); ``io`` is the fp32 graph's io
    spec, which the int8 graph keeps (float32/uint8 in, float32 logits out). Returns the settings
    for the manifest.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if activations not in ACTIVATIONS:
        raise ExportError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    out_path = os.fspath(out_path)
    folder = os.path.dirname(os.path.abspath(out_path))
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=folder) as tmp:
        prepared = os.path.join(tmp, "prepared.onnx")
        quantized = os.path.join(tmp, "quantized.onnx")
        try:
            quant_pre_process(os.fspath(fp32_path), prepared, skip_symbolic_shape=True)
        except Exception as exc:  # the pre-processor raises whatever its passes raise
            raise ExportError(f"{fp32_path}: ONNX Runtime's quantisation pre-processing failed: {exc}") from exc
        excluded = fp32_nodes(onnx.load(prepared).graph)
        # Every calibration call holds all activations of its crops at once: bound the crops, not the inputs.
        rows = max(1, CALIBRATION_CROPS // io["crops_per_image"])
        reader = _Batches(io["inputs"][0]["name"], calibration, rows)
        quantize_static(
            prepared, quantized, reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={
                "ActivationSymmetric": activations == "int8-symmetric",
                "WeightSymmetric": True,
                "QuantizeBias": activations == "uint8",
            },
        )
        proto = onnx.load(quantized)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{out_path}: quantised graph fails onnx.checker: {exc}") from exc
    check_graph(proto, io, "int8", out_path)
    summary = qdq_summary(proto)
    if not summary["quantized_convs"]:
        raise ExportError(f"{out_path}: the quantiser left every convolution in fp32")
    atomic_write(out_path, proto.SerializeToString())
    return {"weights": "int8 symmetric, per output channel", "activations": activations,
            "bias": "int32 (dequantised)" if activations == "uint8" else "float",
            "calibration_method": "minmax", "fp32_nodes": excluded, **summary}


def qdq_summary(proto: onnx.ModelProto) -> dict:
    """Counts of quantise/dequantise nodes and of convolutions fed int8 per-channel weights."""
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    counts = defaultdict(int)
    for node in graph.node:
        counts[node.op_type] += 1
    quantized, per_channel = 0, 0
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        weight_source = producers.get(node.input[1])
        if weight_source is None or weight_source.op_type != "DequantizeLinear":
            continue
        weight = initializers.get(weight_source.input[0])
        if weight is None or weight.data_type != onnx.TensorProto.INT8:
            continue
        quantized += 1
        scale = initializers.get(weight_source.input[1])
        if scale is not None and len(scale.dims) == 1 and scale.dims[0] == weight.dims[0] > 1:
            per_channel += 1
    return {"quantize_nodes": counts["QuantizeLinear"], "dequantize_nodes": counts["DequantizeLinear"],
            "convs": counts["Conv"], "quantized_convs": quantized, "per_channel_convs": per_channel}
