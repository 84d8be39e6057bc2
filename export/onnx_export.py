"""ONNX export of a classifier or an ensemble: per-crop or in-graph ten-crop, fp32 or fp16.

Graph contract (runtime/ and gradcam/ depend on it; the returned ``io`` goes into the manifest):
- crops outside the graph: input ``input`` float32 [N, 3, crop, crop] normalised, output ``logits``
  float32 [N, K]; with ``cam_output`` also ``features`` float32 [N, C, h, w] (the map entering global
  pooling), one ``features_<i>`` per member for an ensemble.
- ten crops in the graph (``ten_crop="graph"``): input ``images`` uint8 [B, 3, resize, resize]; the
  graph normalises, cuts the ten crops (models.TenCropModel, i.e. data.crops.TEN) and averages the
  crops' logits: ``logits`` float32 [B, K]; with ``cam_output`` features are [B, 10, C, h, w].
- dense ten crops in the graph (``ten_crop="dense"``): the same input and logits; the graph runs the
  trunk on the image and its mirror and reads the crops off the feature map (models.DenseTenCropModel);
  with ``cam_output`` features are the full-image maps [B, 2, C, h, w] (image, mirror).
- fp16: weights and arithmetic in fp16, but inputs and outputs keep the types above (casts inside
  the graph), so every consumer feeds and reads the same thing whatever the precision.

fp16 graphs are made from the traced fp32 graph by ``convert_to_fp16`` rather than by tracing
``model.half()``: that works on torch 2.14's CPU too, but runs the trace through CPU fp16 kernels
(an fp16 forward of xception_medium at 224 px took 8x its fp32 time here, and older torch CPUs lack
some fp16 kernels). Converting the graph also folds BatchNorm into the convolutions in fp32 and
rounds the folded weights once, and makes the fp16 graph the very graph that was verified in fp32.

Exporter: ``torch.onnx.export(..., dynamo=False)``, the TorchScript exporter, passed explicitly. It is
the mature path on every supported torch (2.6 through 2.14), it exports in well under a second where
the dynamo exporter takes seconds (the test suite exports dozens of graphs), and the dynamo path has
shipped silently wrong graphs (pytorch/pytorch#169178, a ResNet18 scoring 0 %; #166797, a wrong Conv
bias). Whatever the exporter, parity against the PyTorch model is what proves a graph correct.
"""
from __future__ import annotations

import copy
import os
import tempfile
import warnings

import onnx
import torch
from torch import Tensor, nn

from cnnbench.common import atomic_write
from cnnbench.data.crops import TEN, TEN_CROP_PLACES
from cnnbench.data.spec import PreprocessSpec
from cnnbench.export.errors import ExportError
from cnnbench.export.fp16 import convert_to_fp16
from cnnbench.models.dense import DEFAULT_CENTRE, DenseTenCropModel
from cnnbench.models.ensemble import Ensemble
from cnnbench.models.tencrop import TenCropModel

EXPORTER = "torch.onnx.export(dynamo=False)"
DEFAULT_OPSET = 17  # read by TensorRT 10+, ONNX Runtime >= 1.14 and the exporter of torch >= 2.6
BATCH = "batch"  # the symbolic name of the dynamic batch axis in every graph and in manifest["io"]
PRECISIONS = ("fp32", "fp16")
# Weights stored directly as initializers. In an int8 graph the quantised ones reach their operator
# through DequantizeLinear; only the fp32 head (classifier) keeps float weights of its own.
_WEIGHT_TYPES = {"fp32": onnx.TensorProto.FLOAT, "fp16": onnx.TensorProto.FLOAT16, "int8": onnx.TensorProto.FLOAT}
_DTYPE_NAMES = {torch.float32: "float32", torch.uint8: "uint8"}
_ONNX_TYPES = {"float32": onnx.TensorProto.FLOAT, "uint8": onnx.TensorProto.UINT8}
_WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")


class ExportGraph(nn.Module):
    """What an exported graph computes, with the contract's inputs and outputs.

    ``model`` is a classifier or an Ensemble, fp32, in eval mode.
    """

    def __init__(self, model: nn.Module, spec: PreprocessSpec, *, ten_crop: str, cam_output: bool,
                 dense_centre: str = DEFAULT_CENTRE):
        super().__init__()
        self.net = (images_model(model, spec, ten_crop, return_features=cam_output, centre=dense_centre)
                    if ten_crop != "host" else model)
        self.ten_crop_in_graph = ten_crop != "host"
        self.cam_output = cam_output

    def forward(self, x: Tensor):
        if self.ten_crop_in_graph:
            out = self.net(x)
            logits, features = out if self.cam_output else (out, None)
        else:
            features = self.net.forward_features(x)
            logits = self.net.forward_head(features)
        if not self.cam_output:
            return logits
        return (logits, *(features if isinstance(features, (list, tuple)) else [features]))


def images_model(model: nn.Module, spec: PreprocessSpec, ten_crop: str, return_features: bool = False,
                 centre: str = DEFAULT_CENTRE) -> nn.Module:
    """The module an images-in graph computes (and its PyTorch fp32 reference): exact or dense ten crops
    (``centre``: how dense ten crops handle the centre crop, models.dense.CENTRE_MODES)."""
    if ten_crop == "dense":
        return DenseTenCropModel(model, spec, centre=centre, return_features=return_features)
    return TenCropModel(model, spec, return_features=return_features)


def check_ten_crop(ten_crop: str) -> None:
    if ten_crop not in TEN_CROP_PLACES:
        raise ExportError(f"ten_crop must be one of {', '.join(TEN_CROP_PLACES)}, got {ten_crop!r}")


def input_name(ten_crop: str) -> str:
    return "input" if ten_crop == "host" else "images"


def output_names(cam_output: bool, ensemble_members: int | None = None) -> list[str]:
    """``logits``, then ``features`` (single model) or ``features_0..`` (one per ensemble member)."""
    if not cam_output:
        return ["logits"]
    if ensemble_members is None:
        return ["logits", "features"]
    return ["logits"] + [f"features_{i}" for i in range(ensemble_members)]


def example_input(spec: PreprocessSpec, ten_crop: str, batch: int = 2) -> Tensor:
    """A traced example; batch 2 so that no size-1 special case can be baked into the graph."""
    generator = torch.Generator().manual_seed(0)
    if ten_crop != "host":
        return torch.randint(0, 256, (batch, 3, spec.resize, spec.resize), dtype=torch.uint8, generator=generator)
    return torch.randn(batch, 3, spec.crop, spec.crop, generator=generator)


def export_onnx(model: nn.Module, path, *, spec: PreprocessSpec, precision: str = "fp32",
                ten_crop: str = "host", cam_output: bool = False, opset: int | None = None,
                dense_centre: str = DEFAULT_CENTRE) -> dict:
    """Export ``model`` (a classifier or an Ensemble) to ``path`` atomically; returns the graph's io spec.

    The graph is checked with ``onnx.checker`` (full check, with shape inference), its inputs and
    outputs against the contract, its weights' precision, and the absence of training-mode
    BatchNormalization. The caller's model is not modified (the trace works on a copy).
    Returns ``{"file", "precision", "opset", "exporter", "io"}``.
    """
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    check_ten_crop(ten_crop)
    opset = DEFAULT_OPSET if opset is None else int(opset)
    path = os.fspath(path)
    net = copy.deepcopy(model).eval().to(device="cpu", dtype=torch.float32)
    graph = ExportGraph(net, spec, ten_crop=ten_crop, cam_output=cam_output, dense_centre=dense_centre).eval()
    example = example_input(spec, ten_crop)
    with torch.no_grad():
        outputs = graph(example)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    names_out = output_names(cam_output, len(model.members) if isinstance(model, Ensemble) else None)
    if len(names_out) != len(outputs):
        raise ExportError(f"{path}: the model produced {len(outputs)} outputs, expected {names_out}")
    io = {
        "inputs": [_tensor_spec(input_name(ten_crop), example)],
        "outputs": [_tensor_spec(name, value) for name, value in zip(names_out, outputs)],
        "layout": "NCHW",
        "crops_per_image": 1 if ten_crop == "host" else TEN.count,
    }
    proto = _trace_to_onnx(graph, example, io, opset, path)
    if precision == "fp16":
        proto = convert_to_fp16(proto)
    _stamp_io_shapes(proto, io)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path}: exported graph fails onnx.checker: {exc}") from exc
    check_graph(proto, io, precision, path)
    atomic_write(path, lambda tmp: onnx.save(proto, tmp))
    return {"file": os.path.basename(path), "precision": precision, "opset": graph_opset(proto),
            "exporter": EXPORTER, "io": io}


def _tensor_spec(name: str, value: Tensor) -> dict:
    if value.dtype not in _DTYPE_NAMES:
        raise ExportError(f"graph tensor {name!r} has dtype {value.dtype}; the contract allows float32 and uint8")
    return {"name": name, "dtype": _DTYPE_NAMES[value.dtype], "shape": [BATCH, *value.shape[1:]]}


def _trace_to_onnx(graph: nn.Module, example: Tensor, io: dict, opset: int, path: str) -> onnx.ModelProto:
    names_in = [t["name"] for t in io["inputs"]]
    names_out = [t["name"] for t in io["outputs"]]
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=folder) as tmp:
        raw = os.path.join(tmp, "graph.onnx")
        with warnings.catch_warnings():
            # The TorchScript exporter announces its own deprecation, and the tracer warns about
            # shape checks on H/W; those are static by contract (only the batch axis is dynamic),
            # and parity runs other batch sizes than the traced one.
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(
                graph, (example,), raw,
                dynamo=False,
                opset_version=opset,
                input_names=names_in,
                output_names=names_out,
                dynamic_axes={name: {0: BATCH} for name in names_in + names_out},
                do_constant_folding=True,
            )
        return onnx.load(raw)


def _stamp_io_shapes(proto: onnx.ModelProto, io: dict) -> None:
    """Write the contract's shapes (symbolic batch, static rest) onto the graph's inputs and outputs.

    The exporter leaves generated names on some output axes; stamping them makes every graph
    self-describing and lets the checker's shape inference confirm them.
    """
    declared = {t["name"]: t for t in io["inputs"] + io["outputs"]}
    for value in list(proto.graph.input) + list(proto.graph.output):
        if value.name not in declared:
            continue
        dims = value.type.tensor_type.shape.dim
        shape = declared[value.name]["shape"]
        if len(dims) != len(shape):
            raise ExportError(f"graph tensor {value.name!r} has rank {len(dims)}, expected shape {shape}")
        for dim, size in zip(dims, shape):
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size


def check_graph(proto: onnx.ModelProto, io: dict, precision: str, path: str) -> None:
    """Contract checks on an exported graph; ExportError naming ``path`` and the first violation."""
    _check_io(proto.graph.input, io["inputs"], "input", path)
    _check_io(proto.graph.output, io["outputs"], "output", path)
    for node in proto.graph.node:
        if node.op_type == "BatchNormalization":
            training = any(a.name == "training_mode" and a.i == 1 for a in node.attribute)
            if training or len(node.output) > 1:
                raise ExportError(f"{path}: BatchNormalization {node.name!r} is in training mode in the graph")
    expected = _WEIGHT_TYPES[precision]
    initializers = {t.name: t.data_type for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type not in _WEIGHTED_OPS:
            continue
        for name in node.input[1:2]:
            if name in initializers and initializers[name] != expected:
                found = onnx.TensorProto.DataType.Name(initializers[name])
                raise ExportError(f"{path}: {node.op_type} {node.name!r} has {found} weights in a {precision} graph")


def _check_io(values, declared: list[dict], kind: str, path: str) -> None:
    found = [(v.name, v.type.tensor_type.elem_type) for v in values]
    wanted = [(t["name"], _ONNX_TYPES[t["dtype"]]) for t in declared]
    if found != wanted:
        raise ExportError(f"{path}: graph {kind}s are {_describe(found)}, the contract says {_describe(wanted)}")


def _describe(pairs) -> str:
    return ", ".join(f"{name}:{onnx.TensorProto.DataType.Name(t)}" for name, t in pairs) or "none"


def graph_opset(proto: onnx.ModelProto) -> int:
    """The default-domain opset the graph was written with."""
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ExportError("graph declares no default-domain opset")
