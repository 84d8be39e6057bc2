"""`export --triton`: every config.pbtxt parses as Triton's own ModelConfig message and states the ONNX
graph's real inputs and outputs (read here with ONNX Runtime, independently of the writer)."""
from __future__ import annotations

import json
import os

import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("tritonclient.grpc")

from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402

from cnnbench import export  # noqa: E402
from cnnbench.cli import cli  # noqa: E402
from cnnbench.common import sha256_file  # noqa: E402
from cnnbench.export.errors import ExportError  # noqa: E402
from cnnbench.serve.repository import graph_io, write_triton_repository  # noqa: E402
from runtime_testlib import tiny_run  # noqa: E402

ORT_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(uint8)": "TYPE_UINT8", "tensor(float16)": "TYPE_FP16"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    return tiny_run(tmp_path_factory.getbasetemp())


def parsed_config(folder) -> model_config_pb2.ModelConfig:
    with open(os.path.join(folder, "config.pbtxt")) as f:
        return text_format.Parse(f.read(), model_config_pb2.ModelConfig())


def assert_states_the_graph(config, graph_path: str) -> None:
    session = ort.InferenceSession(graph_path, providers=["CPUExecutionProvider"])
    for stated, real in ((config.input, session.get_inputs()), (config.output, session.get_outputs())):
        assert [t.name for t in stated] == [t.name for t in real]
        for t, r in zip(stated, real):
            assert isinstance(r.shape[0], str), "the batch axis is dynamic in the graph"
            assert list(t.dims) == list(r.shape[1:])
            assert model_config_pb2.DataType.Name(t.data_type) == ORT_TYPES[r.type]


def test_export_triton_writes_a_repository_triton_can_parse(run, tmp_path):
    out = tmp_path / "export"
    result = CliRunner().invoke(cli, ["export", run["checkpoint"], "--triton", "--ten-crop", "graph", "--fp16",
                                      "--tensorrt", "off", "--max-batch", "4", "--parity-images", "8",
                                      "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    manifest = summary["exports"][0]
    repository = out / "triton"
    assert summary["triton"]["repository"] == str(repository)
    assert sorted(os.listdir(repository)) == [manifest["name"], f"{manifest['name']}_fp16"]
    for precision, suffix in (("fp32", ""), ("fp16", "_fp16")):
        folder = repository / f"{manifest['name']}{suffix}"
        config = parsed_config(folder)
        source = os.path.join(manifest["export_dir"], "model.onnx" if precision == "fp32" else "model_fp16.onnx")
        assert config.name == folder.name and config.platform == "onnxruntime_onnx"
        assert config.max_batch_size == 4  # the ten crops are cut inside the graph: one row per image
        assert config.dynamic_batching.max_queue_delay_microseconds > 0
        assert config.instance_group[0].count == 1
        assert_states_the_graph(config, source)
        assert config.input[0].name == "images" and config.input[0].data_type == model_config_pb2.TYPE_UINT8
        assert config.output[0].label_filename == "labels.txt"
        assert (folder / "labels.txt").read_text().splitlines() == manifest["classes"]
        assert sha256_file(folder / "1" / "model.onnx") == sha256_file(source)


def test_crops_cut_outside_give_ten_rows_per_image_and_a_rewrite_replaces_the_repository(run, tmp_path):
    exported = export.export_checkpoints([run["checkpoint"]], tensorrt="off", max_batch=3, out=str(tmp_path / "e"),
                                         parity_images=8, progress=False)["exports"][0]
    stale = tmp_path / "repo" / "gone"
    stale.mkdir(parents=True)
    result = write_triton_repository([exported["export_dir"]], tmp_path / "repo", max_batch=3)
    assert not stale.exists() and [m["name"] for m in result["models"]] == [exported["name"]]
    config = parsed_config(tmp_path / "repo" / exported["name"])
    assert config.max_batch_size == 30
    assert config.input[0].name == "input" and config.input[0].data_type == model_config_pb2.TYPE_FP32
    assert_states_the_graph(config, os.path.join(exported["export_dir"], "model.onnx"))


def test_a_graph_without_a_dynamic_batch_axis_is_refused(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "fixed", [x], [y])
    path = str(tmp_path / "fixed.onnx")
    onnx.save(helper.make_model(graph), path)
    with pytest.raises(ExportError, match="no dynamic batch axis"):
        graph_io(path)
