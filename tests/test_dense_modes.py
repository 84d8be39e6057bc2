"""Dense ten crops as a crop mode everywhere one is chosen: runtime (checkpoint and dense export),
eval/predict from the command line, export --ten-crop dense (parity against the dense reference, agreement
with the exact ten crops reported), Grad-CAM in dense mode (exported and reference), validate, bench.

The checkpoint is runtime_testlib's tiny fitted ResNet-18 at resize 96 / crop 64, a geometry whose
windows align with the stride-32 grid (the standard 37/32 geometry of the other runtime tests does not).
"""
import sys

import numpy as np
import pytest
import torch

from cnnbench import cli
from cnnbench import export
from cnnbench import runtime
from cnnbench.bench.run import run_bench
from cnnbench.common.errors import UserError
from cnnbench.data.crops import CROP_MODES, DENSE, TEN, TEN_CROP_PLACES, crop_mode, eval_transform
from cnnbench.data.images import load_rgb
from cnnbench.data.transforms import normalize, resize_uint8
from cnnbench.export.manifest import graph_crops
from cnnbench.gradcam import gradcam_images, validate_export
from cnnbench.gradcam.exported import ExportedCam, pearson
from cnnbench.gradcam.tencrop import image_cam
from cnnbench.models import TenCropModel, default_spec, load_checkpoint
from cnnbench.models.dense import DenseGeometryError, DenseTenCropModel
from cnnbench.runtime.predictor import BackendError
from runtime_testlib import DENSE_SPEC, held_out_images, tiny_run


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    torch.manual_seed(0)
    return tiny_run(tmp_path_factory.getbasetemp(), DENSE_SPEC)


@pytest.fixture(scope="module")
def images(dense_run):
    paths, labels = held_out_images(dense_run)
    resized = torch.stack([resize_uint8(load_rgb(p), DENSE_SPEC) for p in paths])
    return paths, labels, resized


@pytest.fixture(scope="module")
def dense_export(dense_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("dense-export")
    result = export.export_checkpoints([dense_run["checkpoint"]], fp16=True, int8=True, ten_crop="dense",
                                       cam_output=True, tensorrt="off", out=str(out), parity_images=16,
                                       calibration_images=8, progress=False)
    assert result["ok"], result["failures"]
    return result["exports"][0]


def test_dense_is_a_registered_crop_mode_that_cuts_nothing():
    assert crop_mode("dense") is DENSE and CROP_MODES["dense"] is DENSE and not DENSE.cuts_crops
    assert DENSE.boxes(DENSE_SPEC) == TEN.boxes(DENSE_SPEC)  # the windows stand for TenCrop's crops
    with pytest.raises(ValueError, match="not cut"):
        DENSE.cut(torch.zeros(1, 3, 96, 96, dtype=torch.uint8), DENSE_SPEC)
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    from torchvision.transforms.functional import to_pil_image
    assert torch.equal(eval_transform(DENSE_SPEC, "dense")(to_pil_image(image)),
                       resize_uint8(to_pil_image(image), DENSE_SPEC))
    assert TEN_CROP_PLACES == {"host": None, "graph": "10", "dense": "dense"}


def test_torch_predictor_dense_equals_the_dense_model(dense_run, images):
    _, _, resized = images
    predictor = runtime.load(dense_run["checkpoint"], backend="torch", device="cpu")
    model, _ = load_checkpoint(dense_run["checkpoint"])
    with torch.no_grad():
        expected = DenseTenCropModel(model.eval(), DENSE_SPEC)(resized)
    got = predictor.logits_from_images(resized, "dense")
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, predictor.logits_from_images(resized, 10), atol=1e-3)  # an approximation


def test_misaligned_geometry_is_one_line_naming_the_resizes_that_align(monkeypatch, capsys, tmp_path):
    standard = tiny_run(tmp_path)  # resize 37, crop 32: 5 px of margin, no whole cell
    with pytest.raises(DenseGeometryError) as raised:
        runtime.load(standard["checkpoint"], backend="torch", device="cpu").logits_from_images(
            torch.zeros(1, 3, 37, 37, dtype=torch.uint8), "dense")
    assert isinstance(raised.value, UserError) and "resizes that align with crop 32: 64" in str(raised.value)
    monkeypatch.setattr(sys, "argv", ["cnnbench", "eval", standard["checkpoint"], "--crops", "dense"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and err[-1].startswith("error: dense ten crops need resize - crop")


def test_eval_and_predict_dense_on_checkpoint_and_dense_export(dense_run, dense_export, images):
    paths, labels, resized = images
    model, _ = load_checkpoint(dense_run["checkpoint"])
    with torch.no_grad():
        expected = DenseTenCropModel(model.eval(), DENSE_SPEC)(resized)
    top1 = 100 * float((expected.argmax(1) == torch.tensor(labels)).float().mean())
    for source in (dense_run["checkpoint"], dense_export["export_dir"]):
        report = runtime.evaluate(source, crops="dense", device="cpu", progress=False, workers=0)
        assert report["crops"] == "dense" and report["top1"] == pytest.approx(top1)
    predictions = runtime.predict_files(dense_export["export_dir"], paths[:3], crops="dense", device="cpu",
                                        progress=False, workers=0)
    classes = load_checkpoint(dense_run["checkpoint"])[1]["classes"]
    predicted = {r["path"]: r["top"][0]["class"] for r in predictions["results"]}
    assert [predicted[p] for p in paths[:3]] == [classes[i] for i in expected[:3].argmax(1)]


def test_dense_export_manifest_parity_and_exact_agreement(dense_run, dense_export, images):
    assert dense_export["ten_crop"] == "dense" and dense_export["ten_crop_in_graph"]
    assert graph_crops(dense_export) == "dense"
    assert dense_export["io"]["inputs"][0] == {"name": "images", "dtype": "uint8", "shape": ["batch", 3, 96, 96]}
    reports = dense_export["parity"]["artifacts"]
    assert set(reports) == {"model.onnx", "model_fp16.onnx", "model_int8.onnx"}
    assert "dense" in dense_export["parity"]["reference"]
    # The reported agreement with the exact ten crops, recomputed from the PyTorch models on the same images.
    model, _ = load_checkpoint(dense_run["checkpoint"])
    _, _, resized = images
    predictor = runtime.load(dense_export["export_dir"], backend="onnxruntime", device="cpu")
    with torch.no_grad():
        exact = TenCropModel(model.eval(), DENSE_SPEC)(resized)
        dense = DenseTenCropModel(model.eval(), DENSE_SPEC)(resized)
    onnx_logits = predictor.logits_from_images(resized, "dense")
    assert (onnx_logits - dense).abs().max() <= 1e-3  # fp32 graph = the dense reference
    for report in reports.values():
        assert report["passed"] and 0.0 <= report["exact_top1_agreement"] <= 1.0
    agreement_all = float((exact.argmax(1) == dense.argmax(1)).float().mean())
    assert reports["model.onnx"]["n_images"] == len(resized)  # the parity images: the whole tiny test split
    assert reports["model.onnx"]["exact_top1_agreement"] == pytest.approx(agreement_all)
    assert "vs exact 10" in export.format_parity_table([dense_export])


def test_crop_mode_mismatches_name_the_export_to_make(dense_run, dense_export, tmp_path):
    dense_predictor = runtime.load(dense_export["export_dir"], backend="onnxruntime", device="cpu")
    images = torch.zeros(1, 3, 96, 96, dtype=torch.uint8)
    with pytest.raises(BackendError, match="--ten-crop graph"):
        dense_predictor.logits_from_images(images, 10)
    host = export.export_checkpoints([dense_run["checkpoint"]], tensorrt="off", out=str(tmp_path), parity_images=2,
                                     progress=False)["exports"][0]
    host_predictor = runtime.load(host["export_dir"], backend="onnxruntime", device="cpu")
    with pytest.raises(BackendError, match="--ten-crop dense"):
        host_predictor.logits_from_images(images, "dense")
    with pytest.raises(export.ExportError, match="ten_crop must be one of host, graph, dense"):
        export.export_checkpoints([dense_run["checkpoint"]], ten_crop="inside", tensorrt="off", out=str(tmp_path))


def test_dense_gradcam_is_the_full_image_map_of_image_and_mirror(dense_run, images):
    """Hand reference: ClassifierCAM of the image's map and of the mirror's map (mirrored back), averaged."""
    _, _, resized = images
    model, _ = load_checkpoint(dense_run["checkpoint"])
    model.eval()
    batch = resized[:3]
    cam = image_cam(model, batch, DENSE_SPEC, crops="dense")
    with torch.no_grad():
        logits = DenseTenCropModel(model, DENSE_SPEC)(batch)
        x = normalize(batch, DENSE_SPEC)
        maps = []
        for image in (x, torch.flip(x, dims=[-1])):
            features = model.forward_features(image)
            weights = model.classifier.weight[logits.argmax(1)]
            raw = torch.relu(torch.einsum("bc,bchw->bhw", weights, features))
            maps.append(torch.nn.functional.interpolate(raw[:, None], size=(96, 96), mode="bilinear",
                                                        align_corners=False)[:, 0])
    expected = (maps[0] + torch.flip(maps[1], dims=[-1])) / 2
    assert torch.equal(cam.targets, logits.argmax(1)) and torch.allclose(cam.logits, logits, atol=1e-5)
    assert torch.allclose(cam.maps, expected, atol=1e-4 * expected.abs().max())


def test_exported_dense_cam_and_validate_report_the_exact_ten_crop_map(dense_run, dense_export, images, tmp_path):
    _, _, resized = images
    model, _ = load_checkpoint(dense_run["checkpoint"])
    reference = image_cam(model.eval(), resized, DENSE_SPEC, crops="dense")
    exported = ExportedCam(dense_export, "fp32").image_cams(resized, "dense", [reference.targets])[0]
    assert min(pearson(a, b) for a, b in zip(reference.maps, exported.maps)) > 0.999
    with pytest.raises(UserError, match="computes dense ten crops inside its graph"):
        ExportedCam(dense_export, "fp32").image_cams(resized, 10)
    report = validate_export(dense_export["export_dir"], out=tmp_path / "validation", limit=4, progress=False)
    assert report["ok"], report.get("problems") or report.get("error")
    assert report["cam_crops"] == "dense"
    strongest = int(reference.maps.flatten(1).amax(1).argmax())  # an image whose map the ReLU left non-zero
    # The dense map is Grad-CAM at the last stage; the exact ten-crop map it is compared with the same.
    exact = image_cam(model, resized[strongest:strongest + 1], DENSE_SPEC, crops=10, method="gradcam", layer="last",
                      targets=reference.targets[strongest:strongest + 1])
    for artifact in report["artifacts"].values():
        assert 0.0 <= artifact["parity"]["exact_top1_agreement"] <= 1.0
        exact_map = artifact["cam"]["exact_ten_crop_map"]
        assert exact_map["n_images"] == 4 and -1.0 <= exact_map["min_correlation"] <= exact_map["mean_correlation"] < 1.0
    assert 0.0 < pearson(exact.maps[0], reference.maps[strongest]) < 0.9999  # paste-back and full-image maps differ
    panels = gradcam_images([dense_run["data"]], model=dense_export["export_dir"], crops="dense", out=tmp_path / "cam",
                            progress=False)
    assert panels["ok"] and panels["cam_parity"]["passed"]


def test_bench_dense_rows_agree_against_the_exact_ten_crops(dense_run, dense_export, images, tmp_path):
    result = run_bench([dense_run["checkpoint"], dense_export["export_dir"]], batch=2, iters=1, warmup=1,
                       precisions=["fp32", "int8"], crops=["10", "dense"], threads=1, progress=False,
                       backends=["torch", "onnxruntime"],  # OpenVINO's dense rows: test_runtime_openvino.py
                       out=str(tmp_path / "bench.json"))
    assert result["ok"], [r["error"] for r in result["rows"]]
    rows = {(r["backend"], r["precision"], r["variant"]): r for r in result["rows"]}
    assert set(rows) == {("torch", "fp32", "eager"), ("torch", "fp32", "eager+dense"),
                         ("onnxruntime", "fp32", "onnx+dense"), ("onnxruntime", "int8", "onnx+dense")}
    model, _ = load_checkpoint(dense_run["checkpoint"])
    _, _, resized = images
    with torch.no_grad():
        exact = TenCropModel(model.eval(), DENSE_SPEC)(resized).argmax(1)
        dense = DenseTenCropModel(model, DENSE_SPEC)(resized).argmax(1)
    assert rows[("torch", "fp32", "eager")]["agreement_top1"] == 100.0
    assert rows[("torch", "fp32", "eager+dense")]["agreement_top1"] == pytest.approx(
        100 * float((exact == dense).float().mean()))
    assert rows[("torch", "fp32", "eager+dense")]["crops"] == "dense"
    for row in result["rows"]:
        assert row["speedup_vs"].endswith("torch fp32 eager")  # every row against the exact ten crops' eager row
    assert rows[("torch", "fp32", "eager")]["speedup"] == 1.0
    # a dense row costs the trunk on image and mirror (96 px) plus the centre crop and its mirror (64 px)
    from cnnbench.models.complexity import model_flops
    assert rows[("torch", "fp32", "eager+dense")]["flops_per_image"] == 2 * model_flops(model, 96) + 2 * model_flops(
        model, 64)


def test_train_resize_is_the_checkpoint_spec():
    spec = default_spec("resnet26", crop=96, resize=128)
    assert (spec.resize, spec.crop) == (128, 96)
    assert default_spec("resnet26", crop=96).resize == 110  # the 256/224 ratio by default
    from cnnbench.train.loop import TrainConfig, _resolve_spec
    assert _resolve_spec(TrainConfig(arch="resnet26", image_size=96, resize=128)) == spec


def test_dense_centre_choice_is_exported_and_gated_against_the_same_choice(dense_run, images, tmp_path):
    _, _, resized = images
    made = export.export_checkpoints([dense_run["checkpoint"]], ten_crop="dense", dense_centre="interpolate",
                                     tensorrt="off", out=str(tmp_path), parity_images=4, progress=False)
    manifest = made["exports"][0]
    assert made["ok"] and manifest["dense_centre"] == "interpolate"
    model, _ = load_checkpoint(dense_run["checkpoint"])
    with torch.no_grad():
        expected = DenseTenCropModel(model.eval(), DENSE_SPEC, centre="interpolate")(resized)
    got = runtime.load(manifest["export_dir"], backend="onnxruntime", device="cpu").logits_from_images(resized, "dense")
    assert (got - expected).abs().max() <= 1e-3
    from cnnbench.bench.targets import export_target, plan_rows
    plans, _ = plan_rows([export_target(manifest["export_dir"])], "cpu", backends=["onnxruntime"], precisions=["fp32"])
    assert [(p.variant, p.crops) for p in plans] == [("onnx+dense-interpolate", "dense")]  # told apart from "pass"
    with pytest.raises(export.ExportError, match="dense_centre must be one of pass, interpolate, drop"):
        export.export_checkpoints([dense_run["checkpoint"]], ten_crop="dense", dense_centre="skip", tensorrt="off",
                                  out=str(tmp_path))


def test_export_ten_crop_flag_and_its_old_alias(monkeypatch, capsys, dense_run):
    monkeypatch.setattr(sys, "argv", ["cnnbench", "export", dense_run["checkpoint"], "--ten-crop-in-graph",
                                      "--ten-crop", "dense"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 2 and "--ten-crop-in-graph means --ten-crop graph" in capsys.readouterr().err


def test_errors_gallery_in_dense_mode_scores_the_dense_maps_in_the_pointing_game(dense_run, tmp_path):
    from cnnbench.gradcam import errors_gallery

    report = errors_gallery(dense_run["checkpoint"], crops="dense", limit=2, out=tmp_path / "gallery", progress=False)
    assert report["ok"] and report["crops"] == "dense"
    pointing = report["pointing_game"]
    assert set(pointing) == {"explained", "1_crop", "10_crops", "dense", "ideal_map", "by_prediction"}
    assert pointing["by_prediction"]["crops"] == "dense"
    split = pointing["by_prediction"]
    assert split["correct"]["hits"] + split["misclassified"]["hits"] == pointing["dense"]["hits"]
    assert pointing["dense"]["images"] == pointing["10_crops"]["images"] == report["images"]["n_images"]


def test_bench_counts_the_flops_of_the_exports_own_centre_handling(dense_run):
    """An interpolated-centre export runs the trunk twice (image and mirror) and nothing more: its
    %peak must not be computed with the centre pass's FLOPs (it read 131 % of the fp32 peak before)."""
    from cnnbench.bench.costs import Costs
    from cnnbench.bench.targets import BenchTarget
    from cnnbench.models.complexity import model_flops

    model, _ = load_checkpoint(dense_run["checkpoint"])
    costs = Costs("cpu", progress=False)
    source = (dense_run["checkpoint"],)
    flops = {centre: costs.flops_per_image(BenchTarget("m", "/x", "single", source, manifest={"dense_centre": centre}),
                                           "dense")
             for centre in ("pass", "interpolate", "drop")}
    assert flops["interpolate"] == flops["drop"] == 2 * model_flops(model, 96)
    assert flops["pass"] == 2 * model_flops(model, 96) + 2 * model_flops(model, 64)
    assert costs.flops_per_image(BenchTarget("m", "/x", "checkpoint", source), "dense") == flops["pass"]
