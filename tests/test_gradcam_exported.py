"""CAM from exported feature maps vs the reference Grad-CAM; validate_export; gradcam on an export."""
import json
import math
import os

import pytest
import torch

from cnnbench.common import read_json, sha256_file
from cnnbench.data.folder import scan_folder
from cnnbench.data.images import load_rgb
from cnnbench.data.spec import spec_for_crop
from cnnbench.data.split import make_split, save_split
from cnnbench.data.synth import synthesize
from cnnbench.data.transforms import resize_uint8
from cnnbench.export import export_checkpoints, load_manifest
from cnnbench.gradcam import gradcam_images, validate_export
from cnnbench.gradcam.exported import (REFERENCE_LAYER, REFERENCE_METHOD, ExportedCam, cam_gate_report, cam_parity,
                                       compare_maps, load_reference, pearson)
from cnnbench.gradcam.tencrop import image_cam
from cnnbench.models.checkpoint import save_checkpoint
from cnnbench.models.registry import create_model

SPEC = spec_for_crop(64)  # 73 resize: 2x2 feature maps, so maps have structure


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny checkpoints on a small synthetic set; single exports of a ResNet and an Xception (fp32 + fp16,
    CAM output) and an in-graph ten-crop ensemble export of two ResNets (fp32, CAM output)."""
    tmp = tmp_path_factory.mktemp("gradcam-exported")
    root = synthesize(tmp / "data", classes=3, per_class=10, size=80, progress=False)
    split = make_split(scan_folder(root))
    save_split(split, tmp / "split.json")
    torch.manual_seed(0)
    checkpoints = {}
    for name, arch in (("a", "resnet18"), ("b", "resnet26"), ("x", "xception_small"), ("other", "resnet18")):
        model = create_model(arch, 3, width_mult=0.0625)
        path = tmp / "train" / name / "best.pt"
        save_checkpoint(path, model, arch=arch, classes=split.classes, spec=SPEC,
                        record={"split": str(tmp / "split.json"), "data": root})
        checkpoints[name] = str(path)
    singles = export_checkpoints([checkpoints["a"], checkpoints["x"]], ensemble=False, fp16=True, cam_output=True,
                                 out=tmp / "export", tensorrt="off", parity_images=4, progress=False)
    ensemble = export_checkpoints([checkpoints["a"], checkpoints["b"]], ensemble=True, cam_output=True,
                                  ten_crop="graph", out=tmp / "export-ens", tensorrt="off",
                                  parity_images=4, progress=False)
    images = torch.stack([resize_uint8(load_rgb(s.path), SPEC) for s in split.test])
    return {
        "tmp": tmp, "split": split, "checkpoints": checkpoints, "images": images,
        "single": singles["exports"][0]["export_dir"],
        "xception": singles["exports"][1]["export_dir"],
        "ensemble": next(m["export_dir"] for m in ensemble["exports"] if m["kind"] == "ensemble"),
    }


def test_pearson_and_peak_distance_by_hand():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert pearson(a, 2 * a + 1) == pytest.approx(1.0)
    assert pearson(a, 5 - a) == pytest.approx(-1.0)
    # [1, 2, 3, 4] vs [1, 3, 2, 4]: centred (-1.5, -.5, .5, 1.5) . (-1.5, .5, -.5, 1.5) = 4, norms 5 -> 0.8
    assert pearson(a, torch.tensor([[1.0, 3.0], [2.0, 4.0]])) == pytest.approx(0.8)
    zero = torch.zeros(2, 2)
    assert pearson(zero, zero) == 1.0 and pearson(zero, a) == 0.0
    reference, exported = torch.zeros(1, 10, 10), torch.zeros(1, 10, 10)
    reference[0, 0, 0] = 1.0  # peak (x 0, y 0)
    exported[0, 4, 3] = 1.0  # peak (x 3, y 4): 5 pixels away
    row = compare_maps(reference, exported)[0]
    assert row["peak_distance_px"] == 5.0 and row["peak_distance_frac"] == 0.5
    assert row["reference_peak"] == [0, 0] and row["exported_peak"] == [3, 4]


def test_cam_gates():
    rows = [{"correlation": c, "peak_distance_px": 1.0, "peak_distance_frac": 0.1} for c in (0.995, 0.985)]
    fp32, fp16 = cam_gate_report(rows, "fp32"), cam_gate_report(rows, "fp16")
    assert fp32["mean_correlation"] == pytest.approx(0.99) and fp32["min_correlation"] == 0.985
    assert fp16["passed"] and fp16["gates"]["mean_correlation"]["limit"] == 0.98
    assert not cam_gate_report(rows[1:], "fp32")["passed"]
    int8 = cam_gate_report(rows[1:], "int8")
    assert int8["passed"] and int8["gates"]["mean_correlation"] == {"value": 0.985, "op": ">=", "limit": 0.95,
                                                                     "passed": True}
    with pytest.raises(ValueError, match="precision"):
        cam_gate_report(rows, "bf16")


@pytest.mark.parametrize("export", ["single", "xception"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_exported_cam_matches_reference_gradcam(setup, export, precision):
    manifest = load_manifest(setup[export])
    reference, _ = load_reference(manifest)
    images = setup["images"]
    ref = image_cam(reference, images, SPEC, crops=10, method=REFERENCE_METHOD, layer=REFERENCE_LAYER)
    exported = ExportedCam(manifest, precision).image_cams(images, 10, [ref.targets])[0]
    assert ref.maps.max() > 0
    # Same map in the same (logit) units: CAM of the exported features == Grad-CAM x h*w.
    tolerance = 1e-4 if precision == "fp32" else 2e-2
    torch.testing.assert_close(exported.maps, ref.maps, rtol=tolerance, atol=tolerance * float(ref.maps.max()))
    report = cam_parity(manifest, images, precision)
    assert report["passed"] and report["n_images"] == len(images)
    assert report["mean_correlation"] >= (0.99 if precision == "fp32" else 0.98)
    assert report["min_correlation"] <= report["mean_correlation"]


def test_in_graph_ten_crop_ensemble_export(setup):
    manifest = load_manifest(setup["ensemble"])
    assert manifest["ten_crop_in_graph"] and manifest["kind"] == "ensemble"
    exported = ExportedCam(manifest, "fp32")
    assert exported.feature_names == ["features_0", "features_1"]
    reference, _ = load_reference(manifest)
    images = setup["images"]
    ref = image_cam(reference, images, SPEC, crops=10, method=REFERENCE_METHOD, layer=REFERENCE_LAYER)
    got = exported.image_cams(images, 10)[0]  # the export's own prediction
    assert got.targets.tolist() == ref.targets.tolist()
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.maps, ref.maps, rtol=1e-4, atol=1e-4 * float(ref.maps.max()))
    assert cam_parity(manifest, images, "fp32")["passed"]
    with pytest.raises(ValueError, match="ten crops inside its graph"):
        exported.image_cams(images, 1)


def test_cam_gate_fails_against_another_model(setup):
    """The gate can fail: the same export compared with an unrelated reference model."""
    manifest = load_manifest(setup["single"])
    other = create_model("resnet18", 3, width_mult=0.0625)
    torch.manual_seed(123)
    for p in other.parameters():
        torch.nn.init.normal_(p)
    report = cam_parity(manifest, setup["images"], "fp32", reference=other.eval())
    assert not report["passed"] and report["mean_correlation"] < 0.99


def test_gradcam_images_with_an_export(setup, tmp_path):
    paths = [s.path for s in setup["split"].test[:2]]
    result = gradcam_images(paths, model=setup["single"], out=tmp_path / "panels", progress=False, precision="fp16")
    json.dumps(result)
    assert result["ok"], result
    assert result["kind"] == "export" and result["cam_parity"]["passed"]
    assert result["cam_parity"]["n_images"] == 2
    for item in result["results"]:
        assert item["cam_correlation"] >= 0.98 and os.path.isfile(item["panel"])
        assert 0 <= item["peak_distance_frac"] <= math.sqrt(2)


def test_an_export_gives_its_last_layer_cam_only(setup, tmp_path):
    path = setup["split"].test[0].path
    for asked in ({"method": "layercam"}, {"layer": "last-1"}):
        result = gradcam_images([path], model=setup["single"], out=tmp_path / "p", progress=False, **asked)
        assert not result["ok"] and "needs a checkpoint" in result["error"]
    named = gradcam_images([path], model=setup["single"], out=tmp_path / "p", progress=False, method="gradcam",
                           layer="last")  # what its CAM is: accepted
    assert named["ok"] and named["method"] == "CAM of the exported feature map"


def test_gradcam_images_refuses_an_export_without_cam_output(setup, tmp_path):
    plain = export_checkpoints([setup["checkpoints"]["a"]], out=tmp_path / "plain", tensorrt="off",
                               parity_images=2, progress=False)["exports"][0]["export_dir"]
    result = gradcam_images([setup["split"].test[0].path], model=plain, out=tmp_path / "p", progress=False)
    assert not result["ok"] and "cam_output" in result["error"]


def test_validate_export_passes_and_writes_its_report(setup, tmp_path):
    out = tmp_path / "validation"
    report = validate_export(setup["single"], out=out, progress=False)
    assert report["ok"], report["problems"]
    assert read_json(out / "validation.json") == json.loads(json.dumps(report))
    n = len(setup["split"].test)
    assert report["images"]["n_images"] == n
    for precision in ("fp32", "fp16"):
        artifact = report["artifacts"][precision]
        assert artifact["parity"]["passed"] and artifact["parity"]["n_images"] == n
        assert artifact["cam"]["passed"] and artifact["cam"]["n_images"] == n
        moved = artifact["moved_most"]
        assert 1 <= len(moved) <= 4 and all(os.path.isfile(m["panel"]) for m in moved)
        assert [m["correlation"] for m in moved] == sorted(m["correlation"] for m in moved)
    assert report["artifacts"]["fp32"]["top1_differs"] == []


def test_validate_export_against_a_mismatched_reference_fails_with_panels(setup, tmp_path):
    """An export whose manifest names another checkpoint as its source: the gates fail, and every
    image whose top-1 differs gets a panel."""
    export_dir = tmp_path / "mismatched"
    export_dir.mkdir()
    for name in os.listdir(setup["single"]):
        if os.path.isfile(os.path.join(setup["single"], name)):
            (export_dir / name).write_bytes(open(os.path.join(setup["single"], name), "rb").read())
    manifest = read_json(export_dir / "manifest.json")
    other = setup["checkpoints"]["other"]
    manifest["sources"] = [{**manifest["sources"][0], "path": other, "sha256": sha256_file(other)}]
    (export_dir / "manifest.json").write_text(json.dumps(manifest))
    report = validate_export(export_dir, progress=False, limit=5)
    assert not report["ok"] and report["problems"]
    # limit caps the Grad-CAM comparison only: the parity gates see the whole (small) split.
    n = len(setup["split"].test)
    assert n > 5 and report["images"]["n_images"] == n and report["images"]["cam_images"] == 5
    fp32 = report["artifacts"]["fp32"]
    assert fp32["parity"]["n_images"] == n and fp32["cam"]["n_images"] == 5
    assert not fp32["parity"]["passed"] and not fp32["cam"]["passed"]
    assert fp32["top1_differs"], "an unrelated model should disagree on some of the images"
    for entry in fp32["top1_differs"]:
        assert entry["reference"] != entry["exported"] and os.path.isfile(entry["panel"])
    assert os.path.isfile(export_dir / "validation" / "validation.json")


def test_validate_export_reports_bad_input(tmp_path):
    result = validate_export(tmp_path / "nothing", progress=False)
    assert not result["ok"] and "manifest" in result["error"]


def test_validate_gates_the_cam_of_an_int8_export(tmp_path_factory):
    """An --int8 --cam-output export validates: its CAM has a gate like every other precision's."""
    from cnnbench.export.parity import CAM_GATES
    from runtime_testlib import tiny_run

    run = tiny_run(tmp_path_factory.getbasetemp())
    out = tmp_path_factory.mktemp("int8-cam")
    manifest = export_checkpoints([run["checkpoint"]], int8=True, cam_output=True, tensorrt="off", out=out,
                                  calibration_images=8, progress=False)["exports"][0]
    report = validate_export(manifest["export_dir"], limit=4, progress=False)
    assert "error" not in report, report.get("error")
    cam = report["artifacts"]["int8"]["cam"]
    assert cam["n_images"] == 4 and cam["gates"]["mean_correlation"]["limit"] == CAM_GATES["int8"]["mean_correlation"][1]
    assert cam["passed"] == (cam["mean_correlation"] >= CAM_GATES["int8"]["mean_correlation"][1])
    # 8-bit activations move the maps, but far less than an unrelated model would.
    assert 0.9 < cam["mean_correlation"] < 1.0
    assert report["artifacts"]["fp32"]["cam"]["mean_correlation"] > 0.99999
