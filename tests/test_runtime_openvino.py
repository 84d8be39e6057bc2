"""The OpenVINO backend runs the export folder's graphs (fp32, fp16, int8 QDQ, in-graph ten crops, dense, the
ensemble) with the logits ONNX Runtime and PyTorch give, from the bytes the manifest's hash check read; and
`--backend auto` picks what the last bench verified fastest on this machine (runtime.selection).

fp32 tolerance: both runtimes compute IEEE fp32 with their own kernel orders, so their logits differ by
rounding only: max |Δ| <= 1e-4 against ONNX Runtime, and the fp32 parity gate (export.parity.GATES)
against PyTorch. int8 on these tiny models: the two runtimes quantise the same QDQ graph with different
kernels (rounding of requantisation), so only what is robust is asserted (shapes, finite logits, the gate
report's form); the top-1 agreement is printed. No test depends on the CPU's flags: bf16 is checked where
OpenVINO offers it and its refusal with the CPU's answer patched.
"""
import json
import os
import shutil

import pytest
import torch

from cnnbench import export, runtime
from cnnbench.export.parity import GATES, apply_gates, compare_logits, top1_agreement
from cnnbench.runtime import selection
from cnnbench.runtime.openvino_backend import (OpenVinoPredictor, compile_config, graph_for, openvino_precisions,
                                               openvino_problem)
from cnnbench.runtime.pipeline import run_files
from runtime_testlib import DENSE_SPEC, reference, run, tampered_copy, tiny_run  # noqa: F401 (shared fixtures)

pytestmark = pytest.mark.skipif(openvino_problem("cpu") is not None, reason=str(openvino_problem("cpu")))
THREADS = 1  # steady on a shared 2-core machine; the kernels' results do not depend on it


@pytest.fixture(scope="module")
def exports(run, tmp_path_factory):
    """{"host": crops outside (fp32, fp16, int8), "graph": in-graph ten crops (fp32, int8),
    "dense": dense ten crops (fp32, int8), "ensemble": two members (fp32)}."""
    out = tmp_path_factory.mktemp("openvino-exports")
    dense_run = tiny_run(tmp_path_factory.getbasetemp(), DENSE_SPEC)
    twin = out / "twin" / "best.pt"  # a second member: the same weights under another run name
    twin.parent.mkdir(parents=True)
    shutil.copy(run["checkpoint"], twin)
    folders = {}
    for kind, checkpoints, options in (
            ("host", [run["checkpoint"]], dict(fp16=True, int8=True)),
            ("graph", [run["checkpoint"]], dict(ten_crop="graph", int8=True)),
            ("dense", [dense_run["checkpoint"]], dict(ten_crop="dense", int8=True)),
            ("ensemble", [run["checkpoint"], str(twin)], dict(ensemble=True))):
        result = export.export_checkpoints(checkpoints, tensorrt="off", out=str(out / kind), parity_images=8,
                                           progress=False, **options)
        folders[kind] = result["exports"][-1]["export_dir"]
    assert json.load(open(os.path.join(folders["ensemble"], "manifest.json")))["kind"] == "ensemble"
    return folders


def _images(predictor, count=5, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    side = predictor.spec.resize
    return torch.randint(0, 256, (count, 3, side, side), dtype=torch.uint8, generator=generator)


def _both(folder: str, precision: str):
    return (runtime.load(folder, backend="openvino", precision=precision, threads=THREADS),
            runtime.load(folder, backend="onnxruntime", device="cpu", precision=precision, threads=THREADS))


def test_fp32_equals_onnxruntime_and_passes_the_fp32_gate_against_pytorch(run, reference, exports):
    paths, _, expected = reference
    predictor, ort = _both(exports["host"], "fp32")
    assert (predictor.backend, predictor.device, predictor.precision, predictor.name) == (
        "openvino", "cpu", "fp32", "openvino-fp32-cpu")
    # fp32 is asked for explicitly: on a CPU with bf16 units OpenVINO's default for an fp32 graph is bf16.
    assert compile_config("fp32", None)["INFERENCE_PRECISION_HINT"] == "f32"
    assert predictor.graph.inference_precision == "f32" and predictor.units_precision == "fp32"
    logits = run_files(predictor, paths, batch=3, workers=0, preprocess="host").logits
    theirs = run_files(ort, paths, batch=3, workers=0, preprocess="host").logits
    assert (logits - theirs).abs().max() <= 1e-4
    report = apply_gates(compare_logits(expected.double().numpy(), logits.double().numpy()), "fp32")
    assert report["passed"], report["gates"]
    # One crop through the same graph, and normalised crops handed in directly.
    crops = torch.randn(7, 3, predictor.spec.crop, predictor.spec.crop)
    assert (predictor.logits_from_crops(crops) - ort.logits_from_crops(crops)).abs().max() <= 1e-4


def test_calls_from_several_threads_get_their_own_logits(exports):
    # A server may call one predictor from several threads; the infer requests are shared.
    from concurrent.futures import ThreadPoolExecutor

    predictor = runtime.load(exports["host"], backend="openvino", threads=2)
    batches = [torch.randn(3 + i, 3, predictor.spec.crop, predictor.spec.crop) for i in range(6)]
    alone = [predictor.logits_from_crops(b) for b in batches]
    with ThreadPoolExecutor(max_workers=3) as pool:
        together = list(pool.map(predictor.logits_from_crops, batches))
    assert all(torch.equal(a, t) for a, t in zip(alone, together))


@pytest.mark.parametrize("kind", ["graph", "dense", "ensemble"])
def test_in_graph_dense_and_ensemble_exports_equal_onnxruntime(exports, kind):
    predictor, ort = _both(exports[kind], "fp32")
    crops = {"graph": "10", "dense": "dense", "ensemble": 10}[kind]
    assert predictor.graph_crops == ort.graph_crops
    images = _images(predictor)
    ours, theirs = predictor.logits_from_images(images, crops), ort.logits_from_images(images, crops)
    assert ours.shape == (5, len(predictor.classes))
    assert (ours - theirs).abs().max() <= 1e-4
    if kind != "ensemble":
        with pytest.raises(runtime.BackendError, match="inside its graph"):
            predictor.logits_from_images(images, crops=1)


@pytest.mark.parametrize("kind", ["host", "graph", "dense"])
def test_int8_runs_the_qdq_graph(exports, kind):
    predictor, ort = _both(exports[kind], "int8")
    assert predictor.units_precision == "int8"
    images = _images(predictor, count=8, seed=1)
    crops = {"host": 10, "graph": "10", "dense": "dense"}[kind]
    ours, theirs = predictor.logits_from_images(images, crops), ort.logits_from_images(images, crops)
    assert ours.shape == theirs.shape == (8, len(predictor.classes)) and torch.isfinite(ours).all()
    report = apply_gates(compare_logits(theirs.double().numpy(), ours.double().numpy()), "int8")
    assert set(report["gates"]) == set(GATES["int8"]) and report["n_images"] == 8
    print(f"{kind} int8 top-1 agreement OpenVINO vs ONNX Runtime: {100 * top1_agreement(theirs.numpy(), ours.numpy()):.1f} %")


def test_fp16_graph_loads_and_passes_the_fp16_gate_against_fp32(exports):
    fp16 = runtime.load(exports["host"], backend="openvino", precision="fp16", threads=THREADS)
    fp32 = runtime.load(exports["host"], backend="openvino", precision="fp32", threads=THREADS)
    assert fp16.units_precision == "fp32"  # the fp16 graph's weights, computed in f32 on the CPU
    crops = torch.randn(16, 3, fp16.spec.crop, fp16.spec.crop)
    ours, reference_logits = fp16.logits_from_crops(crops), fp32.logits_from_crops(crops)
    assert (ours - reference_logits).abs().mean() <= GATES["fp16"]["mean_abs_diff"][1]


def test_bf16_is_offered_only_where_the_cpu_has_bf16_units(exports, monkeypatch):
    monkeypatch.setattr("cnnbench.runtime.openvino_backend.cpu_has_fast_bf16", lambda: False)
    assert "bf16" not in openvino_precisions()
    with pytest.raises(runtime.BackendError, match="bf16 units"):
        runtime.load(exports["host"], backend="openvino", precision="bf16")
    monkeypatch.setattr("cnnbench.runtime.openvino_backend.cpu_has_fast_bf16", lambda: True)
    assert "bf16" in openvino_precisions()
    assert compile_config("bf16", 2) == {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": "bf16",
                                         "INFERENCE_NUM_THREADS": 2}


def test_bf16_passes_the_fp16_gate_where_the_cpu_has_bf16_units(exports):
    if "bf16" not in openvino_precisions():
        pytest.skip("this CPU has no bf16 units (the refusal is tested above)")
    bf16 = runtime.load(exports["host"], backend="openvino", precision="bf16", threads=THREADS)
    fp32 = runtime.load(exports["host"], backend="openvino", precision="fp32", threads=THREADS)
    assert bf16.units_precision == "bf16"
    crops = torch.randn(16, 3, bf16.spec.crop, bf16.spec.crop)
    mean_diff = (bf16.logits_from_crops(crops) - fp32.logits_from_crops(crops)).abs().mean()
    assert mean_diff <= GATES["bf16"]["mean_abs_diff"][1]


def test_device_and_misuse_errors(run, exports):
    with pytest.raises(runtime.BackendError, match="CPU only"):
        # What runtime.load(..., device="cuda") builds, without needing a GPU to resolve "cuda".
        OpenVinoPredictor(export.load_manifest(exports["host"]), source=exports["host"], device="cuda",
                          precision="fp32")
    with pytest.raises(runtime.BackendError, match="runs an export folder"):
        runtime.load(run["checkpoint"], backend="openvino")
    with pytest.raises(runtime.BackendError, match="openvino backend precision must be one of"):
        runtime.load(exports["host"], backend="openvino", precision="fp8")
    with pytest.raises(runtime.BackendError, match="no onnx artifact in fp16"):
        runtime.load(exports["graph"], backend="openvino", precision="fp16")
    with pytest.raises(runtime.BackendError, match="threads must be a positive integer"):
        runtime.load(exports["host"], backend="openvino", threads=0)


def test_a_tampered_graph_is_refused_before_openvino_sees_it(exports, tmp_path):
    copy, data = tampered_copy(exports["host"], "model_int8.onnx", tmp_path)
    with pytest.raises(export.ExportError, match="sha256"):
        runtime.load(copy, backend="openvino", precision="int8")
    # Swapped after the manifest was verified: the bytes are hashed as they are read for compiling.
    graph = copy / "model_int8.onnx"
    shutil.copy(os.path.join(exports["host"], "model_int8.onnx"), graph)
    manifest = export.load_manifest(copy)
    graph.write_bytes(data)
    with pytest.raises(export.ExportError, match="changed since the manifest was written"):
        graph_for(manifest, "int8")


def test_validate_gates_openvino_logits(exports, tmp_path):
    from cnnbench.gradcam import validate_export

    report = validate_export(exports["host"], out=str(tmp_path / "validation"), limit=2, backend="openvino",
                             progress=False)
    assert report["backend"] == "openvino" and report["cam_runtime"] == "onnxruntime-cpu"
    assert set(report["artifacts"]) == set(openvino_precisions())  # the export has every graph bf16 needs
    fp32 = report["artifacts"]["fp32"]["parity"]
    assert fp32["passed"] and fp32["runtime"] == "openvino-cpu" and fp32["max_abs_diff"] <= 1e-3
    bad = validate_export(exports["host"], backend="tensorrt", progress=False)
    assert not bad["ok"] and "onnxruntime or openvino" in bad["error"]


# --- --backend auto: runtime.selection ---------------------------------------------------------------
def _row(backend, precision, images_per_s, passed=True, mode="compute", error=None):
    return {"backend": backend, "precision": precision, "images_per_s": images_per_s, "gates_passed": passed,
            "mode": mode, "error": error, "crops": "10", "variant": "onnx"}


def _measured(rows):
    return selection.measurements(rows, bench_json="b.json", threads=None)


def test_the_choice_is_the_fastest_measurement_that_passed_its_gates():
    rows = [_row("onnxruntime", "fp32", 10.0), _row("openvino", "fp32", 9.0),
            _row("onnxruntime", "int8", 30.0), _row("openvino", "int8", 80.0, passed=False),
            _row("openvino", "int8", 90.0, error="crashed"), _row("torch", "bf16", 500.0),
            _row("openvino", "bf16", 40.0, mode="end-to-end"), _row("openvino", "fp16", 12.0, passed=None)]
    measured = _measured(rows)
    assert {p: sorted(b) for p, b in measured.items()} == {
        "fp32": ["onnxruntime", "openvino"], "int8": ["onnxruntime", "openvino"], "bf16": ["openvino"],
        "fp16": ["openvino"]}  # torch rows and failed rows are no export backend's measurement
    assert measured["int8"]["openvino"]["gates_passed"] is False
    assert selection.choose_backends(measured) == {"fp32": "onnxruntime", "int8": "onnxruntime", "bf16": "openvino"}
    # A backend's compute row is its measurement; compute measurements outrank end-to-end ones.
    measured = _measured([_row("openvino", "fp32", 5.0), _row("openvino", "fp32", 50.0, mode="end-to-end"),
                          _row("onnxruntime", "fp32", 60.0, mode="end-to-end")])
    assert measured["fp32"]["openvino"]["images_per_s"] == 5.0
    assert selection.choose_backends(measured) == {"fp32": "openvino"}


def test_auto_reads_the_record_for_this_export_and_machine_only(exports, monkeypatch, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(exports["host"], folder)
    manifest = export.load_manifest(folder)
    assert runtime.load(folder, device="cpu").backend == "onnxruntime"  # no record: the fixed rule
    path, choices = selection.record_measurements(manifest, "cpu", _measured([
        _row("onnxruntime", "fp32", 10.0), _row("openvino", "fp32", 20.0), _row("onnxruntime", "int8", 30.0)]))
    assert path == os.path.join(manifest["export_dir"], selection.CHOICE_NAME)
    assert choices == {"fp32": "openvino", "int8": "onnxruntime"}
    assert runtime.load(folder, device="cpu").backend == "openvino"
    assert runtime.load(folder, device="cpu", precision="int8").backend == "onnxruntime"
    assert runtime.load(folder, device="cpu", precision="fp16").backend == "onnxruntime"  # nothing recorded
    # A bench of one backend updates its measurements and keeps the other's: here OpenVINO int8 is faster,
    # and OpenVINO fp32 now fails its gates, so ONNX Runtime's earlier fp32 measurement wins.
    _, choices = selection.record_measurements(manifest, "cpu", _measured([
        _row("openvino", "int8", 70.0), _row("openvino", "fp32", 25.0, passed=False)]))
    assert choices == {"fp32": "onnxruntime", "int8": "openvino"}
    assert runtime.load(folder, device="cpu", precision="int8").backend == "openvino"
    # Another device's entry is kept when the same machine records again.
    selection.record_measurements(manifest, "cuda", {})
    assert set(json.loads(open(path).read())["devices"]) == {"cpu", "cuda"}
    # Another export (its manifest changed), a backend that cannot load now, another machine: the fixed rule.
    assert selection.recorded_choice(manifest, "cpu", "int8") == "openvino"
    assert selection.recorded_choice({**manifest, "name": "other"}, "cpu", "int8") is None
    with monkeypatch.context() as patched:
        patched.setattr(selection, "backend_problem", lambda backend, device: "not installed")
        assert selection.recorded_choice(manifest, "cpu", "int8") is None
    real = selection.machine_fingerprint()
    monkeypatch.setattr(selection, "machine_fingerprint", lambda: {**real, "cpu_cores": -1})
    assert runtime.load(folder, device="cpu", precision="int8").backend == "onnxruntime"
    _, choices = selection.record_measurements(manifest, "cpu", _measured([_row("openvino", "fp16", 1.0)]))
    assert choices == {"fp16": "openvino"}  # the other machine's measurements were not carried over
    monkeypatch.undo()
    # A record that is no JSON is ignored with a warning (it is a cache the next bench rewrites).
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.warns(RuntimeWarning, match="unreadable backend record"):
        assert runtime.load(folder, device="cpu").backend == "onnxruntime"


def test_auto_bf16_and_explicit_openvino_device(exports, monkeypatch):
    # device auto with the CPU-only backend means the CPU, even where a GPU exists.
    assert runtime.load(exports["host"], backend="openvino").device == "cpu"
    monkeypatch.setattr("cnnbench.runtime.openvino_backend.cpu_has_fast_bf16", lambda: False)
    with pytest.raises(runtime.BackendError, match="bf16 units"):  # auto sends bf16 to the one backend that runs it
        runtime.load(exports["host"], device="cpu", precision="bf16")


def test_bench_gates_dense_openvino_rows_and_auto_then_picks_what_it_verified(exports, monkeypatch, tmp_path):
    from cnnbench.bench import run_bench

    monkeypatch.setattr("cnnbench.bench.peak._SIDES", {"cpu": (128,), "cuda": (1024,)})
    monkeypatch.setattr("cnnbench.bench.peak._SECONDS_PER_KERNEL", {"cpu": 0.02, "cuda": 0.02})
    folder = tmp_path / "dense"
    shutil.copytree(exports["dense"], folder)
    result = run_bench([str(folder)], batch=2, iters=1, warmup=0, backends=["openvino"], precisions=["fp32"],
                       eval_images=4, threads=THREADS, out=str(tmp_path / "b.json"), progress=False)
    (row,) = result["rows"]
    assert (row["backend"], row["precision"], row["variant"], row["crops"]) == ("openvino", "fp32", "onnx+dense", "dense")
    # Gated against PyTorch's dense ten crops (its own crop mode), not against the exact ten crops.
    assert row["gates_passed"] is True and row["gate_reference"] == "torch fp32 eager, crops=dense"
    assert row["peak_precision"] == "fp32" and row["agreement_top1"] is not None
    assert result["backend_choices"][row["target"]]["fp32"] == "openvino"
    assert runtime.load(folder, device="cpu").backend == "openvino"
    assert runtime.load(folder, device="cpu", precision="int8").backend == "onnxruntime"  # not measured
