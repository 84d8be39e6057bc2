"""The main job end to end: `demo --quick` on the small embedded set, and its report in a real browser."""
import base64
import os
import re
import shutil

import pytest

from cnnbench.common.device import TRAIN_PRECISION_ENV, side_by_side_threads

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def demo_run(quick_demo):
    workdir, result = quick_demo
    return result, workdir / "runs" / "demo"


def test_demo_runs_every_stage_and_fills_the_report(demo_run):
    result, out = demo_run
    assert result["ok"]
    assert set(result["training"]) == {"resnet26", "xception_medium"}
    forced = os.environ.get(TRAIN_PRECISION_ENV)  # CI's forced runs: the demo's trainers obey it too
    for arch, run in result["training"].items():
        assert run["precision"] == (forced or run["precision"]) and run["parts"][-1]["precision"] == run["precision"]
        assert run["best_epoch"] is not None and run["seconds"] > 0, arch
    if side_by_side_threads(2):  # a CPU with two cores or more: the two runs train at once
        assert "train resnet26 and xception_medium side by side" in [s["step"] for s in result["steps"]]
    assert set(result["accuracy"]) == {"resnet26", "xception_medium", "ensemble"}
    for acc in result["accuracy"].values():
        assert acc["1_crop"]["images"] > 0 and acc["10_crops"]["images"] == acc["1_crop"]["images"]
    assert {m["kind"] for m in result["export"]["exports"]} == {"single", "ensemble"}
    assert all(m["parity"] for m in result["export"]["exports"])
    assert result["bench"]["rows"] and all(not r.get("error") for r in result["bench"]["rows"])
    assert {r["backend"] for r in result["bench"]["rows"]} >= {"torch", "onnxruntime"}
    markdown = (out / "report.md").read_text()
    for heading in ("Accuracy", "Training curves", "Export parity", "Benchmark", "Grad-CAM", "Reproduce"):
        assert f"## {heading}" in markdown, heading
    assert "nan" not in markdown.lower().replace("nanoseconds", "")
    for arch, run in result["training"].items():  # each training curve's caption names its precision
        assert f"{arch}: {run['epochs']} epochs in {run['precision']}, best val top-1" in markdown, arch
    assert markdown.count("pointing game") == 2 and markdown.count("The ceiling, an ideal") == 2  # one per model
    for arch in ("resnet26", "xception_medium", "ensemble"):
        assert re.search(rf"^\| {arch} \| [\d.]+M \| [\d.]+% ", markdown, re.M), arch
    assert (out / "demo.json").exists()
    assert set(result["lessons"]["ten_crop_gain"]) == {"resnet26", "xception_medium"}
    assert "Ten crops against one, top-1 points: resnet26 " in markdown and " the better one (" in markdown


def _accuracy(**top1):
    return {name: {"1_crop": {"top1": one}, "10_crops": {"top1": ten}} for name, (one, ten) in top1.items()}


def test_seed_lessons_compare_ten_crops_with_one_and_the_ensemble_with_its_best_member():
    from cnnbench.demo.pipeline import seed_lessons

    # the 15-minute demo of docs/RECIPES.md row 29: the ensemble under ResNet26
    assert seed_lessons(_accuracy(resnet26=(20.625, 24.375), xception_medium=(13.75, 15.625),
                                  ensemble=(20.625, 23.4375))) == {
        "ten_crop_gain": {"resnet26": 3.75, "xception_medium": 1.88}, "best_member": "resnet26",
        "ensemble_margin": -0.94, "ensemble_above_members": False}
    # above both, the better member being the Xception at ten crops (made-up figures)
    lessons = seed_lessons(_accuracy(resnet26=(14.375, 16.25), xception_medium=(15.3125, 16.5625),
                                     ensemble=(13.4375, 18.4375)))
    assert (lessons["best_member"], lessons["ensemble_margin"], lessons["ensemble_above_members"]) == (
        "xception_medium", 1.88, True)
    tied = seed_lessons(_accuracy(resnet26=(10.0, 20.0), ensemble=(10.0, 20.0)))
    assert tied["ensemble_margin"] == 0 and not tied["ensemble_above_members"]


def test_report_html_is_self_contained(demo_run):
    _, out = demo_run
    page = (out / "report.html").read_text()
    sources = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(sources) >= 4
    from PIL import Image
    import io
    for src in sources:
        assert src.startswith("data:image/png;base64,"), src[:60]
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_report_loads_in_headless_chromium_without_errors(demo_run):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the [test] extra) is not installed")
    _, out = demo_run
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page()
        problems = []
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: problems.append(f"failed request: {r.url[:80]}"))
        page.goto((out / "report.html").as_uri(), wait_until="load")
        images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        tables = page.evaluate("document.querySelectorAll('table').length")
        browser.close()
    assert images and all(done and width > 0 for done, width in images), images
    assert tables >= 2
    assert problems == []
