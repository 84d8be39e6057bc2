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
