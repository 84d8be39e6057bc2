"""runtime.cuda_check: skips cleanly without a GPU; on a GPU it runs every CUDA path against the CPU reference."""
import pytest
import torch

from cnnbench.runtime.cuda_check import CONFIGS, cuda_check, main
from runtime_testlib import tiny_run


def test_without_a_gpu_it_says_why(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the real check below runs instead")
    report = cuda_check(tmp_path / "never-opened.pt")
    assert report["skipped"] is True and "no CUDA GPU" in report["reason"]
    assert main([str(tmp_path / "never-opened.pt"), "--out", str(tmp_path / "r.json")]) == 0
    assert (tmp_path / "r.json").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_paths_agree_with_the_cpu_reference(tmp_path_factory):
    run = tiny_run(tmp_path_factory.getbasetemp())
    report = cuda_check(run["checkpoint"], images=16, batch=8, workers=0, compile=False, repeats=2)
    assert report["skipped"] is False and report["images"] == 16
    results = {r["config"]: r for r in report["results"]}
    assert set(results) == {c[0] for c in CONFIGS if not c[4]}
    for label, result in results.items():
        assert "error" not in result, f"{label}: {result.get('error')}"
        assert result["end_to_end_images_per_s"] > 0 and result["model_images_per_s"] > 0
    host_fp32 = results[CONFIGS[0][0]]
    # fp32 with TF32 off on the same host-resized pixels: the design's fp32 parity gate.
    assert host_fp32["top1_agreement"] == 100.0 and host_fp32["max_abs_logit_diff"] <= 1e-3
    # GPU resize/decode differ from PIL by a grey level at most: the decisions must not move.
    assert results[CONFIGS[1][0]]["top1_agreement"] == 100.0
