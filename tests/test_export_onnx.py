"""ONNX export: every architecture passes the parity gates in fp32 and fp16 under ONNX Runtime (CPU);
the ensemble graph sums its members; the in-graph ten-crop equals torchvision's TenCrop on the host;
the graph contract (names, dtypes, dynamic batch, fp16 casts, eval-mode BatchNorm) holds."""
import numpy as np
import onnx
import pytest
import torch
import torchvision.transforms as T
from onnx import TensorProto, helper, numpy_helper

from cnnbench.data.folder import scan_folder
from cnnbench.data.spec import spec_for_crop
from cnnbench.data.synth import synthesize
from cnnbench.data.transforms import normalize
from cnnbench.export import ExportError, ParityError, export_onnx, format_parity_table, make_ort_session, run_parity
from cnnbench.export.fp16 import convert_to_fp16
from cnnbench.export.onnx_export import check_graph
from cnnbench.export.ort import logits_runner
from cnnbench.export.parity import apply_gates, check_parity, compare_logits
from cnnbench.export.pipeline import load_parity_images
from cnnbench.models import Ensemble, TenCropModel, create_model, list_models

SPEC = spec_for_crop(48)  # resize 55: odd margins, so mirrored crops are not the unmirrored ones
CLASSES = 8


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = synthesize(tmp_path_factory.mktemp("export-onnx") / "synth", classes=CLASSES, per_class=3, size=64,
                      progress=False)
    return scan_folder(root).samples


@pytest.fixture(scope="module")
def crops(samples):
    images, skipped = load_parity_images(samples, SPEC, ten_crop_in_graph=False)
    assert not skipped and images.shape == (len(samples), 3, SPEC.crop, SPEC.crop)
    return images


@pytest.fixture(scope="module")
def resized(samples):
    images, _ = load_parity_images(samples, SPEC, ten_crop_in_graph=True)
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, SPEC.resize, SPEC.resize)
    return images


def tiny(arch: str, seed: int = 0, classes: int = CLASSES):
    torch.manual_seed(seed)
    kwargs = {} if arch == "xception_pretrained" else {"width_mult": 0.125}  # xception_pretrained has one size
    return create_model(arch, classes, **kwargs).eval()


def run(path, batch: np.ndarray) -> list[np.ndarray]:
    session = make_ort_session(path)
    return session.run(None, {session.get_inputs()[0].name: batch})


def initializer_types(path) -> set[int]:
    return {t.data_type for t in onnx.load(str(path)).graph.initializer if len(t.dims) > 1}


@pytest.mark.parametrize("arch", list_models())
def test_every_architecture_passes_the_gates_in_fp32_and_fp16(arch, crops, tmp_path):
    model = tiny(arch)
    for precision in ("fp32", "fp16"):
        path = tmp_path / f"{precision}.onnx"
        info = export_onnx(model, path, spec=SPEC, precision=precision)
        assert info["opset"] == 17 and info["precision"] == precision
        assert info["io"]["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["batch", 3, 48, 48]}]
        assert info["io"]["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", CLASSES]}]
        # Weights (conv kernels, classifier matrix) are stored in the graph's precision.
        assert initializer_types(path) == {TensorProto.FLOAT if precision == "fp32" else TensorProto.FLOAT16}
        # batch_size 7 gives batches of 7 and a remainder: neither is the traced batch of 2.
        report = run_parity(model, logits_runner(make_ort_session(path)), crops, precision, batch_size=7)
        assert report["passed"], (precision, report)
        assert report["n_images"] == len(crops)
        if precision == "fp32":
            assert report["top1_agreement"] == 1.0 and report["max_abs_diff"] <= 1e-3
        else:
            assert report["top1_agreement"] >= 0.99 and report["top5_agreement"] >= 0.99
            assert report["mean_abs_diff"] <= 1e-2 and report["max_abs_diff"] > 0  # really fp16 arithmetic


def test_fp16_graph_keeps_fp32_inputs_and_outputs(tmp_path):
    path = tmp_path / "fp16.onnx"
    export_onnx(tiny("resnet18"), path, spec=SPEC, precision="fp16", cam_output=True)
    session = make_ort_session(path)
    assert [(i.name, i.type) for i in session.get_inputs()] == [("input", "tensor(float)")]
    assert [(o.name, o.type) for o in session.get_outputs()] == [("logits", "tensor(float)"),
                                                                ("features", "tensor(float)")]
    logits, features = session.run(None, {"input": np.zeros((1, 3, 48, 48), np.float32)})
    assert logits.dtype == np.float32 and features.dtype == np.float32


def test_ten_crop_graph_equals_host_ten_crop_path(resized, tmp_path):
    model = tiny("resnet18")
    path = tmp_path / "tencrop.onnx"
    info = export_onnx(model, path, spec=SPEC, ten_crop="graph", cam_output=True)
    assert info["io"]["inputs"] == [{"name": "images", "dtype": "uint8", "shape": ["batch", 3, 55, 55]}]
    images = resized[:5]
    logits, features = run(path, images.numpy())

    # Host path, independent of data.geometry: torchvision's TenCrop on each normalised resized image.
    ten_crop = T.TenCrop(SPEC.crop)
    host_crops = torch.stack([torch.stack(ten_crop(normalize(img, SPEC))) for img in images])  # [B, 10, 3, c, c]
    with torch.no_grad():
        flat = host_crops.flatten(0, 1)
        expected_logits = model(flat).reshape(len(images), 10, CLASSES).mean(dim=1)
        expected_features = model.forward_features(flat).reshape(len(images), 10, *features.shape[2:])
    assert logits.shape == (5, CLASSES) and features.shape[:2] == (5, 10)
    np.testing.assert_allclose(logits, expected_logits.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(features, expected_features.numpy(), rtol=0, atol=1e-4)


def test_ten_crop_graph_in_fp16_takes_uint8_and_passes_the_gates(resized, tmp_path):
    model = tiny("xception_small")
    path = tmp_path / "tencrop_fp16.onnx"
    export_onnx(model, path, spec=SPEC, precision="fp16", ten_crop="graph")
    session = make_ort_session(path)
    assert session.get_inputs()[0].type == "tensor(uint8)"
    assert session.get_outputs()[0].type == "tensor(float)"
    report = run_parity(TenCropModel(model, SPEC), logits_runner(session), resized, "fp16", batch_size=5)
    assert report["passed"], report
    # As in PyTorch's TenCropModel: normalisation and cropping in fp32, the network in fp16.
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.output]}
    by_op = {}
    for node in graph.node:
        by_op.setdefault(node.op_type, []).append(types[node.output[0]])
    assert set(by_op["Sub"]) == {TensorProto.FLOAT}
    assert TensorProto.FLOAT in by_op["Slice"] and TensorProto.FLOAT16 not in by_op["Slice"]  # others: int64 shapes
    assert set(by_op["Conv"]) == set(by_op["Gemm"]) == {TensorProto.FLOAT16}


def test_ensemble_graph_outputs_the_sum_of_member_logits(crops, tmp_path):
    members = [tiny("resnet26", seed=1), tiny("xception_small", seed=2)]
    path = tmp_path / "ensemble.onnx"
    info = export_onnx(Ensemble(members), path, spec=SPEC, cam_output=True)
    assert [o["name"] for o in info["io"]["outputs"]] == ["logits", "features_0", "features_1"]
    logits, features_0, features_1 = run(path, crops.numpy())
    with torch.no_grad():
        expected = members[0](crops) + members[1](crops)
        np.testing.assert_allclose(features_0, members[0].forward_features(crops).numpy(), rtol=0, atol=1e-4)
        np.testing.assert_allclose(features_1, members[1].forward_features(crops).numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(logits, expected.numpy(), rtol=0, atol=1e-4)


def test_training_mode_model_is_exported_in_eval_mode_and_left_untouched(crops, tmp_path):
    model = tiny("resnet18")
    model.train()
    with torch.no_grad():  # running statistics far from the init values, so train/eval outputs differ
        model(crops * 3 + 1)
    path = tmp_path / "m.onnx"
    export_onnx(model, path, spec=SPEC)
    assert model.training  # the caller's model keeps its mode
    graph = onnx.load(str(path)).graph
    assert all(n.op_type != "BatchNormalization" or len(n.output) == 1 for n in graph.node)
    (logits,) = run(path, crops.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(logits, model.eval()(crops).numpy(), rtol=0, atol=1e-4)


def _bn_graph(training_mode: int) -> onnx.ModelProto:
    params = [numpy_helper.from_array(np.ones(3, np.float32), name) for name in ("scale", "bias", "mean", "var")]
    outputs = ["y"] if training_mode == 0 else ["y", "running_mean", "running_var"]
    node = helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], outputs, name="bn",
                            training_mode=training_mode)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], params)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_training_mode_batchnorm_in_a_graph_is_refused():
    io = {"inputs": [{"name": "x", "dtype": "float32"}], "outputs": [{"name": "y", "dtype": "float32"}]}
    check_graph(_bn_graph(0), io, "fp32", "eval.onnx")
    with pytest.raises(ExportError, match="train.onnx: BatchNormalization 'bn' is in training mode"):
        check_graph(_bn_graph(1), io, "fp32", "train.onnx")


def test_fp16_conversion_refuses_weights_beyond_the_fp16_range():
    big = numpy_helper.from_array(np.array([[1e6]], np.float32), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], [big])
    with pytest.raises(ExportError, match="exceed the fp16 range"):
        convert_to_fp16(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_graph_contract_violation_names_the_file_and_tensors():
    io = {"inputs": [{"name": "input", "dtype": "float32"}], "outputs": [{"name": "y", "dtype": "float32"}]}
    with pytest.raises(ExportError, match=r"bad.onnx: graph inputs are x:FLOAT, the contract says input:FLOAT"):
        check_graph(_bn_graph(0), io, "fp32", "bad.onnx")
    with pytest.raises(ExportError, match="precision must be one of"):
        export_onnx(tiny("resnet18"), "unused.onnx", spec=SPEC, precision="int8")


def _logits(n=100, k=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, k)) * 3


def test_gates_fail_on_a_flipped_prediction_and_name_the_tolerance_needed():
    reference = _logits()
    exported = reference.copy()
    row = exported[0]
    row[[np.argmax(row), np.argsort(row)[-2]]] = row[[np.argsort(row)[-2], np.argmax(row)]]  # swap top-2
    report = apply_gates(compare_logits(reference, exported), "fp32")
    assert not report["passed"]
    assert report["top1_agreement"] == pytest.approx(0.99)
    assert report["gates"]["top1_agreement"] == {"value": 0.99, "op": ">=", "limit": 1.0, "passed": False}
    with pytest.raises(ParityError) as excinfo:
        check_parity(report, "r18/model.onnx")
    message = str(excinfo.value)
    assert "r18/model.onnx: fp32 parity failed" in message
    assert "top1_agreement = 99.00 % (limit >= 100.00 %; it would pass with a limit >= 99.00 %)" in message
    assert "max_abs_diff" in message and excinfo.value.report is report
    # The same disagreement is within the fp16 gates (99 %), but not a logit error above 1e-2 on average.
    assert apply_gates(compare_logits(reference, exported), "fp16")["gates"]["top1_agreement"]["passed"]
    drifted = apply_gates(compare_logits(reference, reference + 0.02), "fp16")
    assert not drifted["passed"] and drifted["gates"]["mean_abs_diff"]["value"] == pytest.approx(0.02)


def test_fp32_gate_is_an_absolute_1e_3_logit_error():
    reference = _logits()
    assert apply_gates(compare_logits(reference, reference + 9e-4), "fp32")["passed"]
    report = apply_gates(compare_logits(reference, reference + 2e-3), "fp32")
    assert not report["passed"] and report["gates"]["top1_agreement"]["passed"]
    with pytest.raises(ParityError, match=r"max_abs_diff = 0.002 \(limit <= 0.001; it would pass with a limit <= 0.002\)"):
        check_parity(report, "x")


def test_top5_agreement_compares_sets_and_nan_logits_fail_every_gate():
    reference = _logits(n=10)
    exported = reference.copy()
    order = np.argsort(-reference[0])
    exported[0, order[4]], exported[0, order[5]] = reference[0, order[5]], reference[0, order[4]]  # 5th/6th swap
    metrics = compare_logits(reference, exported)
    assert metrics["top1_agreement"] == 1.0 and metrics["top5_agreement"] == pytest.approx(0.9)
    exported[3, 2] = np.nan
    report = apply_gates(compare_logits(reference, exported), "fp16")
    assert not report["passed"] and report["top1_agreement"] is None
    with pytest.raises(ParityError, match="top1_agreement is not finite"):
        check_parity(report, "x")


def test_top5_agreement_skips_near_tied_boundaries_but_not_decisive_ones():
    reference = np.tile(np.arange(8, 0, -1, dtype=np.float64), (4, 1))  # classes 1 logit apart
    reference[0, 5] = reference[0, 4] - 0.01  # image 0: its 5th and 6th classes are near-tied
    exported = reference.copy()
    exported[0, [4, 5]] = exported[0, [5, 4]]  # rounding flips that near-tie: not counted
    metrics = compare_logits(reference, exported)
    assert metrics["top5_images"] == 3 and metrics["top5_agreement"] == 1.0
    exported[1, [4, 5]] = exported[1, [5, 4]]  # a flip across a 1-logit margin is a real error
    metrics = compare_logits(reference, exported)
    assert metrics["top5_agreement"] == pytest.approx(2 / 3)
    assert not apply_gates(metrics, "fp16")["gates"]["top5_agreement"]["passed"]


def test_parity_table_lists_each_artifact_with_its_verdict():
    good = apply_gates(compare_logits(_logits(), _logits()), "fp32")
    bad = apply_gates(compare_logits(_logits(), _logits() + 0.05), "fp16")
    table = format_parity_table([{"name": "r18", "parity": {"artifacts": {
        "model.onnx": {**good, "runtime": "onnxruntime-cpu"}, "model_fp16.onnx": {**bad, "runtime": "onnxruntime-cpu"}}}}])
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["export", "artifact", "runtime"]
    assert "model.onnx" in lines[2] and lines[2].rstrip().endswith("PASS") and "100.00%" in lines[2]
    assert "model_fp16.onnx" in lines[3] and lines[3].rstrip().endswith("FAIL: mean_abs_diff")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_cuda_session_without_a_gpu_is_an_error_not_a_silent_cpu_fallback(tmp_path):
    path = tmp_path / "m.onnx"
    export_onnx(tiny("resnet18"), path, spec=SPEC)
    with pytest.raises(ExportError, match="CUDA needs a GPU"):
        make_ort_session(path, device="cuda")
    assert make_ort_session(path, device="auto").get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(ExportError, match="ONNX file not found"):
        make_ort_session(tmp_path / "missing.onnx")
