"""export_checkpoints end to end on tiny checkpoints: folders, manifests, hashes, parity on the saved
test split, ensembles, tampering caught before use, failed gates reported without hiding the export."""
import json
import os
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from cnnbench import export

import cnnbench.export.pipeline  # noqa: F401  (loads the submodule)
from cnnbench.common import sha256_file
from cnnbench.data.folder import scan_folder
from cnnbench.data.spec import spec_for_crop
from cnnbench.data.split import make_split, save_split
from cnnbench.data.synth import synthesize
from cnnbench.export import (ExportError, artifact_path, export_checkpoints, format_parity_table, load_cam_weights,
                    load_manifest, make_ort_session)
from cnnbench.export.manifest import verified_bytes
from cnnbench.models import create_model, load_checkpoint, save_checkpoint

SPEC = spec_for_crop(48)
ARCHS = {"r18": "resnet18", "xs": "xception_small"}


def _checkpoint(path, arch, classes, split_path, spec=SPEC, seed=0):
    torch.manual_seed(seed)
    model = create_model(arch, len(classes), width_mult=0.125)
    save_checkpoint(path, model, arch=arch, classes=classes, spec=spec, record={"split": str(split_path), "epochs": 0})
    return model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs/train/{r18,xs}/best.pt trained on nothing, with a saved split of a small synthetic set."""
    base = tmp_path_factory.mktemp("export-pipeline")
    index = scan_folder(synthesize(base / "synth", classes=8, per_class=4, size=64, progress=False))
    split = make_split(index, test_fraction=0.25, seed=0)
    train = base / "runs" / "train"
    for seed, (name, arch) in enumerate(ARCHS.items()):
        (train / name).mkdir(parents=True)
        save_split(split, train / name / "split.json")
        _checkpoint(train / name / "best.pt", arch, index.classes, train / name / "split.json", seed=seed)
    return {"base": base, "train": train, "index": index, "split": split}


@pytest.fixture(scope="module")
def exported(runs):
    out = runs["base"] / "runs" / "export"
    result = export_checkpoints(train_dir=runs["train"], out=out, fp16=True, cam_output=True, tensorrt="off",
                                parity_images=64, progress=False)
    return result, out


def test_exports_every_checkpoint_and_their_ensemble_with_passing_parity(runs, exported):
    result, out = exported
    json.dumps(result)  # the CLI prints it with --json
    assert result["ok"] and result["failures"] == []
    assert result["tensorrt"] == "skipped: --tensorrt off"
    assert [m["name"] for m in result["exports"]] == ["r18", "xs", "ensemble-r18+xs"]
    assert sorted(os.listdir(out)) == ["ensemble-r18+xs", "r18", "xs"]
    for manifest in result["exports"]:
        assert sorted(os.listdir(out / manifest["name"])) == ["cam_weights.npz", "manifest.json", "model.onnx",
                                                               "model_fp16.onnx"]
        parity = manifest["parity"]
        assert parity["passed"] and set(parity["artifacts"]) == {"model.onnx", "model_fp16.onnx"}
        # Held-out images: the checkpoint's saved test split, all of it (fewer than parity_images).
        assert parity["images"]["source"] == "test split"
        assert parity["images"]["n_images"] == len(runs["split"].test)
        for report in parity["artifacts"].values():
            assert report["n_images"] == len(runs["split"].test) and report["runtime"] == "onnxruntime-cpu"
            assert set(report["gates"]) == ({"top1_agreement", "max_abs_diff"} if report["precision"] == "fp32"
                                            else {"top1_agreement", "top5_agreement", "mean_abs_diff"})
    table = format_parity_table(result["exports"])
    assert len(table.splitlines()) == 2 + 6 and "FAIL" not in table


def test_manifest_records_sources_spec_io_versions_and_hashes(runs, exported):
    _, out = exported
    manifest = load_manifest(out / "ensemble-r18+xs")
    on_disk = json.loads((out / "ensemble-r18+xs" / "manifest.json").read_text())
    assert "export_dir" not in on_disk and manifest["export_dir"] == str(out / "ensemble-r18+xs")
    assert manifest["format_version"] == 1 and manifest["kind"] == "ensemble"
    assert [s["name"] for s in manifest["sources"]] == ["r18", "xs"]
    for source, arch in zip(manifest["sources"], ARCHS.values()):
        assert source["arch"] == arch and source["sha256"] == sha256_file(source["path"]) and source["params"] > 0
    assert manifest["classes"] == runs["index"].classes and manifest["spec"] == SPEC.to_dict()
    assert manifest["io"]["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["batch", 3, 48, 48]}]
    assert [o["name"] for o in manifest["io"]["outputs"]] == ["logits", "features_0", "features_1"]
    assert manifest["opset"] == 17 and manifest["ten_crop_in_graph"] is False and manifest["cam_output"] is True
    assert set(manifest["versions"]) == {"torch", "onnx", "onnxruntime"}
    for entry in manifest["artifacts"]:
        path = out / "ensemble-r18+xs" / entry["file"]
        assert entry["sha256"] == sha256_file(path) and entry["bytes"] == path.stat().st_size
    assert artifact_path(manifest, "fp16") == str(out / "ensemble-r18+xs" / "model_fp16.onnx")
    assert verified_bytes(manifest, "fp32") == (out / "ensemble-r18+xs" / "model.onnx").read_bytes()
    with pytest.raises(ExportError, match="no tensorrt artifact in fp32 .available: onnx/fp32, onnx/fp16"):
        artifact_path(manifest, "fp32", "tensorrt")


def test_cam_weights_are_the_members_classifiers(runs, exported):
    _, out = exported
    weights = load_cam_weights(load_manifest(out / "ensemble-r18+xs"))
    for (weight, bias), name in zip(weights, ARCHS):
        model, _ = load_checkpoint(runs["train"] / name / "best.pt")
        np.testing.assert_array_equal(weight, model.classifier.weight.detach().numpy())
        np.testing.assert_array_equal(bias, model.classifier.bias.detach().numpy())


def test_ensemble_export_outputs_the_sum_of_its_members_exports(runs, exported):
    _, out = exported
    batch = np.random.default_rng(0).normal(size=(3, 3, 48, 48)).astype(np.float32)

    def logits(name):
        session = make_ort_session(artifact_path(load_manifest(out / name)))
        return session.run(["logits"], {"input": batch})[0]

    np.testing.assert_allclose(logits("ensemble-r18+xs"), logits("r18") + logits("xs"), rtol=0, atol=1e-4)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("file", ["model.onnx", "model_fp16.onnx", "cam_weights.npz"])
def test_a_damaged_file_is_refused_before_use(exported, tmp_path, damage, file):
    _, out = exported
    folder = tmp_path / "r18"
    shutil.copytree(out / "r18", folder)
    load_manifest(folder)  # intact copy loads
    path = folder / file
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        expected = "sha256 .* does not match the manifest"
    elif damage == "truncate":
        path.write_bytes(bytes(data[:-10]))
        expected = r"\d+ bytes but the manifest says \d+ \(truncated"
    else:
        path.unlink()
        expected = "listed in the manifest but missing"
    with pytest.raises(ExportError, match=f"{file}: {expected}"):
        load_manifest(folder)
    with pytest.raises(ExportError, match="no export manifest here"):
        load_manifest(tmp_path)


def test_a_manifest_that_is_not_one_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ExportError, match="not a valid manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(ExportError, match="missing key"):
        load_manifest(tmp_path / "manifest.json")


def test_ensemble_of_checkpoints_with_different_classes_is_an_error(runs, tmp_path):
    other = list(runs["index"].classes)
    other[3] = "004.something-else"
    _checkpoint(tmp_path / "a" / "best.pt", "resnet18", runs["index"].classes, "none")
    _checkpoint(tmp_path / "b" / "best.pt", "resnet26", other, "none")
    paths = [str(tmp_path / "a" / "best.pt"), str(tmp_path / "b" / "best.pt")]
    with pytest.raises(ExportError, match=r"cannot ensemble a and b: their class lists differ "
                                          r"\(first difference at index 3: '004.square-striped' vs '004.something-else'\)"):
        export_checkpoints(paths, out=tmp_path / "export", tensorrt="off", progress=False)
    assert not (tmp_path / "export").exists()  # refused before any work


def test_ensemble_of_checkpoints_with_different_preprocessing_is_an_error(runs, tmp_path):
    classes = runs["index"].classes
    _checkpoint(tmp_path / "a" / "best.pt", "resnet18", classes, "none")
    _checkpoint(tmp_path / "b" / "best.pt", "resnet18", classes, "none", spec=spec_for_crop(40))
    paths = [str(tmp_path / "a" / "best.pt"), str(tmp_path / "b" / "best.pt")]
    with pytest.raises(ExportError, match="preprocessing differs .resize 55 vs 46, crop 48 vs 40"):
        export_checkpoints(paths, ensemble=True, out=tmp_path / "export", tensorrt="off", progress=False)
    with pytest.raises(ExportError, match="an ensemble needs at least two checkpoints"):
        export_checkpoints(paths[:1], ensemble=True, out=tmp_path / "export", tensorrt="off", progress=False)


def test_no_checkpoint_found_is_a_clear_error(tmp_path):
    with pytest.raises(ExportError, match=r"none found as .*best.pt: train first"):
        export_checkpoints(train_dir=tmp_path, out=tmp_path / "export", tensorrt="off", progress=False)
    with pytest.raises(ExportError, match="checkpoint file not found"):
        export_checkpoints([str(tmp_path / "x" / "best.pt")], out=tmp_path / "export", tensorrt="off", progress=False)


def test_ten_crop_in_graph_export_on_the_data_folder(runs, tmp_path, capsys):
    checkpoint = str(runs["train"] / "r18" / "best.pt")
    result = export_checkpoints([checkpoint], ten_crop="graph", fp16=True, tensorrt="off", parity_images=5,
                                data=runs["index"].root, out=tmp_path / "export", progress=True)
    assert result["ok"], result["failures"]
    (manifest,) = result["exports"]
    assert manifest["ten_crop_in_graph"] is True and manifest["cam_weights"] is None
    assert manifest["io"]["inputs"] == [{"name": "images", "dtype": "uint8", "shape": ["batch", 3, 55, 55]}]
    assert manifest["io"]["crops_per_image"] == 10
    assert manifest["parity"]["images"]["source"] == "seed-0 split of a folder"
    assert manifest["parity"]["images"]["n_images"] == 5
    assert manifest["parity"]["images"]["input"] == "resized uint8 image"
    captured = capsys.readouterr()
    assert captured.out == "" and "[export] r18: model_fp16.onnx parity on 5 images" in captured.err


def test_failed_gate_still_writes_the_manifest_and_reports_not_ok(runs, tmp_path, monkeypatch):
    """A broken exporter (here: the classifier bias shifted by 0.01 after export) is caught by parity."""
    real_export = export.pipeline.export_onnx

    def broken_export(model, path, **kwargs):
        info = real_export(model, path, **kwargs)
        proto = onnx.load(path)
        (gemm,) = [node for node in proto.graph.node if node.op_type == "Gemm"]  # the classifier
        for init in proto.graph.initializer:
            if init.name == gemm.input[2]:
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 0.01, init.name))
        onnx.save(proto, path)
        return info

    monkeypatch.setattr(export.pipeline, "export_onnx", broken_export)
    checkpoint = str(runs["train"] / "xs" / "best.pt")
    result = export_checkpoints([checkpoint], tensorrt="off", out=tmp_path / "export", progress=False)
    assert result["ok"] is False
    (failure,) = result["failures"]
    assert failure.startswith("xs/model.onnx (onnxruntime-cpu): fp32 parity failed: max_abs_diff = 0.01")
    assert "limit <= 0.001; it would pass with a limit <= 0.01" in failure
    on_disk = load_manifest(tmp_path / "export" / "xs")  # hashes match: the file is what was measured
    assert on_disk["parity"]["passed"] is False
    assert on_disk["parity"]["artifacts"]["model.onnx"]["gates"]["max_abs_diff"]["passed"] is False


def test_reexport_without_fp16_removes_the_stale_fp16_graph(runs, tmp_path):
    checkpoint = str(runs["train"] / "r18" / "best.pt")
    export_checkpoints([checkpoint], fp16=True, tensorrt="off", out=tmp_path, parity_images=4, progress=False)
    assert (tmp_path / "r18" / "model_fp16.onnx").exists()
    export_checkpoints([checkpoint], tensorrt="off", out=tmp_path, parity_images=4, progress=False)
    assert sorted(os.listdir(tmp_path / "r18")) == ["manifest.json", "model.onnx"]


def test_bad_options_are_errors(runs, tmp_path):
    checkpoint = [str(runs["train"] / "r18" / "best.pt")]
    with pytest.raises(ExportError, match="tensorrt must be one of"):
        export_checkpoints(checkpoint, tensorrt="maybe", out=tmp_path)
    with pytest.raises(ExportError, match="max_batch must be a positive integer"):
        export_checkpoints(checkpoint, tensorrt="off", max_batch=0, out=tmp_path)
    with pytest.raises(ExportError, match="parity_images must be a positive integer"):
        export_checkpoints(checkpoint, tensorrt="off", parity_images=0, out=tmp_path)
    with pytest.raises(ExportError, match="cannot read the parity images: data folder not found"):
        export_checkpoints(checkpoint, tensorrt="off", data=tmp_path / "nowhere", out=tmp_path, progress=False)


def test_data_means_the_test_part_of_the_folders_seed_0_split(runs, tmp_path):
    """--data is the same held-out set as eval/validate/bench use, never the training images."""
    checkpoint = str(runs["train"] / "r18" / "best.pt")
    root = runs["index"].root
    result = export_checkpoints([checkpoint], tensorrt="off", parity_images=1000, data=root, out=tmp_path,
                                progress=False)
    images = result["exports"][0]["parity"]["images"]
    test = make_split(scan_folder(root), seed=0).test
    assert images["source"] == "seed-0 split of a folder" and images["path"] == os.path.abspath(root)
    assert images["n_images"] == len(test) < len(runs["index"].samples)
