"""The static TensorRT check (export/trt_support.py) on every graph kind the export writes, and on
graphs TensorRT's ONNX parser documents it rejects (ONNX Runtime's default int32 bias DequantizeLinear first).

Every architecture is exported (tiny widths, 32-px crops) once with the CAM output; its fp16 graph is
what export_onnx writes for fp16 (convert_to_fp16 of the same trace), its int8 graphs are the ONNX
Runtime quantiser's, as the export makes them; the in-graph ten-crop, dense ten-crop and ensemble
graphs come from export_onnx too (dense at 96/64 px, a geometry whose windows align).
"""
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from cnnbench.data.spec import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec, spec_for_crop
from cnnbench.export.fp16 import convert_to_fp16
from cnnbench.export.int8 import quantize_int8
from cnnbench.export.onnx_export import export_onnx
from cnnbench.export.trt_support import TensorRTSupportError, check_tensorrt_support, tensorrt_findings
from cnnbench.models import Ensemble, create_model, list_models

SPEC = spec_for_crop(32)
DENSE_SPEC = PreprocessSpec(resize=96, crop=64, mean=IMAGENET_MEAN, std=IMAGENET_STD)
INT8_ACTIVATIONS = ("uint8", "int8-symmetric")  # ONNX Runtime's int8 graph, TensorRT's sibling


def _tiny(name: str, seed: int = 0):
    torch.manual_seed(seed)
    if name == "xception_pretrained":  # fixed layout (timm's legacy_xception): no width knob
        return create_model(name, 4).eval()
    return create_model(name, 4, width_mult=0.125).eval()


def _calibration(io: dict, spec: PreprocessSpec) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if io["crops_per_image"] == 10:
        return torch.randint(0, 256, (2, 3, spec.resize, spec.resize), dtype=torch.uint8, generator=generator)
    return torch.randn(8, 3, spec.crop, spec.crop, generator=generator)


def _graph_kinds(model, folder, stem: str, *, ten_crop: str, cam: bool,
                 int8_kinds: tuple[str, ...] = INT8_ACTIVATIONS) -> dict:
    """{kind: path} of the fp32, fp16 and int8 graphs (ONNX Runtime's uint8 one, TensorRT's sibling)."""
    fp32 = folder / f"{stem}.onnx"
    spec = DENSE_SPEC if ten_crop == "dense" else SPEC
    info = export_onnx(model, fp32, spec=spec, ten_crop=ten_crop, cam_output=cam)
    fp16 = folder / f"{stem}_fp16.onnx"
    onnx.save(convert_to_fp16(onnx.load(fp32)), fp16)
    paths = {"fp32": fp32, "fp16": fp16}
    for activations in int8_kinds:
        paths[f"int8 {activations}"] = folder / f"{stem}_int8_{activations}.onnx"
        quantize_int8(fp32, paths[f"int8 {activations}"], _calibration(info["io"], spec), io=info["io"],
                      activations=activations)
    return paths


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("trt-support")
    graphs = {}
    for name in list_models():
        # The full-size pretrained Xception (timm's layout, no width knob) takes 20 s here; its ONNX Runtime
        # int8 graph has the same node types as the small Xceptions' (checked), so only TensorRT's int8 sibling is made.
        int8_kinds = ("int8-symmetric",) if name == "xception_pretrained" else INT8_ACTIVATIONS
        graphs[name] = _graph_kinds(_tiny(name), folder, name, ten_crop="host", cam=True, int8_kinds=int8_kinds)
    graphs["ten-crop in graph"] = _graph_kinds(_tiny("resnet18"), folder, "tencrop", ten_crop="graph", cam=False)
    for name in ("resnet18", "xception_small"):  # a padded stem, and Xception's valid-padding one
        graphs[f"{name}, dense ten crops"] = _graph_kinds(_tiny(name), folder, f"{name}_dense", ten_crop="dense",
                                                         cam=True)
    pair = Ensemble([_tiny("resnet18", 0), _tiny("resnet26", 1)]).eval()
    graphs["ensemble"] = _graph_kinds(pair, folder, "ensemble", ten_crop="host", cam=True)
    graphs["ensemble, dense ten crops"] = _graph_kinds(pair, folder, "ensemble_dense", ten_crop="dense", cam=False)
    graphs["ensemble, ten-crop in graph"] = {
        "fp32": folder / "ensemble_tencrop.onnx"}
    export_onnx(pair, graphs["ensemble, ten-crop in graph"]["fp32"], spec=SPEC, ten_crop="graph")
    return graphs


def test_every_graph_tensorrt_builds_from_passes(graphs):
    checked = 0
    for name, kinds in graphs.items():
        for kind in ("fp32", "fp16", "int8 int8-symmetric"):
            if kind in kinds:
                assert tensorrt_findings(kinds[kind]) == [], f"{name} {kind}"
                checked += 1
    assert checked == 3 * (len(list_models()) + 5) + 1


def test_onnx_runtime_int8_graph_is_flagged_for_its_int32_biases_and_uint8_activations(graphs):
    for name, kinds in graphs.items():
        if "int8 uint8" not in kinds:
            continue
        graph = onnx.load(kinds["int8 uint8"])
        int32_dq = [n.name for n in graph.graph.node if n.op_type == "DequantizeLinear"
                    and any(t.name == n.input[0] and t.data_type == TensorProto.INT32 for t in graph.graph.initializer)]
        assert int32_dq, name  # the quantiser's default (QuantizeBias) is what TensorRT would stop on
        findings = tensorrt_findings(graph)
        for node in int32_dq:
            assert any(f.startswith(f"node {node} (DequantizeLinear): input") and "is INT32" in f for f in findings)
        assert any("not all zero" in f for f in findings) and any("is UINT8" in f for f in findings), name


def test_strict_check_raises_a_named_error(graphs):
    path = graphs["resnet18"]["int8 uint8"]
    with pytest.raises(TensorRTSupportError, match=r"model_x: TensorRT's ONNX parser would reject \d+ node\(s\)") as error:
        check_tensorrt_support(path, strict=True, label="model_x")
    assert error.value.findings == tensorrt_findings(path)
    assert check_tensorrt_support(path, strict=False) == error.value.findings
    assert check_tensorrt_support(graphs["resnet18"]["fp32"], strict=True) == []


def _model(nodes, inputs, outputs, initializers=(), opset=17, value_info=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers), value_info=list(value_info))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _value(name, elem_type, shape):
    return helper.make_tensor_value_info(name, elem_type, shape)


def test_rules_one_by_one():
    x = _value("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = _value("y", TensorProto.FLOAT, [1, 3, 8, 8])
    scale = numpy_helper.from_array(torch.tensor(0.1).numpy(), "scale")
    zero = numpy_helper.from_array(torch.tensor(3, dtype=torch.int8).numpy(), "zero")
    asymmetric = _model([helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"], name="q"),
                         helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"], name="dq")],
                        [x], [y], [scale, zero])
    assert [f for f in tensorrt_findings(asymmetric) if "not all zero" in f] == [
        "node q (QuantizeLinear): zero point 'zero' is not all zero; TensorRT quantises symmetrically only",
        "node dq (DequantizeLinear): zero point 'zero' is not all zero; TensorRT quantises symmetrically only"]
    unknown = _model([helper.make_node("Unique", ["x"], ["y"], name="u")], [x], [y])
    assert tensorrt_findings(unknown) == ["node u (Unique): operator Unique is not in TensorRT's supported-operator table"]
    custom = _model([helper.make_node("Gelu", ["x"], ["y"], name="g", domain="com.microsoft")], [x], [y])
    assert tensorrt_findings(custom) == ["node g (Gelu): custom domain 'com.microsoft': TensorRT has no importer for it"]
    antialias = _model([helper.make_node("Resize", ["x", "", "scales"], ["y"], name="r", mode="linear", antialias=1)],
                       [x], [y], [numpy_helper.from_array(torch.ones(4).numpy(), "scales")], opset=18)
    assert tensorrt_findings(antialias) == ["node r (Resize): TensorRT's Resize does not antialias"]
    axes = _value("axes", TensorProto.INT64, [1])
    dynamic_axes = _model([helper.make_node("Unsqueeze", ["x", "axes"], ["y"], name="un")], [x, axes],
                          [_value("y", TensorProto.FLOAT, None)])
    assert tensorrt_findings(dynamic_axes) == [
        "node un (Unsqueeze): input 'axes' (axes) must be an initializer or a Constant for TensorRT"]
    doubles = _model([helper.make_node("Cast", ["x"], ["c"], name="to_u8", to=TensorProto.UINT8),
                      helper.make_node("Cast", ["c"], ["y"], name="back", to=TensorProto.FLOAT)], [x], [y])
    assert tensorrt_findings(doubles) == [
        "node to_u8 (Cast): output 'c' is UINT8, which TensorRT allows only as a network input or output"]
    assert tensorrt_findings(_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [x], [y], opset=21)) == [
        "opset 21 is outside the 9..20 TensorRT's ONNX parser documents"]
