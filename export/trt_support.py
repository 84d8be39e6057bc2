"""A static check of an ONNX graph against what TensorRT's ONNX parser accepts, runnable without TensorRT.

The rules are those onnx-tensorrt documents for TensorRT 10 (docs/operators.md, the 10.x table;
TensorRT 11 keeps them) plus the parser's Q/DQ rules (onnxOpImporters.cpp, QuantDequantLinearHelper):
- only default-domain operators of the table, opset 9..20;
- each operator's data inputs in the types the table lists for it (DequantizeLinear: INT8, FP8 or
  INT4 only, so ONNX Runtime's int32 bias DequantizeLinear is rejected; QuantizeLinear: FP32, FP16, BF16);
- Q/DQ zero points all zero (symmetric quantisation only), constant scales all positive;
- UINT8 only as a network input or output (a Q/DQ zero point of type UINT8 is tolerated: the parser
  warns and uses INT8);
- the attribute/constant-input restrictions the table states for the operators listed in _RESTRICTIONS.
It names every node TensorRT would reject; an empty list means the graph passes these rules (TensorRT
may still fail later, e.g. for want of GPU memory, which only a real build shows).
"""
from __future__ import annotations

import os

import onnx
from onnx import TensorProto, numpy_helper

from cnnbench.export.errors import ExportError

OPSET_RANGE = (9, 20)
_F = ("FP32", "FP16", "BF16")
_NUMERIC = _F + ("INT32", "INT64")
_SHAPE_LIKE = _NUMERIC + ("BOOL",)
# Operator -> the types its data inputs may have (onnx-tensorrt docs/operators.md, TensorRT 10).
SUPPORTED_TYPES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys((
        "Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less LessOrEqual Max Min Mod Mul "
        "Neg Pad Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd "
        "ReduceSum ReduceSumSquare Relu Scatter ScatterElements ScatterND Shrink Sign SpaceToDepth Sub Sum TopK"
    ).split(), _NUMERIC),
    **dict.fromkeys((
        "Acos Acosh Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Clip Conv ConvTranspose Cos Cosh "
        "CumSum Dropout Einsum Elu Erf Exp Floor GRU Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool "
        "GroupNormalization HardSigmoid HardSwish Hardmax ImageScaler InstanceNormalization IsInf LRN LSTM "
        "LayerNormalization LeakyRelu Log LogSoftmax LpNormalization LpPool MatMul MaxPool "
        "MeanVarianceNormalization PRelu ParametricSoftplus Pow QuantizeLinear RNN RandomNormal RandomNormalLike "
        "RandomUniform RandomUniformLike Reciprocal Resize Round ScaledTanh Scan Selu Sigmoid Sin Sinh Softmax "
        "Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Upsample"
    ).split(), _F),
    **dict.fromkeys("And Not Or Xor".split(), ("BOOL",)),
    **dict.fromkeys("Cast CastLike".split(), _SHAPE_LIKE + ("UINT8",)),
    **dict.fromkeys((
        "Concat Constant ConstantOfShape Expand EyeLike Flatten Gather GatherElements GatherND Identity If Loop "
        "OneHot Reshape ReverseSequence Shape Size Slice Split Squeeze Tile Transpose Trilu Unsqueeze Where"
    ).split(), _SHAPE_LIKE),
    **dict.fromkeys("DeformConv GridSample Mish NonMaxSuppression NonZero RoiAlign".split(), ("FP32", "FP16")),
    "DequantizeLinear": ("INT8", "FP8", "INT4"),
    "Gelu": _NUMERIC + ("INT8",),
    "Mean": _NUMERIC + ("FP8",),
}
# Operators all of whose inputs are data (elementwise and variadic); the others are checked on input 0.
_ALL_INPUTS_ARE_DATA = frozenset(
    "Add Sub Mul Div Pow Max Min Sum Mean Equal Greater GreaterOrEqual Less LessOrEqual And Or Xor Concat".split())
# Inputs that must be constant (an initializer or a Constant node's output): operator -> input index.
_CONSTANT_INPUTS = {"Slice": 3, "Squeeze": 1, "Unsqueeze": 1, "ReduceMean": 1, "ReduceSum": 1, "Pad": 3}
_ONNX_TO_TRT = {TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
                TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.INT8: "INT8",
                TensorProto.UINT8: "UINT8", TensorProto.BOOL: "BOOL", TensorProto.DOUBLE: "DOUBLE",
                TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.INT4: "INT4"}
_RESIZE_MODES = ("nearest", "linear")
_RESIZE_COORDINATES = ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners")


class TensorRTSupportError(ExportError):
    """A graph has nodes TensorRT's ONNX parser rejects; ``findings`` names each."""

    def __init__(self, message: str, findings: list[str]):
        super().__init__(message)
        self.findings = findings


def _type_name(elem_type: int) -> str:
    return _ONNX_TO_TRT.get(elem_type, TensorProto.DataType.Name(elem_type))


def _graph_facts(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, object]]:
    """(element type of every tensor whose type is known, constant tensor name -> numpy value)."""
    try:
        graph = onnx.shape_inference.infer_shapes(model).graph
    except onnx.shape_inference.InferenceError:  # e.g. a custom-domain node: judge the declared types only
        graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*graph.value_info, *graph.input, *graph.output) if v.type.HasField("tensor_type")}
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    types.update({t.name: t.data_type for t in graph.initializer})
    for node in graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if value is not None:
            constants[node.output[0]] = numpy_helper.to_array(value)
            types[node.output[0]] = value.data_type
    return types, constants


def _attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _node_findings(node, types: dict, constants: dict, network_io: set[str]) -> list[str]:
    """Why TensorRT rejects ``node`` (empty: it accepts it)."""
    op = node.op_type
    problems = []
    if op not in SUPPORTED_TYPES:
        return [f"operator {op} is not in TensorRT's supported-operator table"]
    data = [i for i in (node.input if op in _ALL_INPUTS_ARE_DATA else node.input[:1]) if i]
    for name in data:
        if name in types and _type_name(types[name]) not in SUPPORTED_TYPES[op]:
            problems.append(f"input {name!r} is {_type_name(types[name])}; TensorRT's {op} takes "
                            f"{'/'.join(SUPPORTED_TYPES[op])}")
    if op in ("QuantizeLinear", "DequantizeLinear"):
        problems += _qdq_findings(node, constants)
    if op == "Cast":
        target = _type_name(_attribute(node, "to", 0))
        if target not in SUPPORTED_TYPES["Cast"]:
            problems.append(f"casts to {target}, which TensorRT's Cast does not produce")
    index = _CONSTANT_INPUTS.get(op)
    if index is not None and len(node.input) > index and node.input[index] and node.input[index] not in constants:
        problems.append(f"input {node.input[index]!r} (axes) must be an initializer or a Constant for TensorRT")
    if op in ("MaxPool", "AveragePool"):
        if any(d != 1 for d in _attribute(node, "dilations", [])):
            problems.append("dilations other than 1 are not supported by TensorRT's pooling")
        if op == "MaxPool" and len([o for o in node.output if o]) > 1:
            problems.append("TensorRT's MaxPool has no Indices output")
    if op == "Resize":
        if _attribute(node, "antialias", 0):
            problems.append("TensorRT's Resize does not antialias")
        if _text(_attribute(node, "mode", "nearest")) not in _RESIZE_MODES:
            problems.append(f"Resize mode {_text(_attribute(node, 'mode'))!r} is not nearest/linear")
        if _text(_attribute(node, "coordinate_transformation_mode", "half_pixel")) not in _RESIZE_COORDINATES:
            problems.append("unsupported Resize coordinate_transformation_mode "
                            f"{_text(_attribute(node, 'coordinate_transformation_mode'))!r}")
    if op == "TopK" and _attribute(node, "sorted", 1) != 1:
        problems.append("TensorRT's TopK needs sorted=1")
    if op == "Constant" and any(a.name in ("sparse_value", "value_string", "value_strings") for a in node.attribute):
        problems.append("sparse and string Constants are not supported by TensorRT")
    for out in node.output:
        if out and out not in network_io and types.get(out) == TensorProto.UINT8:
            problems.append(f"output {out!r} is UINT8, which TensorRT allows only as a network input or output")
    return problems


def _qdq_findings(node, constants: dict) -> list[str]:
    problems = []
    scale = constants.get(node.input[1]) if len(node.input) > 1 else None
    if scale is not None and not (scale > 0).all():
        problems.append(f"scale {node.input[1]!r} has non-positive values; TensorRT needs them all positive")
    if len(node.input) > 2 and node.input[2]:
        zero_point = constants.get(node.input[2])
        if zero_point is not None and zero_point.astype("float64").any():
            problems.append(f"zero point {node.input[2]!r} is not all zero; TensorRT quantises symmetrically only")
    return problems


def tensorrt_findings(model) -> list[str]:
    """One line per node (and graph-level problem) TensorRT 10/11's ONNX parser would reject."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model))
    findings = []
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and not OPSET_RANGE[0] <= entry.version <= OPSET_RANGE[1]:
            findings.append(f"opset {entry.version} is outside the {OPSET_RANGE[0]}..{OPSET_RANGE[1]} "
                            "TensorRT's ONNX parser documents")
    graph = model.graph
    types, constants = _graph_facts(model)
    network_io = {v.name for v in (*graph.input, *graph.output)}
    for index, node in enumerate(graph.node):
        where = f"node {node.name or index} ({node.op_type})"
        if node.domain not in ("", "ai.onnx"):
            findings.append(f"{where}: custom domain {node.domain!r}: TensorRT has no importer for it")
            continue
        findings += [f"{where}: {problem}" for problem in _node_findings(node, types, constants, network_io)]
    return findings


def check_tensorrt_support(path, *, strict: bool, label: str | None = None) -> list[str]:
    """Check the graph at ``path``; raise TensorRTSupportError when ``strict`` and it has findings.

    Not strict: returns the findings (the caller warns). ``label`` names the graph in the message.
    """
    findings = tensorrt_findings(path)
    if findings and strict:
        shown = "; ".join(findings[:5]) + (f"; and {len(findings) - 5} more" if len(findings) > 5 else "")
        raise TensorRTSupportError(f"{label or os.fspath(path)}: TensorRT's ONNX parser would reject "
                                   f"{len(findings)} node(s): {shown}", findings)
    return findings
