"""MLPerf LoadGen scenarios (bench.mlperf): the SUT and QSL against LoadGen itself, the Server search, and
every scenario on a tiny checkpoint and its export, VALID, with accuracy mode equal to eval's."""
import json
import os
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("mlperf_loadgen")

from cnnbench import export, runtime  # noqa: E402
from cnnbench.bench.mlperf import run_mlperf  # noqa: E402
from cnnbench.bench.mlperf_logs import performance_result, read_accuracy_log, read_detail  # noqa: E402
from cnnbench.bench.mlperf_report import render_mlperf  # noqa: E402
from cnnbench.bench.mlperf_scenarios import (SCENARIOS, Calibration, RunOptions, early_stopping_queries,  # noqa: E402
                                             SERVER_TRIAL_CAP_S, loadgen_settings, next_server_step, search_server,
                                             simulated_server_edge)
from cnnbench.bench.mlperf_sut import BatchingSUT, Inference, SampleLibrary, run_test  # noqa: E402
from cnnbench.common.errors import InputError  # noqa: E402
from cnnbench.data.folder import scan_folder  # noqa: E402
from cnnbench.data.spec import spec_for_crop  # noqa: E402
from cnnbench.data.split import make_split, save_split  # noqa: E402
from cnnbench.data.synth import synthesize  # noqa: E402
from cnnbench.models.checkpoint import save_checkpoint  # noqa: E402
from cnnbench.models.registry import create_model  # noqa: E402

CROP = 32
SHORT = dict(seconds=0.3, latency_ms=200.0, server_trials=3, threads=1, progress=False)


# Latency bounds need steady milliseconds (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlperf")
    data = synthesize(root / "data", classes=3, per_class=8, size=48, progress=False)
    split = make_split(scan_folder(data), test_fraction=0.5, seed=0)
    split_path = str(root / "split.json")
    save_split(split, split_path)
    torch.manual_seed(0)
    model = create_model("resnet26", num_classes=3, width_mult=0.125).eval()
    checkpoint = root / "train" / "tiny" / "best.pt"
    save_checkpoint(checkpoint, model, arch="resnet26", classes=split.classes, spec=spec_for_crop(CROP),
                    record={"split": split_path})
    export.export_checkpoints(None, out=root / "export", train_dir=root / "train", parity_images=4, tensorrt="off",
                              progress=False)
    return {"root": root, "checkpoint": str(checkpoint), "export": str(root / "export" / "tiny"),
            "test": [s.path for s in split.test]}


class _ChannelMeans:
    """A stand-in predictor whose logits are each image's channel means: every answer is predictable."""

    device = "cpu"
    classes = ["r", "g", "b"]

    def __init__(self, spec, delay_s=0.0, fail=False):
        self.spec, self.delay_s, self.fail, self.calls = spec, delay_s, fail, []

    def logits_from_images(self, images, crops):
        if self.fail:
            raise RuntimeError("the model broke")
        self.calls.append(images.shape[0])
        time.sleep(self.delay_s)
        return images.float().mean(dim=(2, 3))


def _calibration(seconds):
    return Calibration(single_s=seconds, multi_s=8 * seconds, batch_images_per_s=1 / seconds)


def _options(**changes):
    values = dict(seconds=0.2, min_queries=None, official=False, batch=4, latency_ms=None, max_wait_ms=None)
    return RunOptions(**{**values, **changes})


# --- LoadGen's rules, checked against LoadGen ------------------------------------------------------------
def test_early_stopping_minimums_are_loadgens():
    assert [early_stopping_queries(0.90, 1), early_stopping_queries(0.99, 1), early_stopping_queries(0.99, 0)] == \
        [64, 662, 459]


@pytest.mark.parametrize("queries, valid", [(63, False), (64, True)])
def test_singlestream_needs_early_stoppings_minimum(workspace, tmp_path, queries, valid):
    spec = spec_for_crop(CROP)
    library = SampleLibrary(workspace["test"], spec)
    settings = loadgen_settings(SCENARIOS["singlestream"], "performance", _options(seconds=0.001, min_queries=queries),
                             _calibration(1e-4), bound_ms=100)
    settings.max_query_count = queries  # exactly this many queries
    run_test(BatchingSUT(Inference(_ChannelMeans(spec), "1", 4), library), library, settings, str(tmp_path))
    result = performance_result(*read_detail(str(tmp_path)))
    assert result["early_stopping_met"] is valid
    assert (result["validity"] == "VALID") is valid
    if not valid:
        assert "early stopping" in result["invalid_reason"] and "64" in result["invalid_reason"]


def test_accuracy_log_holds_each_samples_answer_and_unreadable_images_are_recorded(workspace, tmp_path):
    """The response buffers reach LoadGen intact (they are alive until QuerySamplesComplete returns):
    the accuracy log decodes to exactly the logits the SUT computed for each QSL index."""
    spec = spec_for_crop(CROP)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    paths = workspace["test"][:5] + [str(broken)]
    library = SampleLibrary(paths, spec)
    predictor = _ChannelMeans(spec)
    settings = loadgen_settings(SCENARIOS["multistream"], "accuracy", _options(), _calibration(1e-3), bound_ms=100)
    run_test(BatchingSUT(Inference(predictor, "1", 3), library), library, settings, str(tmp_path / "logs"))
    logits, missing = read_accuracy_log(str(tmp_path / "logs"), len(paths))
    assert missing == []
    library.load(range(len(paths)))
    expected = library.batch(list(range(len(paths)))).float().mean(dim=(2, 3)).numpy()
    np.testing.assert_array_equal(logits, expected)
    assert list(library.failures) == [5] and np.all(logits[5] == 0)
    assert max(predictor.calls) <= 3  # a MultiStream query of 8 ran as batches of at most 3
    assert sorted(os.listdir(tmp_path / "logs")) == ["mlperf_log_accuracy.json", "mlperf_log_detail.txt",
                                                      "mlperf_log_summary.txt"]  # no trace


def test_server_batches_wait_for_company_but_not_past_the_wait(workspace, tmp_path):
    spec = spec_for_crop(CROP)
    library = SampleLibrary(workspace["test"], spec)
    predictor = _ChannelMeans(spec, delay_s=0.002)
    settings = loadgen_settings(SCENARIOS["server"], "performance", _options(seconds=0.3), _calibration(1e-3),
                             bound_ms=30, server_qps=1000)
    sut = BatchingSUT(Inference(predictor, "1", 8), library, max_wait_s=0.005)
    run_test(sut, library, settings, str(tmp_path))
    result = performance_result(*read_detail(str(tmp_path)))
    assert max(predictor.calls) <= 8 and sum(predictor.calls) == result["queries"]
    assert np.mean(predictor.calls) > 1.5  # 1000 QPS and 2 ms per call: batches form
    assert result["latency_ms"]["50.00"] < 30


def test_a_failing_model_ends_the_test_with_its_error_not_a_hang(workspace, tmp_path):
    spec = spec_for_crop(CROP)
    library = SampleLibrary(workspace["test"], spec)
    settings = loadgen_settings(SCENARIOS["offline"], "performance", _options(), _calibration(1e-3), bound_ms=100)
    with pytest.raises(RuntimeError, match="the model broke"):
        run_test(BatchingSUT(Inference(_ChannelMeans(spec, fail=True), "1", 4), library), library, settings,
                 str(tmp_path))


def _edge_trial(edge, tried, noisy=()):
    """A fake Server run: VALID up to ``edge`` QPS, except the rates in ``noisy`` (which flip)."""
    def trial(qps):
        tried.append(qps)
        valid = (qps <= edge) != any(abs(qps - n) < 1e-6 for n in noisy)
        return {"validity": "VALID" if valid else "INVALID", "invalid_reason": None if valid else "too fast"}
    return trial


@pytest.mark.parametrize("start, most", [(100.0, 5), (137.0, 3), (200.0, 6), (40.0, 9), (1000.0, 9)])
def test_server_search_brackets_the_edge_and_proves_it_at_1_2x(start, most):
    edge, tried = 137.0, []
    best, trials, proof = search_server(_edge_trial(edge, tried), start, trials=12, min_queries=1, seconds=0.1,
                                        log=lambda m: None)
    invalid = min(t["target_qps"] for t in trials if t["validity"] == "INVALID")
    assert best["target_qps"] <= edge < invalid <= 1.1 * best["target_qps"]
    assert proof["validity"] == "INVALID" and proof["target_qps"] == pytest.approx(1.2 * best["target_qps"])
    assert proof in trials and len(trials) == len(set(tried)) <= most  # no rate twice; few runs near the edge


def test_server_search_step_rules():
    assert next_server_step({0: False}) == -4               # nothing VALID: 1.44x lower
    assert next_server_step({0: True}) == 2                 # nothing INVALID above: 1.2x higher
    assert next_server_step({0: False, -4: True}) == -2     # bisect the bracket
    assert next_server_step({0: True, 1: False}) == 2       # within 10 %: the 1.2x proof is still to run
    assert next_server_step({0: True, 1: False, 2: False}) is None
    assert next_server_step({0: True, 2: False, 1: True}) == 3   # a better VALID rate needs its own proof
    assert next_server_step({0: False, -4: False}) == -8 and next_server_step({0: True, 2: True}) == 4  # galloping
    # noise: an INVALID rate below a VALID one; the highest VALID rate counts
    assert next_server_step({0: True, 2: True, 3: False, 4: False, 1: False}) is None


def test_server_search_moves_on_when_the_proof_run_is_valid():
    """Noise made the run at 1.2x VALID: that rate is the better answer, and it needs its own proof."""
    tried = []
    best, trials, proof = search_server(_edge_trial(100.0, tried, noisy=(120.0,)), 100.0, trials=12, min_queries=1,
                                        seconds=0.1, log=lambda m: None)
    assert best["target_qps"] == pytest.approx(120.0) and proof["validity"] == "INVALID"
    assert proof["target_qps"] == pytest.approx(144.0)


def test_server_search_is_bounded_and_reports_a_missing_proof():
    best, trials, proof = search_server(_edge_trial(1e9, []), 100.0, trials=2, min_queries=1, seconds=0.1,
                                        log=lambda m: None)
    assert len(trials) == 2 and best["target_qps"] == pytest.approx(120.0) and proof is None
    best, trials, proof = search_server(_edge_trial(1.0, []), 100.0, trials=3, min_queries=1, seconds=0.1,
                                        log=lambda m: None)
    assert best is None and proof is None and len(trials) == 3
    tried = []  # a start too slow for early stopping's queries within the cap: the slowest rate that fits, once
    best, trials, proof = search_server(_edge_trial(0.5, tried), 0.001, trials=5, min_queries=SERVER_TRIAL_CAP_S,
                                        seconds=0.1, log=lambda m: None)
    assert tried == [pytest.approx(1.0)] and best is None


def test_server_start_is_the_simulated_edge_of_the_calibrated_sut():
    calibration = Calibration(single_s=0.01, multi_s=0.03, batch_images_per_s=8 / 0.03)
    start = simulated_server_edge(calibration, 8, bound_s=0.1, wait_s=0.005)
    assert 0.3 * calibration.batch_images_per_s < start < calibration.batch_images_per_s
    assert simulated_server_edge(calibration, 8, bound_s=0.2, wait_s=0.005) > start   # a looser bound: faster
    assert simulated_server_edge(calibration, 8, bound_s=0.005, wait_s=0.0) == calibration.batch_images_per_s


# --- the command on real models ------------------------------------------------------------------------
def test_every_scenario_is_valid_and_accuracy_mode_equals_eval(workspace, tmp_path):
    result = run_mlperf([workspace["checkpoint"], workspace["export"]], backends=["torch", "onnxruntime"],
                        precisions=["fp32"], crops=["1"],
                        out=str(tmp_path / "run"), **SHORT)
    rows = result["rows"]
    assert {(r["backend"], r["scenario"]) for r in rows} >= {(b, s) for b in ("torch", "onnxruntime") for s in SCENARIOS}
    for row in rows:
        assert row["error"] is None, row
        assert row["validity"] == "VALID", (row["backend"], row["scenario"], row["invalid_reason"])
        assert row["accuracy"]["matches_eval"] and row["accuracy"]["predictions_differ"] == 0
        assert os.path.isfile(os.path.join(row["logs"], "mlperf_log_summary.txt"))
    evaluated = {path: runtime.evaluate(path, crops=1, batch=8, progress=False)["top1"]
                 for path in (workspace["checkpoint"], workspace["export"])}
    for row in rows:
        assert row["accuracy"]["top1"] == evaluated[workspace["checkpoint"] if row["backend"] == "torch"
                                                    else workspace["export"]]
        assert row["accuracy"]["images"] == len(workspace["test"])
    by = {(r["backend"], r["scenario"]): r for r in rows}
    assert by[("torch", "multistream")]["queries"] >= 662 and by[("torch", "singlestream")]["queries"] >= 64
    server = by[("onnxruntime", "server")]["server"]
    assert server["target_qps"] > 0 and server["latency_bound_ms"] == 200 and server["start_qps"] > 0
    proof = server["edge_proof"]
    assert proof is None or proof["target_qps"] == pytest.approx(1.2 * server["target_qps"])
    assert by[("onnxruntime", "offline")]["closed_loop_images_per_s"] > 0
    assert result["ok"] and json.load(open(result["json"]))["rows"][0]["target"] == "tiny"
    text = render_mlperf(result)
    assert all(f"{name}:" in text for name in SCENARIOS) and "\n  INVALID " not in text


def test_an_impossible_latency_bound_is_invalid_with_its_reason(workspace, tmp_path):
    result = run_mlperf([workspace["export"]], backends=["onnxruntime"], scenarios=["server"], modes=["performance"],
                        crops=["1"], out=str(tmp_path), **{**SHORT, "latency_ms": 0.001, "server_trials": 2})
    (row,) = result["rows"]
    assert row["error"] is None and row["validity"] == "INVALID" and row["server"]["target_qps"] is None
    assert "Reduce target QPS" in row["invalid_reason"]
    assert len(row["server"]["trials"]) == 2 and not result["ok"]
    assert "\n  INVALID tiny onnxruntime fp32 onnx+1crop: Reduce target QPS" in render_mlperf(result)


@pytest.mark.parametrize("kwargs, message", [
    (dict(scenarios=["offlne"]), "unknown scenario 'offlne'; choose from offline, server, singlestream, multistream"),
    (dict(modes=["fast"]), "unknown mode(s) fast; choose from performance, accuracy"),
    (dict(batch=0), "batch must be a positive number"),
    (dict(official=True, seconds=1.0), "--official uses MLPerf's own"),
    (dict(latency_ms=0), "latency_ms (the Server bound) must be > 0"),
    (dict(server_trials=0), "server_trials must be >= 1"),
    (dict(backends=["tensorflow"]), "unknown backend(s) tensorflow"),
])
def test_bad_options_are_clear_errors(workspace, kwargs, message):
    with pytest.raises(InputError) as caught:
        run_mlperf([workspace["checkpoint"]], progress=False, **kwargs)
    assert message in str(caught.value)


def test_cli_bad_option_is_one_line(workspace, monkeypatch, capsys):
    from cnnbench import cli

    monkeypatch.setattr(sys, "argv", ["cnnbench", "mlperf", workspace["checkpoint"], "--scenario", "sever"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: unknown scenario 'sever'; choose from offline, server, "
                                               "singlestream, multistream")


def test_bench_scenario_runs_the_mlperf_command(workspace, tmp_path, monkeypatch, capsys):
    """bench --scenario is run_mlperf with bench's options; its batch default is mlperf's, not the closed loop's."""
    from cnnbench import cli

    monkeypatch.setattr(sys, "argv", ["cnnbench", "bench", workspace["checkpoint"], "--scenario", "singlestream",
                                      "--backend", "torch", "--precision", "fp32", "--crops", "1", "--threads", "1",
                                      "--seconds", "0.3", "--out", str(tmp_path / "run"), "--json"])
    cli.main()
    result = json.loads(capsys.readouterr().out)
    (row,) = result["rows"]
    assert result["scenarios"] == ["singlestream"] and result["modes"] == ["performance", "accuracy"]
    assert row["validity"] == "VALID" and row["accuracy"]["matches_eval"] and row["batch"] == 8
    assert result["json"] == str(tmp_path / "run" / "mlperf.json")


def test_bench_scenario_refuses_closed_loop_options(workspace, monkeypatch, capsys):
    from cnnbench import cli

    monkeypatch.setattr(sys, "argv", ["cnnbench", "bench", workspace["checkpoint"], "--scenario", "offline",
                                      "--mode", "end-to-end", "--iters", "3"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 2
    assert "--mode, --iters: closed-loop option(s), meaningless with --scenario" in capsys.readouterr().err
