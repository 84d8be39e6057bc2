"""`export --triton`: a Triton model repository for a full Triton server (ONNX Runtime / TensorRT backends).

One Triton model per graph of each export (the fp32 ONNX graph is ``<name>``, others ``<name>_fp16``,
``<name>_int8``, TensorRT plans ``<name>_trt``, ``<name>_fp16_trt``, ...), each folder holding
``config.pbtxt``, ``labels.txt`` (the class names, so Triton's classification extension can answer
top-k labels) and the graph in version folder ``1/``. Each config is built as Triton's own
ModelConfig protobuf message (tritonclient ships model_config.proto compiled), so only fields of
the schema can be written, and its inputs and outputs are read from the ONNX graph itself.
"""
from __future__ import annotations

import os
import shutil
import tempfile

from cnnbench.common import atomic_write
from cnnbench.export.errors import ExportError
from cnnbench.export.manifest import load_manifest, verify_file
from cnnbench.export.tensorrt import profile_shapes
from cnnbench.serve.models import triton_name

REPOSITORY_NAME = "triton"  # under the export --out folder
LABELS_NAME = "labels.txt"
VERSION = "1"
PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan")}
# ONNX TensorProto element types -> Triton data types (the ones export's graph contract allows, and fp16).
_TRITON_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 10: "TYPE_FP16"}


def write_triton_repository(export_dirs, out, *, max_batch: int = 64, queue_delay_us: int = 2000,
                            instances: int = 1) -> dict:
    """Write the repository for these export folders into `out` (replacing what was there, atomically
    per repository: built beside it, then swapped in). `max_batch`: images per call, as given to export
    (it sized the TensorRT profiles). Returns {"repository", "models": [...]}."""
    from google.protobuf import text_format

    out = os.path.abspath(os.fspath(out))
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    models = []
    building = tempfile.mkdtemp(prefix=".triton-", dir=parent)
    try:
        for export_dir in export_dirs:
            manifest = load_manifest(export_dir)  # verifies every listed file's sha256 first
            for artifact in manifest["artifacts"]:
                model = _write_model(building, manifest, artifact, max_batch, queue_delay_us, instances)
                with open(os.path.join(building, model["name"], "config.pbtxt")) as f:
                    text_format.Parse(f.read(), _schema().ModelConfig())  # what Triton will parse, parsed here first
                models.append(model)
        _swap_in(building, out)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return {"repository": out, "models": models}


def triton_model_name(manifest: dict, artifact: dict) -> str:
    parts = [manifest["name"]] + ([artifact["precision"]] if artifact["precision"] != "fp32" else [])
    parts += ["trt"] if artifact["format"] == "tensorrt" else []
    return triton_name("_".join(parts))


def _write_model(repository: str, manifest: dict, artifact: dict, max_batch: int, queue_delay_us: int,
                 instances: int) -> dict:
    from google.protobuf import text_format

    fmt = artifact["format"]
    if fmt not in PLATFORMS:
        raise ExportError(f"{manifest['name']}: no Triton platform for a {fmt} artifact")
    platform, filename = PLATFORMS[fmt]
    graph = _onnx_graph_path(manifest, artifact)
    inputs, outputs = graph_io(graph)
    name = triton_model_name(manifest, artifact)
    folder = os.path.join(repository, name)
    os.makedirs(os.path.join(folder, VERSION))
    source = verify_file(manifest["export_dir"], artifact)
    atomic_write(os.path.join(folder, VERSION, filename), lambda tmp: shutil.copyfile(source, tmp))
    atomic_write(os.path.join(folder, LABELS_NAME), "".join(f"{c}\n" for c in manifest["classes"]))

    config = _schema().ModelConfig()
    config.name = name
    config.platform = platform
    # Rows one call takes: the export's TensorRT profile (ten crops per image when they are cut outside).
    config.max_batch_size = profile_shapes(manifest["io"], max_batch)["max_shape"][0]
    for tensor, spec in [(config.input.add(), s) for s in inputs] + [(config.output.add(), s) for s in outputs]:
        tensor.name, tensor.dims[:] = spec["name"], spec["dims"]
        tensor.data_type = _schema().DataType.Value(spec["type"])
        if tensor.name == "logits":
            tensor.label_filename = LABELS_NAME
    config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    group = config.instance_group.add()
    group.count = instances
    group.kind = group.KIND_GPU if fmt == "tensorrt" else group.KIND_AUTO  # a plan runs on a GPU only
    atomic_write(os.path.join(folder, "config.pbtxt"), text_format.MessageToString(config))
    return {"name": name, "platform": platform, "source": source, "max_batch_size": config.max_batch_size,
            "inputs": inputs, "outputs": outputs}


def graph_io(path: str) -> tuple[list[dict], list[dict]]:
    """([{"name", "type", "dims"}] inputs, outputs) of an ONNX graph, the dynamic batch axis left out."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def describe(value) -> dict:
        tensor = value.type.tensor_type
        dims = tensor.shape.dim
        if not dims or (dims[0].dim_param == "" and dims[0].dim_value > 0):
            raise ExportError(f"{path}: {value.name} has no dynamic batch axis; Triton batches on the first one")
        if any(d.dim_value <= 0 for d in dims[1:]):
            raise ExportError(f"{path}: {value.name} has a dynamic axis besides the batch")
        if tensor.elem_type not in _TRITON_TYPES:
            raise ExportError(f"{path}: {value.name} has ONNX element type {tensor.elem_type}, not one Triton gets here")
        return {"name": value.name, "type": _TRITON_TYPES[tensor.elem_type], "dims": [d.dim_value for d in dims[1:]]}

    return ([describe(v) for v in graph.input if v.name not in initializers], [describe(v) for v in graph.output])


def _onnx_graph_path(manifest: dict, artifact: dict) -> str:
    """The ONNX graph that defines an artifact's I/O: itself, or for a TensorRT plan the ONNX graph of
    its precision it was built from."""
    if artifact["format"] == "onnx":
        return os.path.join(manifest["export_dir"], artifact["file"])
    for other in manifest["artifacts"]:
        if other["format"] == "onnx" and other["precision"] == artifact["precision"]:
            return os.path.join(manifest["export_dir"], other["file"])
    raise ExportError(f"{manifest['name']}: no ONNX graph in {artifact['precision']} to read the plan's inputs from")


def _schema():
    """Triton's model_config.proto, compiled, as tritonclient ships it."""
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


def _swap_in(building: str, out: str) -> None:
    """Replace `out` by the finished `building` folder: a crash leaves the old repository or the new one."""
    if os.path.exists(out):
        retired = tempfile.mkdtemp(prefix=".triton-old-", dir=os.path.dirname(out))
        os.rename(out, os.path.join(retired, "repository"))
        os.rename(building, out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(building, out)
