"""fp32 ONNX graph -> fp16 graph (weights and arithmetic), keeping the graph's input/output types.

The network runs in float16: its initializers, constant attributes and casts to float become
float16. The preprocessing prefix stays float32, as in PyTorch's TenCropModel (normalise in fp32,
cast the crops): every node before the first weighted op (Conv/Gemm/MatMul) that computes only from
graph inputs and constants, i.e. the in-graph normalisation and ten-crop slicing. A Cast to float16
sits where float32 tensors enter the network, and a Cast back to float32 before each float output,
so callers feed and read exactly what they did before. Written for the feed-forward graphs this
project exports (no subgraphs); the result is type-checked by ONNX shape inference.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from cnnbench.export.errors import ExportError

FP16_MAX = float(np.finfo(np.float16).max)
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
_SUFFIX = "__fp16"


def _half_tensor(tensor: TensorProto, where: str) -> TensorProto:
    values = numpy_helper.to_array(tensor)
    too_large = np.abs(values) > FP16_MAX
    if np.any(too_large):
        raise ExportError(f"{where}: {int(too_large.sum())} value(s) exceed the fp16 range "
                          f"(max |x| = {float(np.abs(values).max()):.3g} > {FP16_MAX:g}); cannot export in fp16")
    return numpy_helper.from_array(values.astype(np.float16), tensor.name)


def _half_attributes(node: onnx.NodeProto) -> None:
    for attr in node.attribute:
        if attr.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
            raise ExportError(f"fp16 conversion does not handle subgraphs ({node.op_type} {node.name!r})")
        if attr.type == AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
            attr.t.CopyFrom(_half_tensor(attr.t, f"{node.op_type} {node.name!r}"))
        elif attr.type == AttributeProto.INT and attr.name in ("to", "dtype") and attr.i == TensorProto.FLOAT:
            attr.i = TensorProto.FLOAT16


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    values = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def preprocessing_nodes(graph: onnx.GraphProto, constants: set[str]) -> set[int]:
    """Indices of the nodes computing, before any weighted op, only from graph inputs and constants."""
    region = {v.name for v in graph.input}
    prefix = set()
    for index, node in enumerate(graph.node):
        if node.op_type in WEIGHTED_OPS or node.op_type == "Constant":
            continue
        data = [name for name in node.input if name and name not in constants]
        if data and all(name in region for name in data):
            prefix.add(index)
            region.update(node.output)
    return prefix


def convert_to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of ``proto``; graph inputs, outputs and the preprocessing prefix keep their types."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    types = _elem_types(model)
    initializers = {t.name: t for t in graph.initializer}
    constant_nodes = {out: node for node in graph.node if node.op_type == "Constant" for out in node.output}
    prefix = preprocessing_nodes(graph, set(initializers) | set(constant_nodes))

    consumers = defaultdict(list)  # tensor -> indices of the network (non-prefix) nodes reading it
    prefix_reads = set()
    fp32_region = {v.name for v in graph.input}
    for index, node in enumerate(graph.node):
        if index in prefix:
            prefix_reads.update(node.input)
            fp32_region.update(node.output)
        else:
            for name in node.input:
                consumers[name].append(index)

    # float32 tensors the network reads: constants only it reads become fp16 in place; what the
    # fp32 prefix computes, and constants the prefix reads too, get a Cast to fp16 on the network's side.
    to_cast = []
    for name, readers in consumers.items():
        if not name or types.get(name) != TensorProto.FLOAT:
            continue
        constant = name in initializers or name in constant_nodes
        if constant and name not in prefix_reads:
            if name in initializers:
                initializers[name].CopyFrom(_half_tensor(initializers[name], f"initializer {name!r}"))
            else:
                _half_attributes(constant_nodes[name])
        elif constant or name in fp32_region:
            to_cast.append(name)
            for index in readers:
                node = graph.node[index]
                node.input[:] = [name + _SUFFIX if i == name else i for i in node.input]
    for index, node in enumerate(graph.node):
        if index not in prefix and node.op_type != "Constant":
            _half_attributes(node)

    # Each Cast goes where its source exists: first for graph inputs and initializers, else right
    # after the node producing it (node order must stay topological).
    graph_inputs = {v.name for v in graph.input}
    leading = [name for name in to_cast if name in graph_inputs or name in initializers]
    after_producer = set(to_cast) - set(leading)
    nodes = [_cast(name, name + _SUFFIX, TensorProto.FLOAT16) for name in leading]
    for node in graph.node:
        nodes.append(node)
        nodes += [_cast(out, out + _SUFFIX, TensorProto.FLOAT16) for out in node.output if out in after_producer]
    for graph_output in graph.output:
        if graph_output.type.tensor_type.elem_type == TensorProto.FLOAT:
            inner = graph_output.name + "__fp16_out"
            for node in nodes:
                node.output[:] = [inner if o == graph_output.name else o for o in node.output]
                node.input[:] = [inner if i == graph_output.name else i for i in node.input]
            nodes.append(_cast(inner, graph_output.name, TensorProto.FLOAT))
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # intermediate types changed; inference below recomputes them
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except onnx.shape_inference.InferenceError as exc:
        raise ExportError(f"fp16 conversion produced an inconsistent graph: {exc}") from exc


def _cast(source: str, target: str, to: int) -> onnx.NodeProto:
    return helper.make_node("Cast", [source], [target], to=to, name=f"cast_{source}_to_{TensorProto.DataType.Name(to)}")
