"""TensorRT: profile shapes, auto/on/off decisions and the timing-cache path run everywhere; building
and running an engine needs TensorRT and a GPU and is skipped (with the reason) without them."""
import os
import types

import numpy as np
import pytest
import torch

import cnnbench.export.tensorrt as trt_module
from cnnbench.export import ExportError, export_checkpoints, tensorrt_status
from cnnbench.export.tensorrt import (TensorRTEngine, _attach_timing_cache, _network_flags, build_tensorrt_engine,
                             profile_shapes, resolve_mode)
from runtime_testlib import tiny_run

PER_CROP_IO = {"inputs": [{"name": "input", "dtype": "float32", "shape": ["batch", 3, 48, 48]}], "crops_per_image": 1}
IN_GRAPH_IO = {"inputs": [{"name": "images", "dtype": "uint8", "shape": ["batch", 3, 55, 55]}], "crops_per_image": 10}
AVAILABLE, REASON = tensorrt_status()


def test_profile_covers_ten_crops_per_image_when_cropping_outside_the_graph():
    assert profile_shapes(PER_CROP_IO, 64) == {
        "input_name": "input", "min_shape": (1, 3, 48, 48), "opt_shape": (640, 3, 48, 48), "max_shape": (640, 3, 48, 48)}
    assert profile_shapes(IN_GRAPH_IO, 8) == {
        "input_name": "images", "min_shape": (1, 3, 55, 55), "opt_shape": (8, 3, 55, 55), "max_shape": (8, 3, 55, 55)}
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ExportError, match="max_batch must be a positive integer"):
            profile_shapes(PER_CROP_IO, bad)


def test_modes_without_tensorrt(monkeypatch):
    monkeypatch.setattr(trt_module, "tensorrt_status", lambda: (False, "TensorRT is not installed"))
    assert resolve_mode("off") == (False, "skipped: --tensorrt off")
    assert resolve_mode("auto") == (False, "skipped: TensorRT is not installed")
    with pytest.raises(ExportError, match="--tensorrt on, but TensorRT is not installed"):
        resolve_mode("on")
    with pytest.raises(ExportError, match="tensorrt must be one of"):
        resolve_mode("yes")
    with pytest.raises(ExportError, match="cannot build a TensorRT engine: TensorRT is not installed"):
        build_tensorrt_engine("m.onnx", "m.plan", input_name="input", min_shape=(1,), opt_shape=(1,), max_shape=(1,),
                              timing_cache_path="t.cache")
    with pytest.raises(ExportError, match="cannot run a TensorRT engine"):
        TensorRTEngine(b"")


def test_modes_with_tensorrt(monkeypatch):
    monkeypatch.setattr(trt_module, "tensorrt_status", lambda: (True, ""))
    assert resolve_mode("auto") == (True, "")
    assert resolve_mode("on") == (True, "")
    assert resolve_mode("off") == (False, "skipped: --tensorrt off")


def test_status_reason_names_what_is_missing():
    if AVAILABLE:
        assert REASON == ""
    else:
        assert REASON.startswith("TensorRT is not installed") or "no CUDA device" in REASON


@pytest.mark.skipif(AVAILABLE, reason="checks the error path where TensorRT or CUDA is missing")
def test_export_with_tensorrt_on_fails_before_any_work(tmp_path):
    with pytest.raises(ExportError, match="--tensorrt on, but"):
        export_checkpoints([str(tmp_path / "missing.pt")], tensorrt="on", out=tmp_path / "export")
    assert not (tmp_path / "export").exists()


def _fake_trt(with_strongly_typed: bool):
    flags = types.SimpleNamespace(STRONGLY_TYPED=5) if with_strongly_typed else types.SimpleNamespace()
    return types.SimpleNamespace(NetworkDefinitionCreationFlag=flags)


def test_networks_are_strongly_typed_and_never_ask_for_explicit_batch():
    assert _network_flags(_fake_trt(True)) == 1 << 5  # TensorRT 10 (and 11, where the flag is ignored)
    assert _network_flags(_fake_trt(False)) == 0  # a TensorRT where strong typing is the only mode


class _FakeConfig:
    """Stands in for IBuilderConfig: accepts only caches it created from an empty or matching blob."""

    def __init__(self, accepted: bytes):
        self.accepted = accepted
        self.attached = None

    def create_timing_cache(self, blob: bytes):
        return {"blob": blob}

    def set_timing_cache(self, cache, ignore_mismatch: bool):
        assert ignore_mismatch is False
        if cache["blob"] in (b"", self.accepted):
            self.attached = cache["blob"]
            return True
        return False


def test_timing_cache_is_reused_and_a_foreign_one_replaced(tmp_path, capsys):
    cache = tmp_path / "timing.cache"
    config = _FakeConfig(accepted=b"ours")
    _attach_timing_cache(config, str(cache))  # no file yet: an empty cache
    assert config.attached == b""
    cache.write_bytes(b"ours")
    _attach_timing_cache(config, str(cache))
    assert config.attached == b"ours"
    cache.write_bytes(b"from another GPU")
    _attach_timing_cache(config, str(cache))
    assert config.attached == b"" and "does not fit this TensorRT/GPU" in capsys.readouterr().err


@pytest.mark.skipif(not AVAILABLE, reason=f"needs TensorRT and CUDA: {REASON}")
@pytest.mark.parametrize("ten_crop_in_graph", [False, True])
def test_engines_of_every_precision_pass_the_gates_in_chunks(tmp_path_factory, ten_crop_in_graph):
    """The fitted test model (clear margins, no tied weights), exported with engines for ONE image per
    call: parity feeds 16 per batch, so every engine runs chunk by chunk, from split (misaligned) views."""
    run = tiny_run(tmp_path_factory.getbasetemp())
    result = export_checkpoints([run["checkpoint"]], fp16=True, int8=True, ten_crop="graph" if ten_crop_in_graph else "host",
                                tensorrt="on", max_batch=1, calibration_images=16, parity_images=48,
                                out=tmp_path_factory.mktemp("trt"), progress=False)
    manifest = result["exports"][0]
    plans = {a["file"]: a for a in manifest["artifacts"] if a["format"] == "tensorrt"}
    assert set(plans) == {"model.plan", "model_fp16.plan", "model_int8.plan"}
    rows = 1 if ten_crop_in_graph else 10
    for file, artifact in plans.items():
        (profile,) = artifact["profile"].values()
        assert profile["max"][0] == rows
        report = manifest["parity"]["artifacts"][file]
        assert report["runtime"] == "tensorrt" and report["n_images"] == 48
        assert report["passed"], (file, report["gates"])
    assert manifest["parity"]["artifacts"]["model.plan"]["max_abs_diff"] <= 1e-3  # true fp32: TF32 is off
    assert result["ok"], result["failures"]
    engine = TensorRTEngine(open(os.path.join(manifest["export_dir"], "model_fp16.plan"), "rb").read())
    out = engine.run({engine.input_names[0]: torch.zeros(rows, *engine.profiles[engine.input_names[0]][0][1:],
                                                          dtype=engine.dtypes[engine.input_names[0]])})["logits"]
    assert out.dtype == torch.float32 and tuple(out.shape) == (rows, 4) and np.isfinite(out.cpu().numpy()).all()
