"""run_bench on a tiny trained-format checkpoint and its export: rows, files, --compare, references."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch

from cnnbench import export
from cnnbench import runtime
from cnnbench.bench import render_table, run_bench
from cnnbench.bench.report import CSV_COLUMNS
from cnnbench.bench.costs import Costs
from cnnbench.bench.run import _Session
from cnnbench.bench.scores import Scores
from cnnbench.bench.targets import BenchTarget, export_target, find_targets, plan_rows
from cnnbench.common import accuracy_report
from cnnbench.data.folder import scan_folder
from cnnbench.data.images import load_rgb
from cnnbench.data.spec import spec_for_crop
from cnnbench.data.split import load_split, make_split, save_split
from cnnbench.data.synth import synthesize
from cnnbench.data.crops import eval_transform
from cnnbench.models.checkpoint import save_checkpoint
from cnnbench.models.complexity import model_flops
from cnnbench.models.registry import create_model
from cnnbench.runtime import selection
from cnnbench.runtime.openvino_backend import openvino_problem

# OpenVINO is a dependency on x86-64 Linux; elsewhere its rows are skipped (and said so).
OPENVINO = [] if openvino_problem("cpu") else ["openvino"]

CLASSES, CROP = 3, 32
ROW_FIELDS = {"target", "kind", "source", "backend", "precision", "variant", "device", "mode", "batch",
              "crops_per_image", "images_per_s", "crops_per_s", "p50_ms", "p90_ms", "p99_ms", "mean_ms",
              "stddev_ms", "cv", "unstable", "iterations", "warmup", "host_peak_rss_mib", "cuda_max_allocated_mib",
              "flops_per_image", "achieved_flops_per_s", "peak_flops_per_s", "peak_fraction", "eval_images", "top1",
              "top5", "agreement_top1", "reference", "gates_passed", "gate_failures", "gate_reference", "speedup",
              "error"}


def _checkpoint(path, split_path, classes, seed, record_split=True):
    torch.manual_seed(seed)
    model = create_model("resnet26", num_classes=len(classes), width_mult=0.125).eval()
    record = {"split": split_path} if record_split else {}
    save_checkpoint(path, model, arch="resnet26", classes=classes, spec=spec_for_crop(CROP), record=record)
    return model


@pytest.fixture(autouse=True)
def quick_and_steady(monkeypatch, one_intra_op_thread):
    """Small matmuls for the peak (these tests check the bookkeeping; test_bench_harness the peak itself),
    and one intra-op thread (tests/conftest.py)."""
    monkeypatch.setattr("cnnbench.bench.peak._SIDES", {"cpu": (256,), "cuda": (1024,)})
    monkeypatch.setattr("cnnbench.bench.peak._SECONDS_PER_KERNEL", {"cpu": 0.02, "cuda": 0.02})


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    data = synthesize(root / "data", classes=CLASSES, per_class=4, size=48, progress=False)
    split = make_split(scan_folder(data), test_fraction=0.5, seed=0)
    split_path = str(root / "split.json")
    save_split(split, split_path)
    model = _checkpoint(root / "train" / "tiny" / "best.pt", split_path, split.classes, seed=0)
    export.export_checkpoints(None, fp16=True, out=root / "export", train_dir=root / "train", parity_images=4,
                              tensorrt="off", progress=False)
    return {"root": root, "split": split_path, "classes": split.classes, "model": model}


def _independent_ten_crop_accuracy(model, split_path):
    """Top-1/top-5 by the training code's own ten-crop transform, without the runtime or the bench."""
    split = load_split(split_path)
    transform = eval_transform(spec_for_crop(CROP), crops=10)
    with torch.no_grad():
        logits = torch.stack([model(transform(load_rgb(s.path))).mean(0) for s in split.test]).numpy()
    return accuracy_report(logits, np.array([s.label for s in split.test]))


def test_run_bench_rows_files_and_compare(workspace):
    root = workspace["root"]
    dirs = dict(train_dir=root / "train", export_dir=root / "export", progress=False)
    first = run_bench(batch=2, iters=2, warmup=1, mode="both", precisions=["fp32"], out=str(root / "b1.json"),
                      workers=1, **dirs)
    assert first["ok"], [r["error"] for r in first["rows"]]
    rows = first["rows"]
    backends = ["torch", "onnxruntime", *OPENVINO]
    assert [(r["backend"], r["mode"]) for r in rows] == [(b, m) for m in ("compute", "end-to-end") for b in backends]
    flops = 10 * model_flops(workspace["model"], CROP)
    expected = _independent_ten_crop_accuracy(workspace["model"], workspace["split"])
    baseline = {r["mode"]: r for r in rows if r["backend"] == "torch"}
    for row in rows:
        assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
        assert row["error"] is None and row["device"] == "cpu" and row["batch"] == 2
        assert row["iterations"] == 2 and row["warmup"] == 1
        assert row["crops_per_s"] == pytest.approx(10 * row["images_per_s"])
        assert row["images_per_s"] == pytest.approx(2 / (row["mean_ms"] / 1e3))
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["host_peak_rss_mib"] > 0 and row["cuda_max_allocated_mib"] is None
        assert row["flops_per_image"] == flops
        assert row["achieved_flops_per_s"] == pytest.approx(flops * row["images_per_s"])
        assert row["peak_fraction"] == pytest.approx(row["achieved_flops_per_s"] / first["peaks"]["fp32"]["flops"])
        assert row["eval_images"] == len(load_split(workspace["split"]).test)
        assert row["top1"] == pytest.approx(expected["top1"]) and row["top5"] == pytest.approx(expected["top5"])
        assert row["agreement_top1"] == 100.0 and row["reference"] == "torch fp32 eager, exact ten crops"
        # Every fp32 row passes the fp32 parity gates against the same reference.
        assert row["gates_passed"] is True and row["gate_failures"] is None and row["max_abs_diff"] <= 1e-3
        assert row["gate_reference"] == row["reference"] and row["peak_precision"] == "fp32"
        assert row["variant"] == ("eager" if row["backend"] == "torch" else "onnx")
        assert row["speedup"] == pytest.approx(row["images_per_s"] / baseline[row["mode"]]["images_per_s"])
    for row in rows[len(backends):]:
        assert row["mode"] == "end-to-end" and row["preprocess"] == "host"
        assert row["stage_model_ms"] + row["stage_input_wait_ms"] == pytest.approx(row["mean_ms"], rel=1e-6)
        assert row["stage_decode_ms"] > 0 and row["stage_resize_ms"] > 0

    # What --backend auto reads: the export's fastest verified fp32 compute row, beside its manifest.
    export_rows = [r for r in rows if r["backend"] != "torch" and r["mode"] == "compute"]
    fastest = max(export_rows, key=lambda r: r["images_per_s"])["backend"]
    assert {k: v for k, v in first["backend_choices"]["tiny"].items() if k != "record"} == {"fp32": fastest}
    manifest = export.load_manifest(root / "export" / "tiny")
    assert selection.recorded_choice(manifest, "cpu", "fp32") == fastest
    assert runtime.load(root / "export" / "tiny", device="cpu").backend == fastest
    assert "--backend auto on this machine" in render_table(first)

    with open(first["json"], encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["schema_version"] == 1 and saved["rows"] == json.loads(json.dumps(rows))
    assert saved["machine"]["cpu_cores"] >= 1 and saved["machine"]["onnxruntime"]
    with open(first["csv"], newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(CSV_COLUMNS) and len(table) == len(rows)
    assert float(table[0]["images_per_s"]) == pytest.approx(rows[0]["images_per_s"])
    with open(first["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    second = run_bench(batch=2, iters=1, warmup=0, mode="compute", precisions=["fp32", "fp16"],
                       out=str(root / "b2.json"), compare=first["json"], **dirs)
    comparison = second["comparison"]
    old = {(r["backend"], r["precision"]): r for r in rows if r["mode"] == "compute"}
    assert {(c["backend"], c["precision"]) for c in comparison["rows"]} == set(old)
    for c in comparison["rows"]:
        new = next(r for r in second["rows"] if (r["backend"], r["precision"]) == (c["backend"], c["precision"]))
        assert c["throughput_ratio"] == pytest.approx(new["images_per_s"] / old[(c["backend"], c["precision"])]["images_per_s"])
    assert any("onnxruntime fp16" in u for u in comparison["unmatched"])
    text = render_table(second)
    assert "tiny" in text and "compared with" in text and "fp16" in text


def test_default_plan_has_the_reference_its_fast_variant_and_every_artifact(workspace, monkeypatch):
    root = workspace["root"]
    models = find_targets(None, str(root / "train"), str(root / "export"))
    assert [m.kind for m in models] == ["checkpoint", "single"]
    monkeypatch.setattr("cnnbench.runtime.openvino_backend.cpu_has_fast_bf16", lambda: False)
    rows, skipped = plan_rows(models, "cpu")
    openvino = [(b, p, "onnx") for b in OPENVINO for p in ("fp32", "fp16")]
    assert [(r.backend, r.precision, r.variant) for r in rows] == [
        ("torch", "fp32", "eager"), ("torch", "bf16", "channels_last"),
        ("onnxruntime", "fp32", "onnx"), ("onnxruntime", "fp16", "onnx"), *openvino]
    assert rows[0].is_baseline and not rows[1].is_baseline and skipped == []
    if OPENVINO:
        # Where the CPU has bf16 units, OpenVINO also runs the fp32 graph in bf16; never on CUDA.
        monkeypatch.setattr("cnnbench.runtime.openvino_backend.cpu_has_fast_bf16", lambda: True)
        rows, _ = plan_rows(models, "cpu", backends=["openvino"])
        assert [(r.precision, r.variant) for r in rows] == [("fp32", "onnx"), ("bf16", "onnx"), ("fp16", "onnx")]
        rows, skipped = plan_rows(models, "cuda", backends=["openvino"])
        assert rows == [] and [s for s in skipped if "openvino" in s and "CPU only" in s]
    # A bare name finds both the run and the export of that name.
    assert [m.kind for m in find_targets(["tiny"], str(root / "train"), str(root / "export"))] == ["checkpoint", "single"]
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        find_targets(["nothing"], str(root / "train"), str(root / "export"))
    with pytest.raises(ValueError, match="unknown backend"):
        plan_rows(models, "cpu", backends=["tflite"])


def test_ensemble_reference_is_the_sum_of_its_members_logits(workspace, tmp_path):
    root = workspace["root"]
    first = str(root / "train" / "tiny" / "best.pt")
    second = str(tmp_path / "other" / "best.pt")
    _checkpoint(second, workspace["split"], workspace["classes"], seed=1)
    ensemble = BenchTarget(
        name="pair", path=str(tmp_path), kind="ensemble", sources=(first, second),
        manifest={"spec": spec_for_crop(CROP).to_dict(), "classes": workspace["classes"], "artifacts": []})
    session = _Session("cpu", 2, dict(iters=1, seconds=None, warmup=0), None, None, False,
                       Scores("cpu", 2, None, None, None, False), Costs("cpu", False))
    evalset = session.scores.eval_set(ensemble)
    reference, description = session.scores.reference(ensemble, evalset)
    images = evalset.images(spec_for_crop(CROP))
    members = [runtime.load(p, backend="torch", precision="fp32").logits_from_images(images).numpy()
               for p in (first, second)]
    np.testing.assert_allclose(reference, members[0] + members[1], rtol=1e-5, atol=1e-5)
    assert "sum" in description
    # The ensemble's torch row computes the same sum through models.Ensemble.
    plans, _ = plan_rows([ensemble], "cpu", backends=["torch"])
    assert [(p.backend, p.variant) for p in plans] == [("torch", "eager")]
    row = session.measure(plans[0], ["compute"])[0]
    assert row["error"] is None and row["agreement_top1"] == 100.0
    assert row["flops_per_image"] == 2 * 10 * model_flops(workspace["model"], CROP)


def test_export_whose_checkpoint_is_gone_is_checked_against_its_fp32_graph(workspace, tmp_path):
    copy = tmp_path / "export" / "orphan"
    shutil.copytree(workspace["root"] / "export" / "tiny", copy)
    with open(copy / "manifest.json", encoding="utf-8") as f:
        manifest = json.load(f)
    manifest["sources"][0]["path"] = str(tmp_path / "deleted.pt")
    with open(copy / "manifest.json", "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    model = export_target(str(copy))
    assert model.sources == () and "no longer exists" in model.missing_sources[0]
    result = run_bench([str(copy)], batch=2, iters=1, warmup=0, data=workspace["root"] / "data",
                       precisions=["fp32"], out=str(tmp_path / "b.json"), progress=False)
    assert [row["backend"] for row in result["rows"]] == ["onnxruntime", *OPENVINO]
    for row in result["rows"]:
        assert row["error"] is None and row["reference"].startswith("fp32 ONNX")
        assert row["agreement_top1"] == 100.0 and row["speedup"] is None and row["flops_per_image"] is None
        assert row["top1"] is not None  # --data gave labelled images
        assert row["gates_passed"] is True and row["gate_reference"] == row["reference"]
    # Without --data, the test split the export's parity check read is still found.
    result = run_bench([str(copy)], batch=2, iters=1, warmup=0, precisions=["fp32"], out=str(tmp_path / "c.json"),
                       progress=False)
    assert result["eval_sets"][0]["source"] == os.path.abspath(workspace["split"])
    assert result["rows"][0]["eval_images"] == len(load_split(workspace["split"]).test)


def test_without_a_split_compute_times_random_pixels_and_end_to_end_says_why_not(workspace, tmp_path):
    _checkpoint(tmp_path / "train" / "nosplit" / "best.pt", workspace["split"], workspace["classes"], seed=2,
                record_split=False)
    result = run_bench(batch=2, iters=1, warmup=0, mode="both", backends=["torch"], precisions=["fp32"],
                       train_dir=tmp_path / "train", export_dir=tmp_path / "none", out=str(tmp_path / "b.json"),
                       progress=False)
    compute, end_to_end = result["rows"]
    assert compute["error"] is None and compute["images_per_s"] > 0
    assert compute["top1"] is None and compute["agreement_top1"] is None and "random pixels" in compute["reference"]
    assert "end-to-end mode reads image files" in end_to_end["error"] and not result["ok"]
    assert os.path.isfile(result["json"])
